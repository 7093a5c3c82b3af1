"""Fixtures for the service: apps built through `create_app` against the serving registry (the
registry, its private copies and sample rows are root fixtures)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from tests.helpers.service import OTHER_TOKEN, POLL_SECONDS, TOKEN


@pytest.fixture
def make_app(tmp_path, serving_registry) -> Iterator[Callable]:
    """Build apps through `create_app`; every one is stopped (poller, engines) after the test.

    Defaults: the shared registry (read-only), a SQLite request log under tmp_path, two tokens,
    a 0.2 s poll. Keyword arguments override `service.app.Config` fields.
    """
    from service.app import create_app, service_of

    apps = []

    def factory(**overrides):
        config = {
            "tokens": (TOKEN, OTHER_TOKEN),
            "request_log": str(tmp_path / "requests.db"),
            "tracking_uri": serving_registry.store.tracking_uri,
            "model_name": serving_registry.name,
            "model_uri": None,
            "fraud_threshold": None,
            "poll_seconds": POLL_SECONDS,
            "max_rows": 5000,
            "max_body_bytes": 4 * 1024 * 1024,
            "feature_config": str(serving_registry.data.feature_config),
            **overrides,
        }
        app = create_app(config)
        apps.append(app)
        return app

    yield factory
    for app in apps:
        service_of(app).close()


@pytest.fixture
def app(make_app):
    return make_app()


@pytest.fixture
def client(app):
    return app.test_client()
