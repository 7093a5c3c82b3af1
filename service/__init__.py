"""The fraud-scoring HTTP service: Flask app factory, gunicorn config and launcher."""
