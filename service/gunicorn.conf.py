"""gunicorn settings for the service, used alike by `make run` (service/launch.py) and the Docker image:

    gunicorn -c service/gunicorn.conf.py "service.app:create_app()"

Run from the repository root (gunicorn puts the working directory on sys.path first). Settings come
from the environment (HOST, PORT, WEB_CONCURRENCY, WEB_WORKER, WEB_THREADS, CLIENT_TIMEOUT,
KEEPALIVE_REQUESTS, LOG_LEVEL; see the README); gunicorn's own flags and GUNICORN_CMD_ARGS still
override them, e.g. `--access-logfile -` for an access log.

The app is created in each worker after fork (no preload_app): the model, the poller thread and the
database engine belong to one worker, and the master never loads a model. The master only imports
the libraries, once, so that workers boot fast.
"""

from __future__ import annotations

import gc
import importlib
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from common import settings
from service import connection, worker_choice

wsgi_app = "service.app:create_app()"
bind = [f"{settings.host()}:{settings.port()}"]
workers = settings.web_concurrency()
# The event-loop worker serves a readable connection at once in its own thread, without gthread's
# hand-offs to a pool or a sync worker's unbounded wait on idle ones: docs/decisions/001-event-loop-worker.md.
# gthread when WEB_WORKER or WEB_THREADS>1 chooses it, or as a fallback (service/worker_choice.py).
_worker = worker_choice.choose()
worker_class = _worker.worker_class
threads = _worker.threads
worker_choice.publish(_worker)
# Read here so that a bad value stops the server at start; each EventLoopWorker reads it again.
_client_timeout = settings.client_timeout()
# Closing a connection after KEEPALIVE_REQUESTS requests spreads busy kept-alive connections over the
# workers as their clients reconnect: docs/decisions/001-event-loop-worker.md.
_keepalive_requests = settings.keepalive_requests()
preload_app = False
timeout = 30
graceful_timeout = 20
keepalive = 5
# gunicorn 25+ opens a control socket under $HOME by default; several servers on one machine (tests,
# benchmarks) would fight over it, and the service does not use it.
control_socket_disable = True
errorlog = "-"
loglevel = settings.log_level()
accesslog = None
proc_name = "fraud-detection"

# Set by on_starting when this server made the metrics folder itself (and so removes it at exit).
_created_metrics_dir: list[str] = []


def on_starting(server):
    """In the master, before any worker: say why the event-loop worker cannot serve, if so; refuse to
    start without a token; prepare shared metrics."""
    if _worker.warning:
        server.log.warning("%s", _worker.warning)
    try:
        tokens = settings.api_tokens()
    except settings.SettingsError as exc:
        server.log.error("%s", exc)
        sys.exit(1)
    if not tokens:
        server.log.error("no API token configured: set API_TOKEN (comma-separated for several) or API_TOKEN_FILE "
                         "(one per line); `make run` creates one in .api_token. Refusing to start.")
        sys.exit(1)
    # Workers inherit the environment, and prometheus_client reads this variable when a worker first
    # imports it (after fork), so every worker writes its metrics to files in this folder.
    path = settings.prometheus_multiproc_dir()
    if path:
        Path(path).mkdir(parents=True, exist_ok=True)
        for stale in Path(path).glob("*.db"):
            stale.unlink()
    else:
        path = tempfile.mkdtemp(prefix="fraud-metrics-")
        _created_metrics_dir.append(path)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
    # A registry behind HTTP would otherwise be retried for minutes per call by MLflow's defaults;
    # the poller tries again at its next interval anyway.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    server.log.info("metrics shared across workers in %s", path)
    _import_libraries(server)


# Imported once in the master, after PROMETHEUS_MULTIPROC_DIR is set, so that each forked worker
# starts in about a second instead of repeating ~10 s of imports (and shares their memory). Only
# modules: the app, the model, database engines and threads are still created per worker after fork.
# Not onnxruntime: its native runtime does not survive fork (workers abort at exit), so each worker
# imports it itself when it loads the model.
_LIBRARIES = ("service.app", "sklearn.ensemble", "skops.io", "mlflow.sklearn",
              "mlflow.store.tracking.sqlalchemy_store", "mlflow.store.model_registry.sqlalchemy_store")


def _import_libraries(server) -> None:
    started = time.perf_counter()
    for module in _LIBRARIES:
        importlib.import_module(module)
    server.log.info("libraries imported in %.1f s", time.perf_counter() - started)


def pre_request(worker, req):
    """Close the client's connection after this response once it has carried KEEPALIVE_REQUESTS;
    let the app close it too (service/connection.py)."""
    if _keepalive_requests and req.req_number >= _keepalive_requests:
        req.must_close = True
    connection.serving(req)


def post_fork(server, worker):
    """In each new worker: note its class for /ready; send the service's log lines where gunicorn's
    error log goes."""
    import logging

    worker_choice.record_worker(worker)

    service_log = logging.getLogger("service")
    service_log.handlers = list(server.log.error_log.handlers)
    service_log.setLevel(server.log.error_log.level)
    service_log.propagate = False


def post_worker_init(worker):
    """The app is loaded: exclude everything alive now (libraries, the model) from the cycle
    collector's scans, so its occasional full collections stay short instead of walking ~10^6
    long-lived objects in the middle of a request."""
    gc.freeze()


def child_exit(server, worker):
    """A worker died: drop its live gauges so /metrics reports only live workers."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def on_exit(server):
    for path in _created_metrics_dir:
        shutil.rmtree(path, ignore_errors=True)
