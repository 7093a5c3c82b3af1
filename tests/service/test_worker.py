"""The event-loop worker's check of gunicorn's internals, and the choice of worker it drives.

The failing cases are built as stand-in gthread modules passed to `check_gunicorn`; the real
gunicorn module is never changed.
"""

from __future__ import annotations

import runpy
import sys
import types

import pytest
from gunicorn.workers import gthread

from common import settings
from common.paths import REPO_ROOT
from service import worker, worker_choice

CONFIG = REPO_ROOT / "service" / "gunicorn.conf.py"


def gthread_like(**classes: type | None) -> types.ModuleType:
    """A stand-in for gunicorn.workers.gthread: its ThreadWorker and TConn unless replaced (None: absent)."""
    module = types.ModuleType("gthread_stand_in")
    for name in ("ThreadWorker", "TConn"):
        cls = classes.get(name, getattr(gthread, name))
        if cls is not None:
            setattr(module, name, cls)
    return module


def without(cls: type, name: str) -> type:
    """A copy of `cls` without the method `name` (inherited methods stay)."""
    return type(cls.__name__, cls.__bases__, {k: v for k, v in vars(cls).items() if k != name})


def test_the_check_passes_on_the_installed_gunicorn():
    assert worker.check_gunicorn() == []


def test_the_check_names_a_method_gthread_no_longer_has():
    problems = worker.check_gunicorn(module=gthread_like(ThreadWorker=without(gthread.ThreadWorker,
                                                                               "on_pending_socket_readable")))
    assert problems == ["ThreadWorker.on_pending_socket_readable is missing"]


def test_the_check_names_a_method_whose_parameters_changed():
    class ForceAware(gthread.ThreadWorker):  # as gunicorn 27.0 has it
        def murder_keepalived(self, force=False):
            pass

    problems = worker.check_gunicorn(module=gthread_like(ThreadWorker=ForceAware))
    assert problems == ["ThreadWorker.murder_keepalived takes (self, force), expected (self)"]


def test_the_check_names_an_attribute_gthread_no_longer_sets():
    class NoPendingQueue(gthread.ThreadWorker):
        def __init__(self, *args, **kwargs):
            gthread.base.Worker.__init__(self, *args, **kwargs)
            self.keepalived_conns = gthread.deque()
            self.nr_conns = 0

    problems = worker.check_gunicorn(module=gthread_like(ThreadWorker=NoPendingQueue))
    assert problems == ["ThreadWorker.__init__ no longer uses pending_conns"]


def test_the_check_names_a_missing_class():
    assert worker.check_gunicorn(module=gthread_like(TConn=None)) == ["gunicorn.workers.gthread has no class TConn"]


@pytest.mark.parametrize("version", [(26, 1, 0), (27, 0, 1), (25, 3, 0)])
def test_the_check_refuses_a_gunicorn_outside_its_versions(version):
    (problem,) = worker.check_gunicorn(version=version)
    dotted = ".".join(map(str, version))
    assert problem == f"gunicorn {dotted} is not in the versions this worker was built for (>=26.2.0, <26.3)"


def test_the_check_accepts_a_patch_release_of_the_pinned_gunicorn():
    assert worker.check_gunicorn(version=(26, 2, 0)) == worker.check_gunicorn(version=(26, 2, 3)) == []


# --- the choice (service/worker_choice.py) ----------------------------------------------------------


@pytest.fixture
def serving_env(monkeypatch):
    """No serving variables set; whatever a test or the config sets is removed afterwards."""
    for name in ("WEB_WORKER", "WEB_THREADS", "API_TOKEN", "API_TOKEN_FILE", worker_choice.FALLBACK_VARIABLE,
                 worker_choice.CLASS_VARIABLE):
        monkeypatch.setenv(name, "")  # remembers the original, so the teardown restores it
        monkeypatch.delenv(name)
    return monkeypatch


def test_the_event_loop_worker_serves_by_default(serving_env):
    assert worker_choice.choose() == worker_choice.WorkerChoice("service.worker.EventLoopWorker", threads=1)


@pytest.mark.parametrize(("variables", "chosen_by", "threads"), [
    ({"WEB_WORKER": "gthread"}, "WEB_WORKER=gthread", 4),
    ({"WEB_WORKER": "GThread", "WEB_THREADS": "2"}, "WEB_WORKER=gthread", 2),
    ({"WEB_THREADS": "8"}, "WEB_THREADS=8", 8),
])
def test_the_stock_gthread_worker_serves_when_chosen_without_a_warning(serving_env, variables, chosen_by, threads):
    for name, value in variables.items():
        serving_env.setenv(name, value)
    choice = worker_choice.choose()
    assert (choice.worker_class, choice.threads, choice.warning) == ("gthread", threads, None)
    assert choice.fallback_reason == f"{chosen_by} chooses gunicorn's stock gthread worker"


@pytest.mark.parametrize(("variables", "message"), [
    ({"WEB_WORKER": "sync"}, "WEB_WORKER='sync' is neither event-loop nor gthread"),
    ({"WEB_WORKER": "event-loop", "WEB_THREADS": "4"}, "WEB_WORKER=event-loop serves requests on one thread"),
])
def test_a_worker_setting_that_cannot_be_honoured_is_refused(serving_env, variables, message):
    for name, value in variables.items():
        serving_env.setenv(name, value)
    with pytest.raises(settings.SettingsError, match=message):
        settings.web_worker()


def test_gthread_serves_with_a_warning_when_the_check_fails(serving_env):
    serving_env.setattr(worker, "GUNICORN_VERSIONS", ((27,), (28,)))
    choice = worker_choice.choose()
    assert (choice.worker_class, choice.threads) == ("gthread", worker_choice.STOCK_THREADS)
    assert choice.fallback_reason == "gunicorn 26.2.0 is not in the versions this worker was built for (>=27, <28)"
    assert choice.warning.startswith("the event-loop worker (service/worker.py) cannot run on this gunicorn: "
                                     f"{choice.fallback_reason}. Serving with gunicorn's stock gthread worker")


def test_gthread_serves_with_a_warning_when_the_worker_cannot_even_be_imported(serving_env):
    serving_env.setitem(sys.modules, "service.worker", None)  # what an ImportError inside it looks like
    choice = worker_choice.choose()
    assert choice.worker_class == "gthread"
    assert choice.fallback_reason.startswith("service.worker cannot be imported (ModuleNotFoundError: ")
    assert choice.warning


def test_the_gunicorn_config_falls_back_to_gthread_and_warns_once_at_start(serving_env):
    serving_env.setattr(worker, "GUNICORN_VERSIONS", ((27,), (28,)))
    config = runpy.run_path(str(CONFIG))
    assert (config["worker_class"], config["threads"]) == ("gthread", worker_choice.STOCK_THREADS)
    reason = config["_worker"].fallback_reason
    assert "gunicorn 26.2.0 is not in the versions" in reason
    # Passed on to the workers, which inherit the master's environment.
    assert worker_choice.describe() == {"class": None, "fallback_reason": reason}

    class Log:
        def __init__(self):
            self.lines = []

        def warning(self, message, *args):
            self.lines.append(("warning", message % args))

        def error(self, message, *args):
            self.lines.append(("error", message % args))

    server = types.SimpleNamespace(log=Log())
    with pytest.raises(SystemExit):  # no API token: on_starting stops right after the warning
        config["on_starting"](server)
    assert [text for level, text in server.log.lines if level == "warning"] == [config["_worker"].warning]


def test_the_gunicorn_config_picks_the_event_loop_worker_on_this_gunicorn(serving_env):
    config = runpy.run_path(str(CONFIG))
    assert config["worker_class"] == "service.worker.EventLoopWorker" and config["_worker"].warning is None
    assert worker_choice.describe()["fallback_reason"] is None


def test_each_worker_records_its_own_class(serving_env):
    worker_choice.record_worker(object.__new__(worker.EventLoopWorker))
    assert worker_choice.describe()["class"] == "service.worker.EventLoopWorker"
