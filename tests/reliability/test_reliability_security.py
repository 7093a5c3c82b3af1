"""What a client cannot do: get in without the token, lose its next request to a refusal on its
kept-alive connection, hurt the service with hostile input, or find an answer the OpenAPI document
does not describe (schemathesis). `--clients`, `--seconds`, `--repeats`, `--examples` and
`--fuzz-phases` set the size."""

from __future__ import annotations

import contextlib
import functools
import hmac
import itertools
import json
import socket
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import requests

from common import settings
from common.paths import REPO_ROOT
from common.schema import FEATURES
from service import auth
from service.app import create_app
from service.errors import ApiError
from tests.helpers import processes
from tests.helpers.gunicorn import MAX_BODY_BYTES, MAX_ROWS, OFFLINE, Service
from tests.helpers.load import Load, Refusal, reconcile, summary
from tests.helpers.service import AUTH, TOKEN, is_error_shape

SCHEMATHESIS_HOOKS = REPO_ROOT / "tests" / "helpers" / "schemathesis_hooks.py"

TOKENS = ("first-configured-token", "second-token-for-rotation")
ROW = [0.1] * len(FEATURES)


def predictions_total(service: Service) -> float:
    return sum(v for (name, _), v in service.metrics().items() if name == "fraud_predictions_total")


# --- auth -----------------------------------------------------------------------------------------------

PROTECTED_CALLS = (
    ("POST", "/predict", {"data": [ROW]}),
    ("POST", "/invocations", {"inputs": [ROW]}),
    ("POST", "/feedback", None),  # labels an existing row: a let-through would change the log
    ("GET", "/metrics", None),
)
# Whitespace at the end of a header value is removed by the HTTP server before the app sees it, so
# "around" the token means: an extra space or a tab between the scheme and the token.
BAD_AUTHORIZATION = {
    "no header": None,
    "wrong scheme": f"Basic {TOKEN}",
    "no scheme": TOKEN,
    "wrong token": "Bearer " + "x" * len(TOKEN),
    "whitespace around the token": f"Bearer  {TOKEN} ",
    "tab before the token": f"Bearer \t{TOKEN}",
    "empty token": "Bearer ",
    "token one shorter": f"Bearer {TOKEN[:-1]}",
    "token one longer": f"Bearer {TOKEN}0",
    # Just under gunicorn's limit_request_field_size (8190 bytes with the name); past it gunicorn
    # itself answers 431 before the app sees the request.
    "token 8 KB long": "Bearer " + (TOKEN * 8192)[:8160],
}


@pytest.mark.slow
@pytest.mark.scenario("auth: bad tokens")
def test_every_protected_endpoint_refuses_every_bad_token_with_401_and_scores_and_logs_nothing(shared_service,
                                                                                               scenario):
    """Every protected endpoint with every bad Authorization header: 401 in the error shape with a
    Bearer challenge, nothing scored, nothing logged, no label changed. The valid token still works."""
    service = shared_service
    with requests.Session() as session:
        session.trust_env = False  # no .netrc credentials, no proxy: exactly these headers, to loopback
        response = session.post(f"{service.url}/predict", json={"data": [ROW]}, headers=AUTH, timeout=30)
        assert response.status_code == 200, f"the valid token was refused: {response.status_code} {response.text}"
        feedback = {"labels": [{"request_id": response.json()["request_id"][0], "is_fraud": True}]}
        rows_before, labelled_before = service.count(), service.count(labelled=True)
        scored_before = predictions_total(service)
        let_through = []
        for method, path, body in PROTECTED_CALLS:
            for case, authorization in BAD_AUTHORIZATION.items():
                headers = {} if authorization is None else {"Authorization": authorization}
                payload = (feedback if path == "/feedback" else body) if method == "POST" else None
                response = session.request(method, f"{service.url}{path}", headers=headers, json=payload, timeout=30)
                scenario.inputs += 1
                scenario.requests += 1
                try:
                    answer = response.json()
                except ValueError:
                    answer = response.text[:200]
                if not (response.status_code == 401 and is_error_shape(answer, "unauthorized")
                        and response.headers.get("WWW-Authenticate", "").startswith("Bearer")):
                    let_through.append(f"{method} {path} with {case}: {response.status_code} {answer}")
    scenario.errors = len(let_through)

    assert not let_through, "not refused with a 401 and a Bearer challenge:\n" + "\n".join(let_through)
    assert scenario.inputs == len(PROTECTED_CALLS) * len(BAD_AUTHORIZATION)
    assert service.count() == rows_before, f"refused requests logged {service.count() - rows_before} rows"
    assert service.count(labelled=True) == labelled_before, "a refused /feedback stored a label"
    assert predictions_total(service) == scored_before, "refused requests were scored"


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


# --- refusals on kept-alive connections ---------------------------------------------------------------

# Each refusal but the 413 carries a body larger than gunicorn reads by itself after an answer (64 KiB),
# so the service must drain it before it answers (service/connection.py).
REFUSED_BODY = b" " * 100_000 + b"{}"
JSON_AUTH = {**AUTH, "Content-Type": "application/json"}
REFUSALS = (
    Refusal("bad token", "/predict", {**JSON_AUTH, "Authorization": "Bearer not-the-token"}, REFUSED_BODY, 401,
            "unauthorized"),
    Refusal("text/plain", "/predict", {**AUTH, "Content-Type": "text/plain"}, REFUSED_BODY, 415,
            "unsupported_media_type"),
    Refusal("404 with a body", "/no-such-endpoint", JSON_AUTH, REFUSED_BODY, 404, "not_found"),
    Refusal("405 with a body", "/health", JSON_AUTH, REFUSED_BODY, 405, "method_not_allowed"),
    Refusal("body over MAX_BODY_BYTES", "/predict", JSON_AUTH, b" " * (MAX_BODY_BYTES + 10_000) + b"{}", 413,
            "payload_too_large"),
)


def unread_bodies(service: Service) -> Counter:
    """fraud_unread_bodies_total by outcome: how the service left connections after early answers."""
    return Counter({dict(labels)["outcome"]: value for (name, labels), value in service.metrics().items()
                    if name == "fraud_unread_bodies_total"})


@pytest.mark.slow
@pytest.mark.scenario("refusals on kept-alive connections")
def test_clients_that_keep_their_connections_through_refusals_lose_no_request(shared_service, sample_rows, size,
                                                                              scenario, monkeypatch):
    """`--clients` clients for `--seconds`, each on the connection it keeps alive (requests.Session:
    headers, then body): every other request is refused (401, 415, and 404 and 405 with a body, answered
    before the body is read; 413, a body over MAX_BODY_BYTES), and the next one is valid. Every request
    gets its answer, none is lost to a closed connection. Each refused body is drained and its connection
    carries the next request, except the 413's, which says `Connection: close` (the client opens a new
    one). The log gains exactly the rows the 200s reported."""
    service = shared_service
    monkeypatch.delenv("KEEPALIVE_REQUESTS", raising=False)
    per_connection = settings.keepalive_requests()  # the service's default: it closes a connection after these
    # A first row, so that the log's table exists whatever ran before on the shared service.
    first = service.http.post(f"{service.url}/predict", json={"data": [ROW]}, headers=AUTH, timeout=30)
    assert first.status_code == 200, first.text
    bodies_before, logged_before = unread_bodies(service), service.logged_ids()
    with Load(service.url, sample_rows, clients=size.clients, seconds=size.seconds, refusals=REFUSALS) as load:
        outcomes = load.wait()
    bodies = unread_bodies(service) - bodies_before
    ledger = reconcile(outcomes, service.logged_ids() - logged_before)
    scenario.took(load)
    scenario.rows_lost = len(ledger.lost)
    refused = Counter(o.expected for o in outcomes if o.expected != 200)
    scenario.inputs = refused.total()
    # Each client's answers in order: a connection whose answer said keep-alive carries the next request.
    # (An answer that closes its connection may come without it: urllib3 lets go of it at once.)
    by_client = sorted(outcomes, key=lambda o: (o.client, o.started))
    pairs = [(a, b) for a, b in itertools.pairwise(by_client) if a.client == b.client]
    dropped = [a for a, b in pairs if not a.closes and None not in (a.port, b.port) and a.port != b.port]
    closed = Counter(o.expected for o in outcomes if o.closes)
    connections = len({(o.client, o.port) for o in outcomes if o.port is not None})
    scenario.notes.append(f"refusals {', '.join(f'{k}: {v}' for k, v in sorted(refused.items()))}; "
                          f"{connections} connections for {len(outcomes)} requests")

    failures = [o for o in outcomes if not o.ok]
    assert not failures, f"{len(failures)} of {len(outcomes)} requests did not get their answer: {summary(failures)}"
    assert refused.keys() == {r.status for r in REFUSALS}, f"not every refusal was sent: {dict(refused)}"
    assert not dropped, (f"{len(dropped)} connections said keep-alive but did not carry the next request, "
                         f"e.g. after {summary(dropped[:5])}")
    assert closed[413] == refused[413], f"{refused[413] - closed[413]} answers 413 kept an unread body's connection"
    assert closed.total() - closed[413] <= len(outcomes) // per_connection + size.clients, (
        f"connections closed after {dict(closed)}: refusals whose bodies were drained closed theirs")
    assert bodies == Counter(drained=refused.total() - refused[413], too_large=refused[413]), (
        f"unread bodies {dict(bodies)} for refusals {dict(refused)}: every body but the 413's is drained")
    ledger.check(exact=True)


# --- input limits ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Hostile:
    name: str
    path: str
    body: Callable[[], bytes]
    statuses: frozenset[int]
    chunked: bool = False
    declared_length: int | None = None  # a Content-Length larger than what is sent (nothing is)
    content_type: str = "application/json"


def _rows_body(n_rows: int, width: int = len(FEATURES)) -> bytes:
    row = b"[" + b",".join([b"0.5"] * width) + b"]"
    return b'{"data":[' + b",".join([row] * n_rows) + b"]}"


def _csv_body(n_rows: int) -> bytes:
    return ",".join(FEATURES).encode() + b"\n" + (b",".join([b"0"] * len(FEATURES)) + b"\n") * n_rows


@functools.cache
def _parquet_body(kind: str) -> bytes:
    """A small Parquet file that would decode to about a gigabyte, past PEAK_GROWTH_MB: 4,000,000 rows of
    the 29 features, or one row whose V1 is a 256 MB string."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if kind == "rows":
        columns = dict.fromkeys(FEATURES, pa.nulls(4_000_000, pa.float64()).fill_null(0.0))
    else:
        columns = {**dict.fromkeys(FEATURES, pa.array([0.0])), "V1": pa.array(["A" * (256 << 20)], pa.large_string())}
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table(columns), sink, compression="zstd")
    return sink.getvalue().to_pybytes()


HOSTILE = (
    Hostile("body just over MAX_BODY_BYTES", "/predict",
            lambda: b'{"data":[[' + b"1," * (MAX_BODY_BYTES // 2) + b"1]]}", frozenset({413})),
    Hostile("chunked body 16 x MAX_BODY_BYTES", "/predict",
            lambda: b'{"data":[[' + b"1," * (8 * MAX_BODY_BYTES) + b"1]]}", frozenset({413}), chunked=True),
    Hostile("1 GB declared, nothing sent", "/predict", lambda: b"", frozenset({413}), declared_length=1 << 30),
    Hostile("JSON nested 200,000 deep", "/predict",
            lambda: b'{"data":' + b"[" * 200_000 + b"]" * 200_000 + b"}", frozenset({400})),
    Hostile("nested objects 100,000 deep", "/invocations",
            lambda: b'{"inputs":' + b'{"a":' * 100_000 + b"1" + b"}" * 100_000 + b"}", frozenset({400})),
    Hostile("one row of 1,900,000 values", "/predict",
            lambda: b'{"data":[[' + b"0," * 1_900_000 + b"0]]}", frozenset({400})),
    Hostile("rows of 300 values", "/predict", lambda: _rows_body(400, width=300), frozenset({400})),
    Hostile("MAX_ROWS + 1 rows", "/predict", lambda: _rows_body(MAX_ROWS + 1), frozenset({400})),
    Hostile("1,300,000 empty rows", "/predict",
            lambda: b'{"data":[' + b",".join([b"[]"] * 1_300_000) + b"]}", frozenset({400})),
    Hostile("MAX_ROWS + 1 records", "/invocations",
            lambda: b'{"dataframe_records":[' + b",".join([b"{}"] * (MAX_ROWS + 1)) + b"]}", frozenset({400})),
    Hostile("MAX_ROWS + 1 feedback labels", "/feedback",
            lambda: b'{"labels":[' + b",".join([b'{"request_id":"a-0","is_fraud":1}'] * (MAX_ROWS + 1)) + b"]}",
            frozenset({400})),
    Hostile("200,000 unknown keys", "/predict",
            lambda: b"{" + b",".join(b'"k%d":0' % i for i in range(200_000)) + b"}", frozenset({400})),
    Hostile("a 3 MB string value", "/predict", lambda: b'{"data":"' + b"A" * (3 << 20) + b'"}', frozenset({400})),
    Hostile("number too large to be finite", "/predict",
            lambda: b'{"data":[[' + b",".join([b"1e400"] * len(FEATURES)) + b"]]}", frozenset({400})),
    Hostile("CSV header of 1,300,000 columns", "/invocations", lambda: b"V1," * 1_300_000 + b"V1\n",
            frozenset({400}), content_type="text/csv"),
    Hostile("CSV of 69,000 rows (4 MB)", "/invocations", lambda: _csv_body(69_000), frozenset({400}),
            content_type="text/csv"),
    Hostile("Parquet of 4,000,000 rows", "/invocations", lambda: _parquet_body("rows"), frozenset({400}),
            content_type="application/vnd.apache.parquet"),
    Hostile("Parquet with a 256 MB string", "/invocations", lambda: _parquet_body("strings"), frozenset({400}),
            content_type="application/vnd.apache.parquet"),
)


def send_hostile(url: str, item: Hostile, timeout: float = 60.0) -> tuple[int | None, dict, float]:
    """Send one hostile request over a raw socket; (status or None, JSON answer, seconds).

    A raw socket, because no HTTP client sends a Content-Length it does not mean. The body is sent
    from another thread while this one reads the answer: the server may answer 413 and close
    before it has read the body, and the answer must not be lost in that race.
    """
    host, port = url.removeprefix("http://").split(":")
    body = item.body()
    head = [f"POST {item.path} HTTP/1.1", f"Host: {host}:{port}", f"Content-Type: {item.content_type}",
            f"Authorization: Bearer {TOKEN}", "Connection: close"]
    if item.chunked:
        head.append("Transfer-Encoding: chunked")
        step = 64 * 1024
        body = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + step]), body[i:i + step])
                        for i in range(0, len(body), step)) + b"0\r\n\r\n"
    else:
        head.append(f"Content-Length: {item.declared_length or len(body)}")
    message = ("\r\n".join(head) + "\r\n\r\n").encode() + body
    started = time.monotonic()
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:

        def send() -> None:
            with contextlib.suppress(OSError):  # the server may close once it has answered
                sock.sendall(message)

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        received = b""
        with contextlib.suppress(OSError):
            while chunk := sock.recv(65536):
                received += chunk
        seconds = time.monotonic() - started
        sender.join(timeout)
    if not received.startswith(b"HTTP/1.1 "):
        return None, {}, seconds
    status = int(received[9:12])
    try:
        answer = json.loads(received.split(b"\r\n\r\n", 1)[1])
    except (IndexError, ValueError):
        answer = {}
    return status, answer, seconds


# The worst accepted body (4 MB of `[[],[],...]`) decodes to about a million Python objects, ~100 MB
# for a moment. With gthread workers (WEB_THREADS=4) each request thread keeps its own malloc arena,
# so a worker that has served it on all 4 threads sits a few hundred MB above its start; the default
# event-loop worker serves every request on one thread. A body read past
# MAX_BODY_BYTES (the 64 MB chunked one would decode to several GB) or payloads kept after their
# requests would cross this bound.
PEAK_GROWTH_MB = 600


def _mb(by_pid: dict[int, float]) -> str:
    return "/".join(f"{v:.0f}" for _, v in sorted(by_pid.items()))


@pytest.mark.slow
@pytest.mark.scenario("hostile inputs")
def test_hostile_inputs_are_refused_with_413_or_400_and_worker_memory_stays_bounded(shared_service, size, scenario):
    """Each hostile input `--repeats` times: 413 or 400 in the error shape, nothing logged, and the
    worker's peak RSS at most PEAK_GROWTH_MB over its start. The shared service has one worker, so
    every input reaches the worker measured."""
    service = shared_service
    with requests.Session() as session:  # warm the worker up (and create the log's table) before measuring
        session.trust_env = False
        for _ in range(20):
            response = session.post(f"{service.url}/predict", json={"data": [ROW] * 10}, headers=AUTH, timeout=30)
            assert response.status_code == 200, f"a valid request failed before the burst: {response.text}"
    rows_before = service.count()
    baseline = service.rss_mb()
    slowest: dict[str, float] = {}
    after_round: list[dict[int, float]] = []
    refused_wrongly = []
    for _ in range(size.repeats):
        for item in HOSTILE:
            status, answer, seconds = send_hostile(service.url, item)
            scenario.inputs += 1
            scenario.requests += 1
            slowest[item.name] = max(slowest.get(item.name, 0.0), seconds)
            error = answer.get("error") if isinstance(answer, dict) else None
            if not (status in item.statuses and isinstance(error, dict) and is_error_shape(answer, error.get("code"))):
                refused_wrongly.append(f"{item.name}: got {status} {str(answer)[:200]}; expected "
                                       f"{sorted(item.statuses)} with the JSON error shape")
        after_round.append(service.rss_mb())
    peak = service.rss_mb("VmHWM")
    scenario.errors = len(refused_wrongly)
    worst = max(slowest, key=slowest.get)
    scenario.notes.append(f"worker RSS (MB) {_mb(baseline)}, after each round: "
                          f"{' '.join(_mb(r) for r in after_round)}; peak {_mb(peak)}")
    scenario.notes.append(f"slowest refusal {slowest[worst]:.2f} s ({worst})")

    assert not refused_wrongly, "\n".join(refused_wrongly)
    assert scenario.inputs == size.repeats * len(HOSTILE)
    assert set(peak) == set(baseline), f"workers changed during the burst: {baseline} -> {peak}"
    growth = max((peak[pid] - mb for pid, mb in baseline.items()), default=0.0)
    assert growth <= PEAK_GROWTH_MB, f"a worker's peak RSS grew {growth:.0f} MB (bound {PEAK_GROWTH_MB} MB)"
    assert service.count() == rows_before, "hostile requests logged rows"


# --- fuzzing ----------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.scenario("schemathesis")
def test_schemathesis_finds_no_server_error_and_no_answer_outside_the_openapi_document(shared_service, size,
                                                                                       scenario, tmp_path):
    """schemathesis against the service's own /openapi.json with a valid token, every check on
    (no server error, status codes, content types, headers and bodies conform to the schema, schema-
    valid bodies accepted, invalid ones refused, auth not ignored, ...). Also checked from the
    service's side: its latency histogram counts no 5xx answer."""
    service = shared_service
    scenario.name = f"schemathesis ({','.join(size.fuzz_phases)})"
    report = tmp_path / "schemathesis.json"
    command = [str(processes.VENV_BIN / "schemathesis"), "run", f"{service.url}/openapi.json", "--checks", "all",
               "--header", f"Authorization: Bearer {TOKEN}", "--max-examples", str(size.examples),
               "--seed", "0", "--workers", "1", "--phases", ",".join(size.fuzz_phases), "--request-timeout", "30",
               "--report", "json", "--report-json-path", str(report)]
    # The hooks teach schemathesis to send /invocations' CSV and Parquet tables (see the module).
    env = processes.clean_env(NO_COLOR="1", SCHEMATHESIS_HOOKS=str(SCHEMATHESIS_HOOKS), **OFFLINE)
    done = subprocess.run(command, cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600, check=False)
    output = done.stdout[-6000:] + done.stderr[-2000:]
    assert report.exists(), f"schemathesis wrote no report (exit {done.returncode}):\n{output}"
    run = json.loads(report.read_text())
    cases = run["test_cases"]
    scenario.inputs = scenario.requests = int(cases["generated"])
    scenario.errors = int(cases["with_failures"]) + int(cases["errored"])
    scenario.notes.append(f"{cases['generated']} generated test cases over {run['operations']['tested']} operations")

    assert done.returncode == 0 and run["exit_code"] == 0, f"schemathesis exited {done.returncode}:\n{output}"
    assert not run["failures"] and not run["errors"], (
        f"schemathesis found {len(run['failures'])} failures and {len(run['errors'])} errors:\n{output}")
    assert run["operations"]["tested"] == run["operations"]["total"], (
        f"only {run['operations']['tested']} of {run['operations']['total']} operations were tested")
    assert scenario.inputs > 0, "schemathesis generated no test case"
    server_errors = {labels: v for (name, labels), v in service.metrics().items()
                     if name == "fraud_http_request_duration_seconds_count" and dict(labels)["status"].startswith("5")}
    assert not server_errors, f"the service answered 5xx: {server_errors}"
