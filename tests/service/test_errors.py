"""Bad input over HTTP: one JSON error shape, the right 4xx, a precise message, nothing logged, never a 500."""

from __future__ import annotations

import logging

import pytest

from common.schema import FEATURES
from common.store import RequestStore
from service.app import service_of
from tests.helpers.service import AUTH

ROW = [0.5] * 29


def assert_error(response, status: int, code: str, fragment: str = "") -> dict:
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.mimetype == "application/json"
    body = response.get_json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}
    assert body["error"]["code"] == code
    assert fragment in body["error"]["message"]
    return body


def logged_rows(app) -> int:
    return RequestStore(service_of(app).config.request_log).count()


BAD_BODIES = [
    # (raw body or JSON, status, code, message fragment)
    (b'{"data": [[0.5, 0.5', 400, "malformed_json", "not valid JSON"),
    (b'{"data": [[NaN' + b", 0.5" * 28 + b"]]}", 400, "malformed_json", "NaN and Infinity"),
    (b'{"data": [[Infinity' + b", 0.5" * 28 + b"]]}", 400, "malformed_json", "NaN and Infinity"),
    (b'{"data": [[-1e400' + b", 0.5" * 28 + b"]]}", 400, "malformed_json", "too large to be finite"),
    (b"", 400, "malformed_json", "empty"),
    ({"data": [ROW, ROW, ROW, ROW[:28]]}, 400, "invalid_input", "row 3 has 28 values, expected 29"),
    ({"data": [[*ROW[:3], "0.5", *ROW[4:]]]}, 400, "invalid_input", "row 0, value 3 (V4) is a string"),
    ({"data": [[*ROW[:3], False, *ROW[4:]]]}, 400, "invalid_input", "row 0, value 3 (V4) is false (a boolean)"),
    ({"data": [[*ROW[:3], None, *ROW[4:]]]}, 400, "invalid_input", "is null"),
    ({"data": []}, 400, "invalid_input", "'data' is empty"),
    ({"data": None}, 400, "invalid_input", "'data' is null"),
    ({"data": [ROW] * 6}, 400, "too_many_rows", "at most 5 (MAX_ROWS)"),
    ({"data": [[*ROW[:28], 5e9]]}, 400, "invalid_input", "outside the accepted range"),
    ({"records": [{"V1": 1}]}, 400, "invalid_input", "record 0 is missing"),
    ([1, 2], 400, "invalid_input", "the body is an array"),
    ("text", 400, "invalid_input", "the body is a string"),
]


@pytest.mark.parametrize(("body", "status", "code", "fragment"), BAD_BODIES)
def test_bad_predict_input_gets_a_precise_json_error_and_nothing_is_logged(make_app, body, status, code, fragment):
    app = make_app(max_rows=5)
    client = app.test_client()
    if isinstance(body, bytes):
        response = client.post("/predict", data=body, content_type="application/json", headers=AUTH)
    else:
        response = client.post("/predict", json=body, headers=AUTH)
    assert_error(response, status, code, fragment)
    assert logged_rows(app) == 0


@pytest.mark.parametrize("endpoint", ["/predict", "/invocations", "/feedback"])
def test_bad_input_is_refused_the_same_way_on_every_scoring_endpoint(client, app, endpoint):
    assert_error(client.post(endpoint, data=b"{", content_type="application/json", headers=AUTH),
                 400, "malformed_json", "not valid JSON")
    assert_error(client.post(endpoint, json={"nope": 1}, headers=AUTH), 400, "invalid_input", "unknown field 'nope'")
    assert logged_rows(app) == 0


@pytest.mark.parametrize(("content_type", "fragment"), [
    ("text/plain", "Content-Type is text/plain; send application/json"),
    ("application/x-www-form-urlencoded", "Content-Type is application/x-www-form-urlencoded"),
    (None, "Content-Type is none"),
    ("application/json; charset=latin-1", "charset latin-1 is not accepted"),
])
def test_a_body_that_is_not_utf8_json_gets_415(client, content_type, fragment):
    headers = {**AUTH, **({"Content-Type": content_type} if content_type else {})}
    response = client.post("/predict", data=b'{"data": [[1]]}', headers=headers)
    assert_error(response, 415, "unsupported_media_type", fragment)


@pytest.mark.parametrize(("content_type", "fragment"), [
    ("text/plain", "Content-Type is text/plain; send one of application/json, text/csv, application/vnd.apache"),
    (None, "Content-Type is none"),
    ("application/octet-stream", "Content-Type is application/octet-stream"),
    ("text/csv; charset=latin-1", "charset latin-1 is not accepted"),
    ("application/json; format=pandas-split", "the Content-Type parameter 'format' is not accepted"),
])
def test_invocations_refuse_what_mlflows_scoring_server_refuses_with_415(client, app, content_type, fragment):
    headers = {**AUTH, **({"Content-Type": content_type} if content_type else {})}
    response = client.post("/invocations", data=b'{"inputs": [' + str(ROW).encode() + b"]}", headers=headers)
    assert_error(response, 415, "unsupported_media_type", fragment)
    assert logged_rows(app) == 0


@pytest.mark.parametrize(("content_type", "body", "fragment"), [
    ("text/csv", b"V1,V2\n1,2\n", "the CSV header is missing 'V3'"),
    ("text/csv", ",".join(FEATURES).encode() + b"\n" + b",".join([b"0.5"] * 28) + b",x\n",
     "row 0 column 'Amount_scaled' is 'x', expected a number"),
    ("application/vnd.apache.parquet", b"not parquet", "the body is not a Parquet file"),
    ("application/vnd.apache.parquet", b"", "the Parquet body is empty"),
])
def test_bad_tables_get_a_precise_json_error_and_nothing_is_logged(client, app, content_type, body, fragment):
    response = client.post("/invocations", data=body, content_type=content_type, headers=AUTH)
    assert_error(response, 400, "invalid_input", fragment)
    assert logged_rows(app) == 0


def test_a_table_over_max_body_bytes_or_max_rows_is_refused(make_app):
    import pandas as pd

    app = make_app(max_body_bytes=32768, max_rows=5)
    client = app.test_client()
    table = pd.DataFrame([ROW] * 6, columns=list(FEATURES))
    csv = table.to_csv(index=False).encode()
    assert len(table.to_parquet()) < 32768 < len(csv * 50)
    assert_error(client.post("/invocations", data=csv * 50, content_type="text/csv", headers=AUTH),
                 413, "payload_too_large", "larger than 32768 bytes (MAX_BODY_BYTES)")
    assert_error(client.post("/invocations", data=csv, content_type="text/csv", headers=AUTH),
                 400, "too_many_rows", "at most 5 (MAX_ROWS)")
    assert_error(client.post("/invocations", data=table.to_parquet(),
                             content_type="application/vnd.apache.parquet", headers=AUTH),
                 400, "too_many_rows", "the Parquet table has 6 rows; at most 5 (MAX_ROWS)")
    assert logged_rows(app) == 0


def test_json_with_a_utf8_charset_is_accepted(client):
    response = client.post("/predict", data=b'{"data": [' + str(ROW).encode() + b"]}",
                           headers={**AUTH, "Content-Type": "application/json; charset=UTF-8"})
    assert response.status_code == 200


def test_a_body_over_max_body_bytes_gets_413(make_app):
    client = make_app(max_body_bytes=2048).test_client()
    response = client.post("/predict", json={"data": [ROW] * 40}, headers=AUTH)
    assert_error(response, 413, "payload_too_large", "larger than 2048 bytes (MAX_BODY_BYTES)")


def test_unknown_paths_and_methods_get_the_same_error_shape(client):
    assert_error(client.get("/nope"), 404, "not_found", "no endpoint /nope")
    response = client.get("/predict", headers=AUTH)
    assert_error(response, 405, "method_not_allowed", "GET is not allowed on /predict; use POST")
    assert response.headers["Allow"] == "POST"
    assert_error(client.delete("/health"), 405, "method_not_allowed")
    assert_error(client.options("/predict"), 405, "method_not_allowed")


def test_scoring_without_a_model_is_503_with_the_reason(make_app, private_registry, serving_registry):
    from common.registry import move_to_stage

    move_to_stage(private_registry.client(), serving_registry.name, "1", "Archived")
    app = make_app(tracking_uri=private_registry.tracking_uri)
    client = app.test_client()
    body = assert_error(client.post("/predict", json={"data": [ROW]}, headers=AUTH), 503, "model_unavailable",
                        "no version of 'fraud-detector' has alias champion or is in stage Production")
    assert "polls models:/fraud-detector@champion every 0.2 s" in body["error"]["message"]
    assert_error(client.get("/version"), 503, "model_unavailable")
    assert logged_rows(app) == 0


def test_an_unexpected_failure_is_a_json_500_with_the_request_id_and_a_logged_traceback(app, client, caplog):
    service = service_of(app)

    class Broken:
        def predict_proba(self, _X):
            raise RuntimeError("boom")

        predict_one = predict_proba

    current = service.watcher.current
    service.watcher.current = type(current)(Broken(), current.threshold, current.threshold_source, current.loaded_at)
    with caplog.at_level(logging.ERROR, logger="service"):
        response = client.post("/predict", json={"data": [ROW]}, headers=AUTH)
    body = assert_error(response, 500, "internal_error", response.headers["X-Request-ID"])
    assert "boom" not in body["error"]["message"]
    assert "boom" in caplog.text and response.headers["X-Request-ID"] in caplog.text
