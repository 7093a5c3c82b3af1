"""Which gunicorn worker serves the app: chosen in the master by service/gunicorn.conf.py, shown by /ready.

The event-loop worker (service/worker.py) is the default. gunicorn's stock gthread worker serves
instead when WEB_WORKER (or WEB_THREADS>1) chooses it, or, as a fallback with one warning, when the
installed gunicorn is not the one the event-loop worker was built for (`service.worker.check_gunicorn`).
gthread runs WEB_THREADS threads per worker, STOCK_THREADS when WEB_THREADS is unset.

The choice reaches the app in each worker through the environment, which a forked worker inherits:
the master sets FALLBACK_VARIABLE when it loads the config, and each worker sets CLASS_VARIABLE to
its own class after the fork (post_fork), so /ready shows the class that really serves, even when a
`-k` on the command line overrides the config.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass

from common import settings

EVENT_LOOP_WORKER = "service.worker.EventLoopWorker"
STOCK_WORKER = "gthread"
# gthread's threads when WEB_THREADS is unset. A new connection holds a gthread thread until it sends
# something (up to 5 s), so with one thread a single silent client would stall the whole worker.
STOCK_THREADS = 4
CLASS_VARIABLE = "SERVICE_WORKER_CLASS"
FALLBACK_VARIABLE = "SERVICE_WORKER_FALLBACK"


@dataclass(frozen=True)
class WorkerChoice:
    """What gunicorn.conf.py gives gunicorn as `worker_class` and `threads`, and why."""

    worker_class: str
    threads: int
    # Why the stock worker serves instead of the event-loop one (None: the event-loop one serves).
    fallback_reason: str | None = None
    # For the master's log, once: set only when the event-loop worker was wanted but cannot run.
    warning: str | None = None


def choose() -> WorkerChoice:
    """The worker for this server: the settings' choice, or gthread when the event-loop worker cannot run.

    Raises:
        SettingsError: WEB_WORKER or WEB_THREADS is invalid.
    """
    threads = settings.web_threads()
    stock_threads = threads if settings.read_str("WEB_THREADS") else STOCK_THREADS
    if settings.web_worker() == "gthread":
        chosen_by = "WEB_WORKER=gthread" if settings.read_str("WEB_WORKER") else f"WEB_THREADS={threads}"
        return WorkerChoice(STOCK_WORKER, stock_threads, f"{chosen_by} chooses gunicorn's stock gthread worker")
    problems = _event_loop_problems()
    if not problems:
        return WorkerChoice(EVENT_LOOP_WORKER, threads)
    reason = "; ".join(problems)
    return WorkerChoice(STOCK_WORKER, stock_threads, reason,
                        warning=f"the event-loop worker (service/worker.py) cannot run on this gunicorn: {reason}. "
                                "Serving with gunicorn's stock gthread worker instead; set WEB_WORKER=gthread to "
                                "choose it without this warning")


def _event_loop_problems() -> list[str]:
    try:
        worker = importlib.import_module("service.worker")
    except Exception as exc:  # whatever gunicorn moved, the answer is the same: fall back
        return [f"service.worker cannot be imported ({type(exc).__name__}: {exc})"]
    return worker.check_gunicorn()


def publish(choice: WorkerChoice) -> None:
    """In the master, before the workers fork: pass the fallback reason on to them."""
    os.environ[FALLBACK_VARIABLE] = choice.fallback_reason or ""


def record_worker(worker: object) -> None:
    """In each worker, after the fork: note its class for /ready."""
    cls = type(worker)
    os.environ[CLASS_VARIABLE] = f"{cls.__module__}.{cls.__qualname__}"


def describe() -> dict[str, str | None]:
    """For /ready: the worker class serving this request and why it is not the default (None outside gunicorn)."""
    return {"class": os.environ.get(CLASS_VARIABLE) or None,
            "fallback_reason": os.environ.get(FALLBACK_VARIABLE) or None}
