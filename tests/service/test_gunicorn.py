"""The real thing: gunicorn with service/gunicorn.conf.py on a loopback port, and `make run`'s launcher."""

from __future__ import annotations

import os
import re
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from common.paths import REPO_ROOT
from common.registry import move_to_stage
from common.store import RequestStore
from service import launch
from tests.helpers.service import TOKEN, parse_metrics

START_SECONDS = 90
# Variables of the developer's shell that would change what the server does.
_SCRUBBED = ("API_TOKEN", "API_TOKEN_FILE", "MODEL_URI", "FRAUD_THRESHOLD", "PROMETHEUS_MULTIPROC_DIR", "LATEST_DB",
             "WEB_THREADS", "SQLITE_SYNCHRONOUS", "GUNICORN_CMD_ARGS", "KEEPALIVE_REQUESTS", "CLIENT_TIMEOUT")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def server_env(registry, data, tmp_path: Path, port: int, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _SCRUBBED}
    env.update({
        "HOST": "127.0.0.1", "PORT": str(port), "WEB_CONCURRENCY": "2", "MODEL_POLL_SECONDS": "0.2",
        "MLFLOW_TRACKING_URI": registry.tracking_uri, "MODEL_NAME": "fraud-detector",
        "LATEST_DB": str(tmp_path / "requests.db"), "FEATURE_CONFIG": str(data.feature_config),
        **extra,
    })
    return env


class Server:
    def __init__(self, command: list[str], env: dict[str, str], log: Path):
        self.port = int(env["PORT"])
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self._log_file = log.open("wb")
        self.process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=self._log_file,
                                        stderr=subprocess.STDOUT)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def metrics(self) -> dict:
        response = requests.get(f"{self.url}/metrics", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)
        response.raise_for_status()
        return parse_metrics(response.text)

    def wait_until(self, condition, what: str, timeout: float = START_SECONDS):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"the server exited with {self.process.returncode} while waiting for {what}:\n"
                            f"{self.output()[-3000:]}")
            try:
                value = condition()
                if value:
                    return value
            except (requests.ConnectionError, requests.Timeout):
                pass
            time.sleep(0.1)
        pytest.fail(f"timed out waiting for {what}:\n{self.output()[-3000:]}")

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log_file.close()
        return self.process.returncode


GUNICORN = [sys.executable, "-m", "gunicorn", "-c", "service/gunicorn.conf.py", "service.app:create_app()"]


def model_workers(samples: dict, version: str) -> float:
    return samples.get(("fraud_model_info", (("flavor", "onnx"), ("model_name", "fraud-detector"),
                                             ("model_version", version))), 0)


@pytest.mark.slow
def test_gunicorn_serves_logs_aggregates_metrics_swaps_models_and_stops_cleanly(private_registry, serving_registry,
                                                                                 tmp_path, sample_rows):
    env = server_env(private_registry, serving_registry.data, tmp_path, free_port(),
                     API_TOKEN=f"{TOKEN},other-token-0123456")
    server = Server(GUNICORN, env, tmp_path / "server.log")
    try:
        assert server.wait_until(lambda: requests.get(f"{server.url}/health", timeout=5).ok, "liveness")
        # Both workers loaded version 1: the gauge is summed over the workers' files.
        server.wait_until(lambda: model_workers(server.metrics(), "1") == 2, "both workers to load version 1")
        assert requests.get(f"{server.url}/ready", timeout=5).json()["status"] == "ready"

        session = requests.Session()
        session.headers["Authorization"] = f"Bearer {TOKEN}"
        bodies = []
        for i in range(40):
            response = session.post(f"{server.url}/predict", json={"data": [sample_rows[i % len(sample_rows)]]},
                                    timeout=10)
            assert response.status_code == 200, response.text
            bodies.append(response.json())
        assert {b["model_version"] for b in bodies} == {"1"}

        samples = server.metrics()
        assert sum(v for (name, _), v in samples.items() if name == "fraud_predictions_total") == 40
        assert samples[("fraud_http_request_duration_seconds_count", (("endpoint", "/predict"),
                                                                      ("status", "200")))] == 40
        assert samples[("fraud_model_loaded", ())] == 1 and samples[("fraud_registry_reachable", ())] == 1
        assert RequestStore(env["LATEST_DB"], create=False).count() == 40
        metrics_dir = Path(re.search(r"metrics shared across workers in (\S+)", server.output()).group(1))
        pids = {int(m) for m in re.findall(r"_(\d+)\.db", " ".join(p.name for p in metrics_dir.iterdir()))}
        assert len(pids) >= 2, "every worker writes its own metric files"

        move_to_stage(private_registry.client(), "fraud-detector", "2", "Production")
        server.wait_until(lambda: model_workers(s := server.metrics(), "2") == 2 and model_workers(s, "1") == 0,
                          "both workers to swap to version 2")
        response = session.post(f"{server.url}/predict", json={"data": [sample_rows[0]]}, timeout=10)
        assert response.json()["model_version"] == "2"
    finally:
        code = server.stop()
    output = server.output()
    assert code == 0, output[-3000:]
    assert "Worker exiting" in output
    for trouble in ("Traceback", "SIGABRT", "SIGKILL", "terminate called", "WORKER TIMEOUT"):
        assert trouble not in output, output[-3000:]
    assert not metrics_dir.exists(), "the server removes the metrics folder it created"
    assert TOKEN not in output


@pytest.mark.slow
def test_tokens_rotate_through_the_token_file_and_sighup_without_a_restart(serving_registry, tmp_path, sample_rows):
    token_file = tmp_path / "tokens"
    token_file.write_text("old-token-0123456789\n")
    # With gunicorn's gthread worker (WEB_THREADS>1), so that both worker classes are served here.
    env = server_env(serving_registry.store, serving_registry.data, tmp_path, free_port(), WEB_CONCURRENCY="1",
                     API_TOKEN_FILE=str(token_file), WEB_THREADS="4")
    server = Server(GUNICORN, env, tmp_path / "server.log")

    def status(token: str) -> int:
        return requests.post(f"{server.url}/predict", json={"data": [sample_rows[0]]},
                             headers={"Authorization": f"Bearer {token}"}, timeout=10).status_code

    try:
        server.wait_until(lambda: requests.get(f"{server.url}/ready", timeout=5).ok, "readiness")
        assert (status("old-token-0123456789"), status("new-token-0123456789")) == (200, 401)
        master = server.process.pid
        # Step 1: both tokens are valid while clients move to the new one.
        token_file.write_text("old-token-0123456789\nnew-token-0123456789\n")
        os.kill(master, signal.SIGHUP)
        server.wait_until(lambda: status("new-token-0123456789") == 200, "the new token to be accepted")
        assert status("old-token-0123456789") == 200
        # Step 2: the old token is withdrawn.
        token_file.write_text("new-token-0123456789\n")
        os.kill(master, signal.SIGHUP)
        server.wait_until(lambda: status("old-token-0123456789") == 401, "the old token to be refused")
        assert status("new-token-0123456789") == 200
        assert server.process.pid == master and server.process.poll() is None
    finally:
        code = server.stop()
    output = server.output()
    assert code == 0, output[-3000:]
    assert "old-token-0123456789" not in output and "new-token-0123456789" not in output


@pytest.mark.slow
def test_kept_alive_connections_close_after_keepalive_requests_and_idle_ones_do_not_stall(serving_registry, tmp_path,
                                                                                          sample_rows):
    import http.client
    import json

    env = server_env(serving_registry.store, serving_registry.data, tmp_path, free_port(), WEB_CONCURRENCY="1",
                     API_TOKEN=TOKEN, KEEPALIVE_REQUESTS="3")
    server = Server(GUNICORN, env, tmp_path / "server.log")
    try:
        server.wait_until(lambda: requests.get(f"{server.url}/ready", timeout=5).ok, "readiness")
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        body = json.dumps({"data": [sample_rows[0]]})
        headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
        answers = []
        for _ in range(3):
            conn.request("POST", "/predict", body=body, headers=headers)
            response = conn.getresponse()
            response.read()
            answers.append((response.status, (response.getheader("Connection") or "").lower()))
        assert answers == [(200, "keep-alive"), (200, "keep-alive"), (200, "close")]
        # http.client reconnects by itself after a close; the server answered on a new connection.
        conn.request("POST", "/predict", body=body, headers=headers)
        assert conn.getresponse().status == 200
        conn.close()
        # Clients that connect and stay silent wait in the worker's poller: they would stop a sync
        # worker, and delay a gthread worker's threads by gunicorn's 5 s each.
        idle = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(8)]
        try:
            time.sleep(0.2)
            started = time.monotonic()
            assert requests.get(f"{server.url}/health", timeout=20).status_code == 200
            assert time.monotonic() - started < 3
        finally:
            for sock in idle:
                sock.close()
    finally:
        code = server.stop()
    assert code == 0, server.output()[-3000:]


@pytest.mark.slow
def test_a_client_that_stalls_mid_request_is_dropped_after_client_timeout(serving_registry, tmp_path, sample_rows):
    import json
    import sqlite3

    env = server_env(serving_registry.store, serving_registry.data, tmp_path, free_port(), WEB_CONCURRENCY="1",
                     API_TOKEN=TOKEN, CLIENT_TIMEOUT="1")
    server = Server(GUNICORN, env, tmp_path / "server.log")
    headers = {"Authorization": f"Bearer {TOKEN}"}

    def logged_rows() -> int:
        with sqlite3.connect(tmp_path / "requests.db") as db:
            return db.execute("SELECT COUNT(*) FROM requests").fetchone()[0]

    try:
        server.wait_until(lambda: requests.get(f"{server.url}/ready", timeout=5).ok, "readiness")
        assert requests.post(f"{server.url}/predict", json={"data": [sample_rows[0]]}, headers=headers,
                             timeout=10).status_code == 200
        assert logged_rows() == 1
        # Half a request line and header: the one worker serves it, waits 1 s for the rest, drops it.
        stalled = socket.create_connection(("127.0.0.1", server.port))
        stalled.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\n")
        stalled.settimeout(10)
        started = time.monotonic()
        assert stalled.recv(100) == b""
        assert 0.5 < time.monotonic() - started < 8
        stalled.close()
        assert requests.get(f"{server.url}/health", timeout=10).status_code == 200
        # The whole header, then 10 of the 1,000 body bytes it announces: a JSON 408, nothing logged.
        body = json.dumps({"data": [sample_rows[0]]}).encode()
        stalled = socket.create_connection(("127.0.0.1", server.port))
        stalled.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                        b"Authorization: Bearer " + TOKEN.encode() + b"\r\nContent-Length: 1000\r\n\r\n" + body[:10])
        stalled.settimeout(10)
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            chunk = stalled.recv(4096)
            if not chunk:
                break
            answer += chunk
        stalled.close()
        head, _, payload = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408"), answer
        error = json.loads(payload)["error"]
        assert error["code"] == "request_timeout" and "CLIENT_TIMEOUT" in error["message"]
        # The worker goes on, and only the complete request was logged.
        assert requests.post(f"{server.url}/predict", json={"data": [sample_rows[1]]}, headers=headers,
                             timeout=10).status_code == 200
        assert logged_rows() == 2
    finally:
        code = server.stop()
    output = server.output()
    assert code == 0, output[-3000:]
    assert "WORKER TIMEOUT" not in output


@pytest.mark.slow
def test_gunicorn_refuses_to_start_without_a_token(serving_registry, tmp_path):
    env = server_env(serving_registry.store, serving_registry.data, tmp_path, free_port())
    result = subprocess.run(GUNICORN, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "no API token configured" in result.stderr + result.stdout


@pytest.mark.slow
def test_make_run_launcher_prints_a_token_and_a_curl_command_that_works(serving_registry, tmp_path):
    token_file = tmp_path / ".api_token"
    env = server_env(serving_registry.store, serving_registry.data, tmp_path, free_port(), WEB_CONCURRENCY="1")
    server = Server([sys.executable, "-m", "service.launch", "--token-file", str(token_file)], env,
                    tmp_path / "launch.log")
    try:
        server.wait_until(lambda: requests.get(f"{server.url}/ready", timeout=5).ok, "readiness")
        printed = server.output()
        token = token_file.read_text().strip()
        assert f"mode 0600): {token}" in printed
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        curl = next(line for line in printed.splitlines() if line.startswith("curl "))
        result = subprocess.run(["bash", "-c", curl], capture_output=True, text=True, timeout=30, check=True)
        body = __import__("json").loads(result.stdout)
        assert body["model_version"] == "1" and len(body["fraud_probability"]) == 1
    finally:
        server.stop()
    # The next run reuses the token instead of making a new one.
    assert launch.load_or_create_token(token_file) == (token, False)


def test_the_token_file_is_created_private_and_reused(tmp_path):
    path = tmp_path / ".api_token"
    token, created = launch.load_or_create_token(path)
    assert created and len(token) >= 40
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert launch.load_or_create_token(path) == (token, False)
    path.chmod(0o644)
    assert launch.load_or_create_token(path) == (token, False)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    path.write_text("\n")
    assert launch.load_or_create_token(path)[1] is True


def test_the_printed_curl_command_sends_one_valid_row():
    command = launch.curl_command("http://127.0.0.1:5000", "'Authorization: Bearer abc'")
    assert command.startswith("curl -s -X POST http://127.0.0.1:5000/predict -H 'Authorization: Bearer abc' ")
    body = __import__("json").loads(re.search(r"-d '(.*)'$", command).group(1))
    assert len(body["data"]) == 1 and len(body["data"][0]) == 29


def test_client_timeout_defaults_to_10_s_and_refuses_values_gunicorn_would_cut_short(monkeypatch):
    from common import settings

    monkeypatch.delenv("CLIENT_TIMEOUT", raising=False)
    assert settings.client_timeout() == 10.0
    monkeypatch.setenv("CLIENT_TIMEOUT", "2.5")
    assert settings.client_timeout() == 2.5
    # Above 25 s a stalled client would outlast gunicorn's 30 s worker timeout and get the worker killed.
    for bad in ("0", "26", "abc", "nan"):
        monkeypatch.setenv("CLIENT_TIMEOUT", bad)
        with pytest.raises(settings.SettingsError):
            settings.client_timeout()
