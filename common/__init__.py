"""Code that service/, training/ and monitoring/ share: schema, settings, request store, registry."""
