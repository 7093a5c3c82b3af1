"""The service as production runs it, for reliability tests: gunicorn with service/gunicorn.conf.py
and several workers on a loopback port, and what a test reads from it (its workers, their memory,
metrics, /ready, the request log)."""

from __future__ import annotations

import sqlite3
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import requests

from common.paths import REPO_ROOT
from common.store import RequestStore
from tests.helpers import processes
from tests.helpers.service import AUTH, POLL_SECONDS, TOKEN, ServingRegistry, parse_metrics

WORKERS = 2
MAX_ROWS = 5000
MAX_BODY_BYTES = 4 * 1024 * 1024
# Generous: on a busy 2-core machine gunicorn's master imports MLflow and scikit-learn first.
START_SECONDS = 180.0
# No process started here may reach beyond loopback: MLflow would otherwise send usage telemetry
# from every process that imports it (it stays quiet on its own only under pytest or in CI).
OFFLINE = {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}
GUNICORN = [sys.executable, "-m", "gunicorn", "-c", "service/gunicorn.conf.py", "service.app:create_app()"]


@dataclass
class Service:
    """A running gunicorn (master and workers) on a loopback port, and its request log."""

    server: processes.Server
    url: str
    request_log: str
    http: requests.Session = field(default_factory=requests.Session, repr=False)

    def __post_init__(self) -> None:
        self.http.trust_env = False  # no proxy from the environment: loopback only
        # The test's own probes (/metrics, /ready) are not the clients under test, and an idle kept-
        # alive connection holds a gunicorn worker's graceful shutdown for its graceful_timeout (20 s).
        self.http.headers["Connection"] = "close"

    @property
    def master(self) -> int:
        return self.server.process.pid

    def workers(self) -> list[int]:
        """Pids of the master's live worker processes."""
        return sorted(processes.children(self.master))

    def busy_worker(self, timeout: float = 2.0) -> int:
        """A worker caught serving requests, else the first one.

        A worker holds the listening socket it shares with the master, and one more socket per client
        connection it has accepted (the SQLite request log and registry use none).
        """
        listening = processes.socket_inodes(self.master)
        workers = self.workers()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for pid in workers:
                if processes.socket_inodes(pid) - listening:
                    return pid
            time.sleep(0.0005)
        return workers[0]

    def rss_mb(self, field: str = "VmRSS") -> dict[int, float]:
        """{worker pid: resident MB}, now (VmRSS) or at its peak (VmHWM)."""
        return {pid: processes.rss_mb(pid, field) for pid in self.workers()}

    def metrics(self) -> dict[tuple, float]:
        response = self.http.get(f"{self.url}/metrics", headers=AUTH, timeout=10)
        response.raise_for_status()
        return parse_metrics(response.text)

    def versions_served(self) -> dict[str, float]:
        """{model version: live workers serving it}, from the fraud_model_info gauge."""
        served: Counter = Counter()
        for (name, labels), value in self.metrics().items():
            if name == "fraud_model_info" and value > 0:
                served[dict(labels)["model_version"]] += value
        return dict(served)

    def ready(self) -> tuple[int, dict]:
        response = self.http.get(f"{self.url}/ready", timeout=10)
        return response.status_code, response.json()

    def wait_for(self, condition: Callable[[], object], what: str, timeout: float = 60.0):
        """Poll until `condition()` is truthy and return it; fail with the server's output otherwise."""
        found: list = []

        def probe() -> bool:
            value = condition()
            if value:
                found.append(value)
            return bool(value)

        processes.wait_until(self.server, probe, what, timeout=timeout)
        return found[-1]

    def logged(self, columns: tuple[str, ...] = ("request_id",)):
        """The request log's rows (these columns) as a DataFrame."""
        store = RequestStore(self.request_log, create=False)
        try:
            return store.read_frame(columns)
        finally:
            store.dispose()

    def logged_ids(self) -> set[str]:
        return set(self.logged()["request_id"])

    def count(self, *, labelled: bool | None = None) -> int:
        store = RequestStore(self.request_log, create=False)
        try:
            return store.count(labelled=labelled)
        finally:
            store.dispose()

    def integrity(self) -> str:
        """`PRAGMA integrity_check` of a SQLite request log: "ok", or what is broken."""
        conn = sqlite3.connect(self.request_log)
        try:
            return ", ".join(row[0] for row in conn.execute("PRAGMA integrity_check"))
        finally:
            conn.close()

    def output(self) -> str:
        return self.server.log.read_text(errors="replace") if self.server.log.exists() else ""

    def stop(self) -> None:
        self.http.close()
        self.server.stop()


def start_service(registry: ServingRegistry, workdir: Path, *, name: str = "service",
                  tracking_uri: str | None = None, request_log: str | None = None, workers: int = WORKERS,
                  **env: str) -> Service:
    """Start gunicorn with the project's config and wait until every worker serves a model.

    Args:
        registry: the registry whose model (`registry.name`) is served, and its feature config.
        workdir: where the server's log and (by default) its SQLite request log go.
        name: names the log files.
        tracking_uri: another registry than `registry.store` (a copy, a tracking server).
        request_log: another request log than `<workdir>/<name>-requests.db` (a PostgreSQL URL).
        workers: WEB_CONCURRENCY.
        env: more environment variables for the server.

    Returns:
        The running service; the caller stops it (`Service.stop`). If it does not come up, it is
        stopped and AssertionError names what was missing, with the server's output.
    """
    port = processes.free_port()
    request_log = request_log or str(workdir / f"{name}-requests.db")
    server_env = processes.clean_env(
        HOST="127.0.0.1", PORT=str(port), WEB_CONCURRENCY=str(workers), MODEL_POLL_SECONDS=str(POLL_SECONDS),
        API_TOKEN=TOKEN, MLFLOW_TRACKING_URI=tracking_uri or registry.store.tracking_uri,
        MODEL_NAME=registry.name, LATEST_DB=request_log, FEATURE_CONFIG=str(registry.data.feature_config),
        MAX_ROWS=str(MAX_ROWS), MAX_BODY_BYTES=str(MAX_BODY_BYTES), MALLOC_ARENA_MAX="2", **OFFLINE, **env)
    server = processes.start(name, GUNICORN, env=server_env, cwd=REPO_ROOT, log_dir=workdir)
    service = Service(server, f"http://127.0.0.1:{port}", request_log)
    try:
        service.wait_for(lambda: sum(service.versions_served().values()) == workers,
                         f"{workers} workers serving a model", timeout=START_SECONDS)
    except BaseException:
        service.stop()
        raise
    return service
