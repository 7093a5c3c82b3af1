"""Bearer auth on the scoring and metrics endpoints; several tokens at once, each compared in constant
time and at least 16 characters long; tokens never logged."""

from __future__ import annotations

import hmac
import logging

import pytest

from common import settings
from service import auth, launch
from service.app import create_app
from service.errors import ApiError
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
    token_file.write_text("from-file-token-1-0123\n\nfrom-file-token-2-0123\n")
    monkeypatch.setenv("API_TOKEN", "env-token-1-0123456, env-token-2-0123456")
    monkeypatch.setenv("API_TOKEN_FILE", str(token_file))
    app = create_app({"request_log": str(tmp_path / "r.db"), "watch_model": False})
    client = app.test_client()
    for token in ("env-token-1-0123456", "env-token-2-0123456", "from-file-token-1-0123", "from-file-token-2-0123"):
        assert client.get("/metrics", headers={"Authorization": f"Bearer {token}"}).status_code == 200
    both = "Bearer env-token-1-0123456, env-token-2-0123456"
    assert client.get("/metrics", headers={"Authorization": both}).status_code == 401


def test_tokens_never_reach_the_log(client, caplog):
    with caplog.at_level(logging.DEBUG):
        client.post("/predict", json={"data": [ROW]}, headers={"Authorization": "Bearer guessed-secret-123"})
        client.post("/predict", json={"data": [[1]]}, headers={"Authorization": f"Bearer {TOKEN}"})
        client.post("/predict", json={"data": [ROW]}, headers={"Authorization": f"Bearer {TOKEN}"})
    assert "unauthorized" in caplog.text and "row 0 has 1 values" in caplog.text
    for secret in ("guessed-secret-123", TOKEN):
        assert secret not in caplog.text
    assert TOKEN not in repr(client.application.extensions)


def test_tokens_are_compared_in_constant_time_with_every_configured_token(monkeypatch):
    """hmac.compare_digest against every token, without stopping at a match, decides alone: a check
    by `==` (which stops at the first differing byte) or `in` fails here."""
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(given, expected):
        calls.append((given, expected))
        return real(given, expected)

    monkeypatch.setattr(auth.hmac, "compare_digest", spy)
    tokens = auth.Tokens((TOKEN, OTHER_TOKEN))
    configured = [TOKEN.encode(), OTHER_TOKEN.encode()]
    for given, accepted in ((TOKEN, True), (OTHER_TOKEN, True), ("x" * len(TOKEN), False), (TOKEN[:-1], False),
                            (TOKEN + "0", False)):
        calls.clear()
        if accepted:
            tokens.check(f"Bearer {given}")
        else:
            with pytest.raises(ApiError):
                tokens.check(f"Bearer {given}")
        assert calls == [(given.encode(), token) for token in configured]
    # Nothing beside compare_digest decides.
    monkeypatch.setattr(auth.hmac, "compare_digest", lambda given, expected: False)
    with pytest.raises(ApiError):
        tokens.check(f"Bearer {TOKEN}")
    monkeypatch.setattr(auth.hmac, "compare_digest", lambda given, expected: True)
    tokens.check("Bearer anything-at-all")


SHORT_TOKEN = "fifteen-chars-x"


@pytest.mark.parametrize("variable", ["API_TOKEN", "API_TOKEN_FILE"])
def test_a_token_shorter_than_16_characters_stops_the_start_naming_the_variable_but_not_the_token(
        monkeypatch, tmp_path, capsys, variable):
    assert len(SHORT_TOKEN) == 15
    if variable == "API_TOKEN":
        monkeypatch.setenv("API_TOKEN", f"{TOKEN},{SHORT_TOKEN}")
        monkeypatch.delenv("API_TOKEN_FILE", raising=False)
    else:
        (tmp_path / "tokens").write_text(f"{TOKEN}\n{SHORT_TOKEN}\n")
        monkeypatch.setenv("API_TOKEN_FILE", str(tmp_path / "tokens"))
        monkeypatch.setenv("API_TOKEN", OTHER_TOKEN)
    with pytest.raises(settings.SettingsError) as refused:
        create_app({"request_log": str(tmp_path / "r.db"), "watch_model": False})
    message = str(refused.value)
    assert message.startswith(f"{variable} holds a token of 15 characters; every token needs at least 16")
    assert SHORT_TOKEN not in message and TOKEN not in message
    # `make run` refuses too, before it starts gunicorn (which would replace this process).

    def no_exec(*_args):
        raise AssertionError("service.launch went on to start gunicorn")

    monkeypatch.setattr(launch.os, "execv", no_exec)
    assert launch.main(["--token-file", str(tmp_path / ".api_token")]) == 2
    err = capsys.readouterr().err
    assert f"cannot start: {variable} holds a token" in err and SHORT_TOKEN not in err


def test_a_token_of_16_characters_is_accepted(monkeypatch, tmp_path):
    monkeypatch.setenv("API_TOKEN", SHORT_TOKEN + "y")
    monkeypatch.delenv("API_TOKEN_FILE", raising=False)
    client = create_app({"request_log": str(tmp_path / "r.db"), "watch_model": False}).test_client()
    assert client.get("/metrics", headers={"Authorization": f"Bearer {SHORT_TOKEN}y"}).status_code == 200


def test_the_token_make_run_generates_is_long_enough(monkeypatch, tmp_path):
    token, created = launch.load_or_create_token(tmp_path / ".api_token")
    monkeypatch.delenv("API_TOKEN", raising=False)
    monkeypatch.setenv("API_TOKEN_FILE", str(tmp_path / ".api_token"))
    assert created and settings.api_tokens() == (token,)
