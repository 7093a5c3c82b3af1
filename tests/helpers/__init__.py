"""Helpers the tests share: builders of real stores and models, real processes (gunicorn, an
`mlflow server`, a private PostgreSQL), load with its bookkeeping, the Dockerfile as data.

Test modules import from here, never from one another or from a conftest.
"""
