"""What a client cannot do: get in without the token, hurt the service with hostile input, or find
an answer the OpenAPI document does not describe (schemathesis)."""

from __future__ import annotations

import hmac

import pytest

from benchmarks.reliability import (
    BAD_AUTHORIZATION,
    HOSTILE,
    PROTECTED_CALLS,
    auth_scenario,
    fuzz_scenario,
    limits_scenario,
)
from service import auth
from service.app import create_app
from service.errors import ApiError

TOKENS = ("first-configured-token", "second-token-for-rotation")


@pytest.mark.slow
def test_every_protected_endpoint_refuses_every_bad_token_with_401_and_scores_and_logs_nothing(shared_service):
    result = auth_scenario(shared_service)
    assert result.ok, result.explain()
    assert result.inputs == len(PROTECTED_CALLS) * len(BAD_AUTHORIZATION)


@pytest.mark.parametrize("authorization", [
    f"Bearer {TOKENS[0]} ", f"Bearer  {TOKENS[0]}", f"Bearer \t{TOKENS[0]}", f"Bearer {TOKENS[0]}\t",
    "Bearer ", "Bearer", f"{TOKENS[0]}", f"Token {TOKENS[0]}",
])
def test_a_token_with_whitespace_around_it_or_without_the_bearer_scheme_is_refused(tmp_path, authorization):
    # In-process, whitespace at the end of the header reaches the app (over HTTP the server strips it).
    client = create_app({"tokens": TOKENS, "request_log": str(tmp_path / "r.db"), "watch_model": False}).test_client()
    response = client.get("/metrics", headers={"Authorization": authorization})
    assert response.status_code == 401
    assert response.get_json()["error"]["code"] == "unauthorized"
    assert client.get("/metrics", headers={"Authorization": f"Bearer {TOKENS[1]}"}).status_code == 200


def test_tokens_are_compared_with_hmac_compare_digest_against_every_configured_token(monkeypatch):
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(given, expected):
        calls.append((given, expected))
        return real(given, expected)

    monkeypatch.setattr(auth.hmac, "compare_digest", spy)
    tokens = auth.Tokens(TOKENS)
    configured = [t.encode() for t in TOKENS]
    # The right token, a wrong one of the same length, and ones of other lengths: each is compared
    # with every configured token, with no early exit on a match or on a length difference.
    for given, accepted in ((TOKENS[0], True), ("x" * len(TOKENS[0]), False), (TOKENS[1][:-1], False),
                            (TOKENS[1] + "0", False), ("y" * 500, False)):
        calls.clear()
        if accepted:
            tokens.check(f"Bearer {given}")
        else:
            with pytest.raises(ApiError):
                tokens.check(f"Bearer {given}")
        assert calls == [(given.encode(), token) for token in configured]

    # The decision is compare_digest's alone: no `==` or `in` beside it.
    monkeypatch.setattr(auth.hmac, "compare_digest", lambda given, expected: False)
    with pytest.raises(ApiError):
        tokens.check(f"Bearer {TOKENS[0]}")
    monkeypatch.setattr(auth.hmac, "compare_digest", lambda given, expected: True)
    tokens.check("Bearer anything-at-all")


@pytest.mark.slow
def test_hostile_inputs_are_refused_with_413_or_400_and_worker_memory_stays_bounded(shared_service):
    result = limits_scenario(shared_service, repeats=4)
    assert result.ok, result.explain()
    assert result.inputs == 4 * len(HOSTILE) and result.errors == 0


@pytest.mark.slow
def test_schemathesis_finds_no_server_error_and_no_answer_outside_the_openapi_document(shared_service, tmp_path):
    result = fuzz_scenario(shared_service, tmp_path, max_examples=10)
    assert result.ok, result.explain()
    assert result.inputs > 0
