"""A real gunicorn with each of its two workers: the event-loop worker, and gunicorn's stock gthread
worker as the fallback when the event-loop worker's check of gunicorn fails.

Each shows /ready which worker serves, and keeps a client's connection usable after an early answer
(401, 404, 405, 415: the body is read before the answer) or closes it when it says so (413; a body
held back until the answer). The refusals carry 100 KB bodies: more than gunicorn reads by itself
after an answer (64 KiB), within this server's MAX_BODY_BYTES.
"""

from __future__ import annotations

import json
import socket
import sys
import time
from dataclasses import dataclass

import pytest
import requests

from common.paths import REPO_ROOT
from service.connection import DRAIN_SECONDS
from tests.helpers.processes import Server, clean_env, free_port, http_ok, start, wait_until
from tests.helpers.service import AUTH, TOKEN, parse_metrics

pytestmark = pytest.mark.slow

MAX_BODY_BYTES = 128 * 1024
REFUSED_BODY = 100_000
CONFIG = REPO_ROOT / "service" / "gunicorn.conf.py"
# service/gunicorn.conf.py on a gunicorn the event-loop worker does not accept: the worker's check runs
# for real, finds the installed version outside the (emptied) range, and the config falls back.
FALLBACK_CONFIG = f"""
import service.worker

service.worker.GUNICORN_VERSIONS = ((0,), (0,))
exec(compile(open({str(CONFIG)!r}).read(), {str(CONFIG)!r}, "exec"))
"""
WARNING = "the event-loop worker (service/worker.py) cannot run on this gunicorn"


@dataclass
class Running:
    kind: str
    server: Server
    url: str
    port: int


@pytest.fixture(scope="module", params=["event-loop", "gthread-fallback"])
def running(request, serving_registry, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(request.param)
    config = CONFIG
    if request.param == "gthread-fallback":
        config = tmp / "fallback.conf.py"
        config.write_text(FALLBACK_CONFIG)
    port = free_port()
    env = clean_env(
        HOST="127.0.0.1", PORT=str(port), WEB_CONCURRENCY="1", MODEL_POLL_SECONDS="0.2", API_TOKEN=TOKEN,
        MLFLOW_TRACKING_URI=serving_registry.store.tracking_uri, MODEL_NAME=serving_registry.name,
        LATEST_DB=str(tmp / "requests.db"), FEATURE_CONFIG=str(serving_registry.data.feature_config),
        MAX_BODY_BYTES=str(MAX_BODY_BYTES), KEEPALIVE_REQUESTS="0",
    )
    argv = [sys.executable, "-m", "gunicorn", "-c", str(config), "service.app:create_app()"]
    server = start("gunicorn", argv, env=env, cwd=REPO_ROOT, log_dir=tmp)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(server, http_ok(f"{url}/ready"), "readiness")
        yield Running(request.param, server, url, port)
    finally:
        code = server.stop()
    assert code == 0, server.output()
    assert "Traceback" not in server.output()


@pytest.fixture(scope="module")
def row(sample_rows) -> list[float]:
    return sample_rows[0]


def local_port(response: requests.Response) -> int:
    """The client's end of the kept-alive connection a response came on (a request made with stream=True)."""
    port = response.raw.connection.sock.getsockname()[1]
    response.content  # noqa: B018 - reading it hands the connection back to the session's pool
    return port


def unread_bodies(running: Running) -> dict[str, float]:
    text = requests.get(f"{running.url}/metrics", headers=AUTH, timeout=10).text
    return {labels[0][1]: value for (name, labels), value in parse_metrics(text).items()
            if name == "fraud_unread_bodies_total"}


def test_ready_names_the_worker_that_serves_and_why(running, row):
    worker = requests.get(f"{running.url}/ready", timeout=10).json()["worker"]
    log = running.server.log.read_text()
    if running.kind == "event-loop":
        assert worker == {"class": "service.worker.EventLoopWorker", "fallback_reason": None}
        assert WARNING not in log
    else:
        assert worker["class"] == "gunicorn.workers.gthread.ThreadWorker"
        assert worker["fallback_reason"].startswith("gunicorn 26.2.0 is not in the versions this worker was built")
        assert log.count(WARNING) == 1, log
        assert "Using worker: gthread" in log
    assert requests.post(f"{running.url}/predict", json={"data": [row]}, headers=AUTH, timeout=10).status_code == 200


REFUSALS = {
    "401": ("/predict", {"Authorization": "Bearer not-the-token", "Content-Type": "application/json"}),
    "415": ("/predict", {**AUTH, "Content-Type": "text/plain"}),
    "404": ("/no-such-endpoint", {**AUTH, "Content-Type": "application/json"}),
    "405": ("/health", {**AUTH, "Content-Type": "application/json"}),
}


@pytest.mark.parametrize("status", list(REFUSALS))
def test_a_refusal_leaves_the_connection_to_the_next_request(running, row, status):
    path, headers = REFUSALS[status]
    body = b" " * REFUSED_BODY + b"{}"
    before = unread_bodies(running)
    session = requests.Session()
    ports = set()
    # requests sends the headers and the body separately, then reads the answer.
    for _ in range(10):
        refused = session.post(f"{running.url}{path}", data=body, headers=headers, timeout=10, stream=True)
        assert (refused.status_code, refused.headers["Connection"]) == (int(status), "keep-alive")
        ports.add(local_port(refused))
        answered = session.post(f"{running.url}/predict", json={"data": [row]}, headers=AUTH, timeout=10, stream=True)
        assert answered.status_code == 200
        ports.add(local_port(answered))
    assert len(ports) == 1, "every request went on the session's one connection"
    assert unread_bodies(running)["drained"] - before["drained"] == 10


def raw_request(path: str, headers: dict[str, str], body: bytes) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: test", f"Content-Length: {len(body)}",
             *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def read_answer(sock: socket.socket) -> tuple[int, dict[str, str], bytes] | None:
    """One HTTP response from the socket, or None when the server closed it first."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return None
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in header_lines)}
    while len(body) < int(headers["content-length"]):
        chunk = sock.recv(65536)
        if not chunk:
            return None
        body += chunk
    return int(status_line.split()[1]), headers, body


def good_request(row: list[float]) -> bytes:
    body = json.dumps({"data": [row]}).encode()
    return raw_request("/predict", {**AUTH, "Content-Type": "application/json"}, body) + body


def test_a_body_sent_with_its_headers_is_read_before_the_refusal(running, row):
    path, headers = REFUSALS["401"]
    body = b" " * REFUSED_BODY + b"{}"
    with socket.create_connection(("127.0.0.1", running.port), timeout=10) as sock:
        sock.sendall(raw_request(path, headers, body) + body)
        status, answer_headers, _ = read_answer(sock)
        assert (status, answer_headers["connection"]) == (401, "keep-alive")
        sock.sendall(good_request(row))
        status, _, answer = read_answer(sock)
        assert status == 200 and json.loads(answer)["model_version"] == "1"


def test_a_body_held_back_until_the_refusal_is_read_gets_connection_close(running, row):
    """The server cannot wait for it without holding the worker: it answers when the drain's time is up,
    closing the connection, and the client's next request goes on a new one."""
    path, headers = REFUSALS["401"]
    body = json.dumps({"data": [row]}).encode()
    with socket.create_connection(("127.0.0.1", running.port), timeout=10) as sock:
        sock.sendall(raw_request(path, headers, body))
        started = time.monotonic()
        status, answer_headers, _ = read_answer(sock)
        waited = time.monotonic() - started
        assert (status, answer_headers["connection"]) == (401, "close")
        assert waited < DRAIN_SECONDS + 5, "a client that holds its body back does not hold the worker"
        try:
            sock.sendall(body + good_request(row))
            assert read_answer(sock) is None, "a closed connection answers nothing more"
        except (BrokenPipeError, ConnectionResetError):
            pass
    with socket.create_connection(("127.0.0.1", running.port), timeout=10) as sock:
        sock.sendall(good_request(row))
        assert read_answer(sock)[0] == 200


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_a_body_over_max_body_bytes_gets_413_with_connection_close_and_the_next_request_a_new_connection(
        running, row, chunked):
    body = b" " * (MAX_BODY_BYTES + 10_000) + b"{}"
    before = unread_bodies(running)
    session = requests.Session()
    data = iter([body[:50_000], body[50_000:]]) if chunked else body
    refused = session.post(f"{running.url}/predict", data=data, headers={**AUTH, "Content-Type": "application/json"},
                           timeout=10)
    assert (refused.status_code, refused.headers["Connection"]) == (413, "close")
    assert refused.json()["error"]["code"] == "payload_too_large"
    # The session opens a new connection for it, the first one being closed.
    assert session.post(f"{running.url}/predict", json={"data": [row]}, headers=AUTH, timeout=10).status_code == 200
    assert unread_bodies(running)["too_large"] - before["too_large"] == 1
    assert "the connection closes after this answer (unread body: too_large)" in running.server.log.read_text()
