"""Bearer auth on the scoring and metrics endpoints; several tokens at once; tokens never logged."""

from __future__ import annotations

import logging

import pytest

from service.app import create_app
from tests.helpers.service import OTHER_TOKEN, TOKEN

ROW = [0.5] * 29
PROTECTED = [("post", "/predict", {"json": {"data": [ROW]}}),
             ("post", "/invocations", {"json": {"inputs": [ROW]}}),
             ("post", "/feedback", {"json": {"labels": [{"request_id": "x-0", "is_fraud": True}]}}),
             ("get", "/metrics", {})]
OPEN = ["/health", "/ping", "/ready", "/version", "/openapi.json"]


@pytest.mark.parametrize(("method", "path", "kwargs"), PROTECTED)
@pytest.mark.parametrize(("authorization", "fragment"), [
    (None, "missing Authorization header"),
    ("", "missing Authorization header"),
    (f"Basic {TOKEN}", "must be 'Bearer <token>'"),
    ("Bearer", "must be 'Bearer <token>'"),
    ("Bearer ", "must be 'Bearer <token>'"),
    ("Bearer wrong-token", "is not valid"),
    (f"Bearer {TOKEN}x", "is not valid"),
    (f"Bearer {TOKEN[:-1]}", "is not valid"),
    ("Bearer tökén-ünïcode", "is not valid"),
])
def test_protected_endpoints_refuse_a_missing_or_wrong_token_with_401(client, method, path, kwargs, authorization,
                                                                     fragment):
    headers = {} if authorization is None else {"Authorization": authorization}
    response = getattr(client, method)(path, headers=headers, **kwargs)
    assert response.status_code == 401
    assert response.get_json()["error"]["code"] == "unauthorized"
    assert fragment in response.get_json()["error"]["message"]
    assert response.headers["WWW-Authenticate"].startswith("Bearer")


@pytest.mark.parametrize(("method", "path", "kwargs"), PROTECTED)
@pytest.mark.parametrize("token", [TOKEN, OTHER_TOKEN])
def test_every_configured_token_is_accepted_for_rotation(client, method, path, kwargs, token):
    for scheme in ("Bearer", "bearer"):
        response = getattr(client, method)(path, headers={"Authorization": f"{scheme} {token}"}, **kwargs)
        assert response.status_code == 200, response.get_data(as_text=True)


@pytest.mark.parametrize("path", OPEN)
def test_health_ready_version_and_openapi_need_no_token(client, path):
    assert client.get(path).status_code == 200


def test_the_app_refuses_to_start_without_a_token(tmp_path):
    with pytest.raises(ValueError, match="no API token configured: set API_TOKEN"):
        create_app({"tokens": (), "request_log": str(tmp_path / "r.db"), "watch_model": False})


def test_tokens_come_from_api_token_and_api_token_file_together(monkeypatch, tmp_path):
    token_file = tmp_path / "tokens"
    token_file.write_text("from-file-1\n\nfrom-file-2\n")
    monkeypatch.setenv("API_TOKEN", "env-1, env-2")
    monkeypatch.setenv("API_TOKEN_FILE", str(token_file))
    app = create_app({"request_log": str(tmp_path / "r.db"), "watch_model": False})
    client = app.test_client()
    for token in ("env-1", "env-2", "from-file-1", "from-file-2"):
        assert client.get("/metrics", headers={"Authorization": f"Bearer {token}"}).status_code == 200
    assert client.get("/metrics", headers={"Authorization": "Bearer env-1, env-2"}).status_code == 401


def test_tokens_never_reach_the_log(client, caplog):
    with caplog.at_level(logging.DEBUG):
        client.post("/predict", json={"data": [ROW]}, headers={"Authorization": "Bearer guessed-secret-123"})
        client.post("/predict", json={"data": [[1]]}, headers={"Authorization": f"Bearer {TOKEN}"})
        client.post("/predict", json={"data": [ROW]}, headers={"Authorization": f"Bearer {TOKEN}"})
    assert "unauthorized" in caplog.text and "row 0 has 1 values" in caplog.text
    for secret in ("guessed-secret-123", TOKEN):
        assert secret not in caplog.text
    assert TOKEN not in repr(client.application.extensions)
