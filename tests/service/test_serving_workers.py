"""A real gunicorn with each of its two workers: the event-loop worker, and gunicorn's stock gthread
worker as the fallback when the event-loop worker's check of gunicorn fails. Each shows /ready which
worker serves.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import pytest
import requests

from common.paths import REPO_ROOT
from tests.helpers.processes import Server, clean_env, free_port, http_ok, start, wait_until
from tests.helpers.service import AUTH, TOKEN

pytestmark = pytest.mark.slow

MAX_BODY_BYTES = 128 * 1024
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
