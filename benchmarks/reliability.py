"""Reliability and security scenarios against the real service: load, faults, hostile input, fuzzing.

One harness, two callers. tests/reliability runs every scenario small (a few clients for a few
seconds, a few fuzz examples) in `make test`; `make reliability` (`python -m benchmarks.reliability`)
runs heavier versions and prints one table.

Every scenario starts what it needs itself, on loopback and free ports: gunicorn with
service/gunicorn.conf.py and at least 2 workers, a throwaway PostgreSQL cluster, an `mlflow server`.
Its loops are bounded by count and by time, and everything it started is stopped when it returns
or fails. It returns a `Result`: what was done (requests, faults, inputs) and `problems`, one line
per broken promise; an empty list means the scenario held.

The promise checked everywhere: a row the service reported as scored (its `request_id` came back
in a 200) is in the request log, and the log holds no row that no answer accounts for.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import http.client
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import requests

from common.paths import REPO_ROOT
from common.registry import move_to_stage
from common.schema import FEATURES, LABEL
from common.sqlite_writer import SQLITE_BUSY_TIMEOUT_MS
from common.store import RequestStore
from service.request_log import WRITE_RETRIES
from tests.helpers import processes
from tests.helpers.builders import MlflowStore
from tests.helpers.service import ServingRegistry, parse_metrics

TOKEN = "reliability-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
WORKERS = 2
MAX_ROWS = 5000
MAX_BODY_BYTES = 4 * 1024 * 1024
POLL_SECONDS = 0.2
# Generous: on a busy 2-core machine gunicorn's master imports MLflow and scikit-learn first.
START_SECONDS = 180.0
CLIENT_TIMEOUT = 60.0
# Fault scenarios keep their load running until the fault's effects are seen, at most this much longer.
SLACK_SECONDS = 120.0
# No process started here may reach beyond loopback: MLflow would otherwise send usage telemetry
# from every process that imports it (it stays quiet on its own only under pytest or in CI).
OFFLINE = {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}
SCHEMATHESIS_HOOKS = REPO_ROOT / "tests" / "helpers" / "schemathesis_hooks.py"
GUNICORN = [sys.executable, "-m", "gunicorn", "-c", "service/gunicorn.conf.py", "service.app:create_app()"]
# The request log's retry budget on a locked SQLite file: each attempt waits out the busy timeout,
# with 50 ms and 100 ms of backoff between attempts (common/store.py, service/request_log.py).
SQLITE_RETRY_SECONDS = (WRITE_RETRIES + 1) * SQLITE_BUSY_TIMEOUT_MS / 1000 + 0.05 * (2**WRITE_RETRIES - 1)
# SQLite's busy handler adds up its planned sleeps rather than reading the clock, so on a busy CPU
# the budget stretches in wall time. A 503 later than this means the wait is not bounded: it grows
# with the number of writers queued on the log (8 request threads: over a minute before the fix).
SQLITE_LOCK_LIMIT = 3 * SQLITE_RETRY_SECONDS


# --- results ---------------------------------------------------------------------------------------------


@dataclass
class Result:
    """What one scenario did, and every promise it found broken."""

    scenario: str
    load: str = "-"
    requests: int = 0
    errors: int = 0
    faults: int = 0
    inputs: int = 0
    rows_lost: int | None = None
    notes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    skipped: str | None = None
    server_output: str = field(default="", repr=False)
    steps: list[str] = field(default_factory=list, repr=False)
    began: float = field(default_factory=time.monotonic, repr=False)

    @property
    def ok(self) -> bool:
        return not self.problems

    def step(self, what: str) -> None:
        """Note a step with its time since the start (stderr, and the failure report)."""
        line = f"{time.monotonic() - self.began:6.1f} s  {what}"
        self.steps.append(line)
        print(f"  [{self.scenario}] {line}", file=sys.stderr, flush=True)

    def expect(self, condition: bool, problem: str) -> bool:
        if not condition:
            self.problems.append(problem)
        return condition

    def explain(self) -> str:
        lines = [f"{self.scenario}: {len(self.problems)} problem(s)", *(f"  - {p}" for p in self.problems),
                 *(f"  note: {n}" for n in self.notes)]
        if self.problems:
            lines += ["  steps:", *(f"    {s}" for s in self.steps)]
        if self.problems and self.server_output:
            lines += ["  server output (end):", self.server_output[-4000:]]
        return "\n".join(lines)


def table(results: list[Result]) -> str:
    """The one table `make reliability` prints."""
    header = ("scenario", "load held (clients × s)", "requests", "errors", "faults survived", "inputs tried",
              "rows lost", "result")
    body = []
    for r in results:
        verdict = f"skipped: {r.skipped}" if r.skipped else ("ok" if r.ok else f"FAILED ({len(r.problems)})")
        body.append((r.scenario, r.load, f"{r.requests:,}", f"{r.errors:,}", str(r.faults), f"{r.inputs:,}",
                     "-" if r.rows_lost is None else str(r.rows_lost), verdict))
    ran = [r for r in results if not r.skipped]
    lost = sum(r.rows_lost or 0 for r in ran)
    body.append(("total", "", f"{sum(r.requests for r in ran):,}", f"{sum(r.errors for r in ran):,}",
                 str(sum(r.faults for r in ran)), f"{sum(r.inputs for r in ran):,}", str(lost),
                 "ok" if all(r.ok for r in ran) and lost == 0 else "FAILED"))
    widths = [max(len(row[i]) for row in (header, *body)) for i in range(len(header))]

    def line(row):
        return "  ".join(cell.ljust(w) if i in (0, 1, 7) else cell.rjust(w)
                         for i, (cell, w) in enumerate(zip(row, widths, strict=True)))

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), rule, *(line(row) for row in body[:-1]), rule, line(body[-1])])


# --- the world a scenario serves ---------------------------------------------------------------------------


@dataclass(frozen=True)
class World:
    """A registry with version 1 in Production and version 2 ready to promote, and rows to score."""

    registry: ServingRegistry
    rows: list[list[float]]

    @classmethod
    def of(cls, registry: ServingRegistry, n_rows: int = 50) -> World:
        """Real rows from the registry's reference data, frauds first, so both decisions occur."""
        store = RequestStore(str(registry.data.db), create=False)
        try:
            frame = store.read_frame((*FEATURES, LABEL)).sort_values(LABEL, ascending=False, kind="stable")
        finally:
            store.dispose()
        return cls(registry, frame[list(FEATURES)].head(n_rows).to_numpy().tolist())

    @property
    def name(self) -> str:
        return self.registry.name

    def private_registry(self, dest: Path) -> MlflowStore:
        """A copy of the registry this scenario may promote in (artifacts shared read-only)."""
        return self.registry.copy(dest)


def build_world(root: Path) -> World:
    """Generate reference data, train two tiny versions and promote the first (as the test fixtures do)."""
    from tests.helpers.builders import build_reference_data, new_mlflow_store, train_model

    data = build_reference_data(root / "reference")
    store = new_mlflow_store(root / "registry")
    v1, v2 = train_model(store, data, seed=0), train_model(store, data, seed=1)
    move_to_stage(store.client(), v1.name, v1.version, "Production")
    return World.of(ServingRegistry(store, data, v1, v2))


# --- the service under test --------------------------------------------------------------------------------


@dataclass
class Service:
    """A running gunicorn (master and workers) on a loopback port."""

    server: processes.Server
    url: str
    request_log: str

    @property
    def master(self) -> int:
        return self.server.process.pid

    def workers(self) -> list[int]:
        """Pids of the master's live worker processes."""
        return sorted(children(self.master))

    def rss_mb(self, field: str = "VmRSS") -> dict[int, float]:
        return {pid: rss_mb(pid, field) for pid in self.workers()}

    def metrics(self) -> dict:
        response = requests.get(f"{self.url}/metrics", headers=AUTH, timeout=10)
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
        response = requests.get(f"{self.url}/ready", timeout=10)
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

    def store(self) -> RequestStore:
        return RequestStore(self.request_log, create=False)

    def logged(self, columns: tuple[str, ...] = ("request_id",)):
        store = self.store()
        try:
            return store.read_frame(columns)
        finally:
            store.dispose()

    def logged_ids(self) -> set[str]:
        return set(self.logged()["request_id"])

    def count(self, *, labelled: bool | None = None) -> int:
        store = self.store()
        try:
            return store.count(labelled=labelled)
        finally:
            store.dispose()

    def output(self) -> str:
        return self.server.log.read_text(errors="replace") if self.server.log.exists() else ""


def children(pid: int) -> set[int]:
    """Pids whose parent is `pid` (read from /proc)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name may hold spaces and parentheses; the fields after its last ')' do not.
        fields = stat[stat.rindex(")") + 2:].split()
        if fields[0] != "Z" and int(fields[1]) == pid:
            found.add(int(entry.name))
    return found


def busy_worker(service: Service, timeout: float = 2.0) -> int:
    """A worker caught serving requests, else the first one.

    A worker holds the listening socket it shares with the master, and one more socket per client
    connection it has accepted (the SQLite request log and registry use none).
    """
    listening = socket_inodes(service.master)
    workers = service.workers()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for pid in workers:
            if socket_inodes(pid) - listening:
                return pid
        time.sleep(0.0005)
    return workers[0]


def wait_gone(pid: int, timeout: float = 10.0) -> float:
    """Wait until a killed process has released its sockets (it is a zombie or gone); return when.

    SIGKILL takes effect a little after kill() returns; until then the worker may still accept."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            break
        if stat[stat.rindex(")") + 2] in "ZX":
            break
        time.sleep(0.001)
    return time.monotonic()


def socket_inodes(pid: int) -> set[int]:
    found = set()
    with contextlib.suppress(OSError):
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    found.add(int(target[8:-1]))
    return found


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    """Resident memory of a process in MB: now (VmRSS), or its peak so far (VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return 0.0


@contextlib.contextmanager
def serving(world: World, workdir: Path, *, name: str = "service", tracking_uri: str | None = None,
            request_log: str | None = None, workers: int = WORKERS, **env: str) -> Iterator[Service]:
    """gunicorn with the project's config, waited on until every worker serves a model; always stopped."""
    port = processes.free_port()
    request_log = request_log or str(workdir / f"{name}-requests.db")
    server_env = processes.clean_env(
        HOST="127.0.0.1", PORT=str(port), WEB_CONCURRENCY=str(workers), MODEL_POLL_SECONDS=str(POLL_SECONDS),
        API_TOKEN=TOKEN, MLFLOW_TRACKING_URI=tracking_uri or world.registry.store.tracking_uri,
        MODEL_NAME=world.name, LATEST_DB=request_log, FEATURE_CONFIG=str(world.registry.data.feature_config),
        MAX_ROWS=str(MAX_ROWS), MAX_BODY_BYTES=str(MAX_BODY_BYTES), MALLOC_ARENA_MAX="2", **OFFLINE, **env)
    server = processes.start(name, GUNICORN, env=server_env, cwd=REPO_ROOT, log_dir=workdir)
    service = Service(server, f"http://127.0.0.1:{port}", request_log)
    try:
        service.wait_for(lambda: sum(service.versions_served().values()) == workers,
                         f"{workers} workers serving a model", timeout=START_SECONDS)
        yield service
    finally:
        server.stop()


# --- load ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """One request as its client saw it; status None when no answer came (reset, timeout)."""

    client: int
    started: float
    ended: float
    status: int | None
    code: str | None = None  # the JSON error code, or the exception's name when no answer came
    ids: tuple[str, ...] = ()  # the row ids a 200 reported as scored
    version: str | None = None
    request_id: str | None = None  # X-Request-ID, on errors too

    @property
    def ok(self) -> bool:
        return self.status == 200

    def in_flight(self, moment: float) -> bool:
        return self.started <= moment <= self.ended


class Load:
    """`clients` threads posting /predict (1 to 3 rows each) until stopped, `seconds` pass, or
    `max_requests` are sent, whichever comes first. Use as a context manager: it always stops.

    Each client keeps its connection alive, as requests.Session does, unless `keep_alive` is off:
    then every request opens its own connection, so it is in flight exactly from its start to its
    answer (an idle kept-alive connection to a killed worker would fail the next request sent on it).
    """

    def __init__(self, url: str, rows: list[list[float]], *, clients: int, seconds: float,
                 max_requests: int = 1_000_000, timeout: float = CLIENT_TIMEOUT, keep_alive: bool = True):
        self.host, port = url.removeprefix("http://").split(":")
        self.port = int(port)
        self.rows, self.clients, self.seconds, self.timeout = rows, clients, seconds, timeout
        self.keep_alive = keep_alive
        self._budget = max_requests
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._outcomes: list[Outcome] = []
        self.started = self.deadline = 0.0
        self.stopped: float | None = None

    def __enter__(self) -> Load:
        self.started = time.monotonic()
        self.deadline = self.started + self.seconds
        self._threads = [threading.Thread(target=self._client, args=(i,), name=f"load-{i}", daemon=True)
                         for i in range(self.clients)]
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    @property
    def outcomes(self) -> list[Outcome]:
        with self._lock:
            return list(self._outcomes)

    def stop(self) -> list[Outcome]:
        self._stop.set()
        return self.wait()

    def wait(self) -> list[Outcome]:
        """Wait for the clients to finish (each stops at the deadline, or after its last request)."""
        for thread in self._threads:
            thread.join(max(0.0, self.deadline - time.monotonic()) + self.timeout + 5)
        if self.stopped is None:
            self.stopped = time.monotonic()
        return self.outcomes

    @property
    def elapsed(self) -> float:
        return (self.stopped or time.monotonic()) - self.started

    def sleep_until(self, moment: float) -> None:
        self._stop.wait(max(0.0, min(moment, self.deadline) - time.monotonic()))

    def wait_for(self, condition: Callable[[list[Outcome]], bool], what: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not condition(self.outcomes):
            if time.monotonic() > deadline:
                raise AssertionError(f"no {what} within {timeout:g} s: {summary(self.outcomes)}")
            time.sleep(0.05)

    def _take(self) -> bool:
        with self._lock:
            if self._budget <= 0:
                return False
            self._budget -= 1
            return True

    def _client(self, index: int) -> None:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        headers = {"Content-Type": "application/json", **AUTH}
        if not self.keep_alive:
            headers["Connection"] = "close"
        sent = 0
        while not self._stop.is_set() and time.monotonic() < self.deadline and self._take():
            n = 1 + sent % 3
            first = (index * 7 + sent) % len(self.rows)
            body = json.dumps({"data": [self.rows[(first + k) % len(self.rows)] for k in range(n)]})
            sent += 1
            started = time.monotonic()
            try:
                conn.request("POST", "/predict", body, headers)
                response = conn.getresponse()
                payload, status = response.read(), response.status
                request_id = response.getheader("X-Request-ID")
            except (OSError, http.client.HTTPException) as exc:
                conn.close()
                self._record(Outcome(index, started, time.monotonic(), None, type(exc).__name__))
                self._stop.wait(0.05)  # do not spin while the server is away
                continue
            ended = time.monotonic()
            try:
                answer = json.loads(payload)
            except ValueError:
                answer = {}
            if status == 200:
                self._record(Outcome(index, started, ended, status, None, tuple(answer.get("request_id", ())),
                                     str(answer.get("model_version")), request_id))
            else:
                error = answer.get("error") if isinstance(answer, dict) else None
                code = error.get("code") if isinstance(error, dict) else None
                shaped = isinstance(code, str) and is_error_shape(answer, code)
                self._record(Outcome(index, started, ended, status, code if shaped else "not the JSON error shape",
                                     request_id=request_id))
        conn.close()

    def _record(self, outcome: Outcome) -> None:
        with self._lock:
            self._outcomes.append(outcome)


def scored_ids(outcomes: list[Outcome]) -> set[str]:
    return {rid for o in outcomes if o.ok for rid in o.ids}


def is_error_shape(answer: object, code: str) -> bool:
    """`{"error": {"code": code, "message": "..."}}` and nothing else: the service's one error shape."""
    return (isinstance(answer, dict) and set(answer) == {"error"} and isinstance(answer["error"], dict)
            and set(answer["error"]) == {"code", "message"} and answer["error"]["code"] == code
            and isinstance(answer["error"]["message"], str) and bool(answer["error"]["message"]))


def summary(outcomes: list[Outcome]) -> str:
    counts = Counter("ok" if o.ok else f"{o.status} {o.code}" for o in outcomes)
    return ", ".join(f"{k}: {v}" for k, v in counts.most_common()) or "no requests"


def account(result: Result, outcomes: list[Outcome], logged: set[str], *, exact: bool) -> None:
    """Check the request log against what clients were told.

    Every row reported as scored must be logged. With `exact`, nothing else may be logged; without,
    a logged row nobody was told about must belong to a request that failed (a worker killed after
    its commit, a commit whose acknowledgement was lost) and there can be no more such requests
    than failures without a complete answer.
    """
    scored = scored_ids(outcomes)
    lost = scored - logged
    result.rows_lost = len(lost)
    result.expect(not lost, f"{len(lost)} rows reported as scored are missing from the request log, "
                            f"e.g. {sorted(lost)[:3]}")
    extra = logged - scored
    if exact:
        result.expect(not extra, f"{len(extra)} logged rows were never reported as scored, e.g. {sorted(extra)[:3]}")
        return
    failed_ids = {o.request_id for o in outcomes if not o.ok and o.request_id}
    unexplained = {rid.rsplit("-", 1)[0] for rid in extra} - failed_ids
    unanswered = sum(1 for o in outcomes if not o.ok and o.request_id is None)
    result.expect(len(unexplained) <= unanswered,
                  f"{len(unexplained)} requests left rows in the log that no answer accounts for "
                  f"(only {unanswered} requests failed without an answer)")
    if extra:
        result.notes.append(f"{len(extra)} rows logged by requests whose answer was lost (not reported as scored)")


def fill_load(result: Result, outcomes: list[Outcome], load: Load) -> None:
    result.load = f"{load.clients} × {load.elapsed:.0f}"
    result.requests = len(outcomes)
    result.errors = sum(1 for o in outcomes if not o.ok)


def integrity_check(path: str) -> str:
    conn = sqlite3.connect(path)
    try:
        return ", ".join(row[0] for row in conn.execute("PRAGMA integrity_check"))
    finally:
        conn.close()


# --- 1, 2: load, with or without killed workers ------------------------------------------------------------


def load_scenario(world: World, workdir: Path, *, clients: int, seconds: float, kills: int = 0) -> Result:
    """K clients for T seconds against 2 workers with the SQLite request log on; `kills` workers are
    killed with SIGKILL, evenly spread over the run.

    Without kills: every answer is a 200 and the log holds exactly the rows reported as scored.
    With kills: the master replaces each worker, requests keep succeeding, the only failures are
    requests in flight at a kill (from kill() until the worker is gone; clients use a connection per
    request, see `Load`), the SQLite file passes `PRAGMA integrity_check`, and every row reported as
    scored is logged.
    """
    result = Result("load" if not kills else f"worker kill -9 (×{kills})")
    with serving(world, workdir, name="crash" if kills else "load") as service:
        result.step("service up")
        kill_times: list[tuple[float, float]] = []
        with Load(service.url, world.rows, clients=clients, seconds=seconds + (SLACK_SECONDS if kills else 0),
                  keep_alive=not kills) as load:
            for k in range(kills):
                load.sleep_until(load.started + seconds * (k + 1) / (kills + 1))
                since = kill_times[-1][1] if kill_times else 0.0
                load.wait_for(lambda o, t=since: sum(x.ok and x.started > t for x in o) >= clients,
                              "successful requests before the kill")
                victim = busy_worker(service)
                before = time.monotonic()
                os.kill(victim, signal.SIGKILL)
                kill_times.append((before, wait_gone(victim)))
                result.step(f"worker {victim} killed")
                service.wait_for(lambda v=victim: len(w := service.workers()) == WORKERS and v not in w,
                                 "the master to replace the killed worker")
                service.wait_for(lambda: sum(service.versions_served().values()) == WORKERS,
                                 "the new worker to load the model")
                result.step("its replacement serves")
            if kills:
                # On for at least `seconds`, and for a while with the replacement serving.
                load.sleep_until(max(load.started + seconds, time.monotonic() + 2.0))
                outcomes = load.stop()
            else:
                outcomes = load.wait()
        logged = service.logged_ids()
        result.server_output = service.output()
    fill_load(result, outcomes, load)
    result.faults = len(kill_times)
    failures = [o for o in outcomes if not o.ok]
    result.expect(len(outcomes) > 0, "no request was sent")
    if not kills:
        result.expect(not failures, f"{len(failures)} requests failed: {summary(failures)}")
        account(result, outcomes, logged, exact=True)
        return result

    def at_a_kill(o: Outcome) -> bool:
        return any(o.started <= after and o.ended >= before for before, after in kill_times)

    in_flight = sum(at_a_kill(o) for o in outcomes)
    stray = [o for o in failures if not at_a_kill(o)]
    result.expect(not stray, f"{len(stray)} of {len(failures)} failures were not in flight at a kill "
                             f"({in_flight} requests were): {summary(stray)}")
    answered_errors = [o for o in failures if o.status is not None]
    result.expect(not answered_errors, f"a killed worker's requests get no answer, not an error: "
                                       f"{summary(answered_errors)}")
    last_kill = kill_times[-1][1] if kill_times else 0.0
    after = [o for o in outcomes if o.started > last_kill]
    result.expect(sum(o.ok for o in after) > 0 and all(o.ok for o in after),
                  f"after the last kill: {summary(after)}; expected only 200s")
    check = integrity_check(service.request_log)
    result.expect(check == "ok", f"PRAGMA integrity_check says {check!r}")
    result.notes.append(f"{len(failures)} failures, {in_flight} requests in flight at the kills")
    account(result, outcomes, logged, exact=False)
    return result


# --- 8: hot swap under load ------------------------------------------------------------------------------------


def hot_swap(world: World, workdir: Path, *, clients: int, seconds: float) -> Result:
    """Promote version 2 while the load runs: no failed request; responses move from version 1 to 2;
    once every worker serves 2, every request gets 2; each logged row names the version that scored it."""
    result = Result("hot swap under load")
    store = world.private_registry(workdir / "swap-registry")
    old, new = world.registry.v1.version, world.registry.v2.version
    with serving(world, workdir, name="swap", tracking_uri=store.tracking_uri) as service:
        result.step("service up")
        with Load(service.url, world.rows, clients=clients, seconds=seconds + SLACK_SECONDS) as load:
            load.sleep_until(load.started + seconds / 3)
            load.wait_for(lambda o: sum(x.ok for x in o) >= clients, "successful requests before the promotion")
            promoted = time.monotonic()
            move_to_stage(store.client(), world.name, new, "Production")
            result.step(f"version {new} promoted")
            service.wait_for(lambda: service.versions_served() == {new: WORKERS},
                             "every worker to serve the new version")
            all_new = time.monotonic()
            result.step(f"every worker serves version {new}")
            load.wait_for(lambda o: sum(x.started > all_new for x in o) >= clients, "requests after the swap")
            load.sleep_until(max(load.started + seconds, all_new + 1.0))
            outcomes = load.stop()
        logged = service.logged(("request_id", "model_version"))
        result.server_output = service.output()
    fill_load(result, outcomes, load)
    result.faults = 1
    failures = [o for o in outcomes if not o.ok]
    result.expect(not failures, f"{len(failures)} requests failed during the swap: {summary(failures)}")
    versions = Counter(o.version for o in outcomes if o.ok)
    result.expect(set(versions) == {old, new}, f"versions answered {dict(versions)}; expected {old} then {new}")
    before = {o.version for o in outcomes if o.ok and o.ended < promoted}
    result.expect(before <= {old}, f"before the promotion, versions {before} answered")
    late = Counter(o.version for o in outcomes if o.ok and o.started > all_new)
    result.expect(set(late) == {new}, f"once every worker served {new}, versions {dict(late)} answered")
    by_id = dict(zip(logged["request_id"], logged["model_version"], strict=True))
    mismatched = [rid for o in outcomes if o.ok for rid in o.ids if by_id.get(rid, o.version) != o.version]
    result.expect(not mismatched, f"{len(mismatched)} logged rows name another version than their response")
    result.notes.append(f"answers by version: {dict(versions)}")
    account(result, outcomes, set(by_id), exact=True)
    return result


# --- 3: request-log trouble ----------------------------------------------------------------------------------


def _store_outage_checks(result: Result, outcomes: list[Outcome], outage_ends: float, pids_before: list[int],
                         pids_after: list[int], *, expect_errors: bool) -> None:
    failures = [o for o in outcomes if not o.ok]
    wrong = [o for o in failures if (o.status, o.code) != (503, "request_log_unavailable")]
    result.expect(not wrong, f"while the request log was away, expected 503 request_log_unavailable only; got "
                             f"{summary(wrong)}")
    if expect_errors:
        result.expect(any(o.status == 503 for o in failures), "no request was answered 503 while the log was away")
    else:
        result.expect(not failures, f"a short outage within the retry budget failed requests: {summary(failures)}")
    late = [o for o in failures if o.started > outage_ends]
    result.expect(not late, f"{len(late)} requests started after the log was back still failed")
    after = [o for o in outcomes if o.started > outage_ends]
    result.expect(any(o.ok for o in after), "no request succeeded after the log was back")
    result.expect(pids_before == pids_after, f"the workers changed ({pids_before} -> {pids_after}): recovery "
                                             "needed a restart")
    if failures:
        slowest = max(o.ended - o.started for o in failures)
        result.notes.append(f"{len(failures)} answered 503; the slowest after {slowest:.1f} s")


def sqlite_writer_lock(world: World, workdir: Path, *, clients: int, hold_seconds: float | None = None,
                       settle_seconds: float = 3.0) -> Result:
    """Another connection holds the SQLite request log's write lock (BEGIN EXCLUSIVE).

    By default the lock is held until requests have waited out the retry budget and been answered
    503 request_log_unavailable, and released then: requests must get that 503 within
    SQLITE_LOCK_LIMIT seconds (a longer wait would be an unbounded retry). With `hold_seconds`
    shorter than the budget, requests just wait and succeed. Either way the same workers serve again
    once it is released, and no row reported as scored is lost.
    """
    result = Result("SQLite log held by another writer" if hold_seconds is None
                    else f"SQLite log held {hold_seconds:g} s")
    with serving(world, workdir, name="sqlite-lock") as service:
        result.step("service up")
        with Load(service.url, world.rows, clients=clients, seconds=SQLITE_LOCK_LIMIT + SLACK_SECONDS) as load:
            load.wait_for(lambda o: sum(x.ok for x in o) >= clients, "successful requests before the lock")
            pids_before = service.workers()
            holder = sqlite3.connect(service.request_log, timeout=30, isolation_level=None)
            try:
                holder.execute("BEGIN EXCLUSIVE")
                locked = time.monotonic()
                result.step("request log locked")
                if hold_seconds is None:
                    while time.monotonic() < locked + SQLITE_LOCK_LIMIT and not any(
                            o.status == 503 for o in load.outcomes):
                        time.sleep(0.05)
                else:
                    load.sleep_until(locked + hold_seconds)
                holder.execute("ROLLBACK")
            finally:
                holder.close()
            released = time.monotonic()
            result.step("request log released")
            load.wait_for(lambda o: sum(x.ok and x.started > released for x in o) >= clients,
                          "successful requests after the lock", timeout=SQLITE_LOCK_LIMIT)
            load.sleep_until(released + settle_seconds)
            outcomes = load.stop()
        pids_after = service.workers()
        logged = service.logged_ids()
        result.server_output = service.output()
    fill_load(result, outcomes, load)
    result.faults = 1
    expect_errors = hold_seconds is None or hold_seconds > SQLITE_RETRY_SECONDS + 1
    _store_outage_checks(result, outcomes, released, pids_before, pids_after, expect_errors=expect_errors)
    slow = [o for o in outcomes if not o.ok and o.ended - o.started > SQLITE_LOCK_LIMIT]
    result.expect(not slow, f"{len(slow)} requests waited longer than {SQLITE_LOCK_LIMIT:g} s for their 503")
    check = integrity_check(service.request_log)
    result.expect(check == "ok", f"PRAGMA integrity_check says {check!r}")
    result.notes.append(f"lock held {released - locked:.1f} s; retry budget {SQLITE_RETRY_SECONDS:g} s")
    account(result, outcomes, logged, exact=True)
    return result


class ThrowawayPostgres:
    """A private PostgreSQL cluster (initdb into a temporary folder) on a free loopback port.

    Never the machine's shared cluster: stopping this one disturbs nobody. initdb refuses to run as
    root, so as root the cluster runs as user `postgres`. Use as a context manager: the cluster is
    always stopped and its folder removed.
    """

    def __init__(self) -> None:
        reason = self.unavailable()
        if reason:
            raise RuntimeError(reason)
        self.bin = self.binaries()
        self.root = Path(tempfile.mkdtemp(prefix="reliability-pg-"))
        self.data = self.root / "data"
        self.port = processes.free_port()
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        self._as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []

    @staticmethod
    def binaries() -> Path | None:
        """The newest /usr/lib/postgresql/<version>/bin with initdb and pg_ctl."""
        found = [p for p in Path("/usr/lib/postgresql").glob("*/bin")
                 if (p / "initdb").exists() and (p / "pg_ctl").exists()]
        found.sort(key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0)
        return found[-1] if found else None

    @classmethod
    def unavailable(cls) -> str | None:
        """Why no throwaway cluster can be made here, or None."""
        if cls.binaries() is None:
            return "no PostgreSQL server binaries (initdb, pg_ctl) under /usr/lib/postgresql/*/bin"
        if os.geteuid() == 0:
            try:
                import pwd

                pwd.getpwnam("postgres")
            except KeyError:
                return "running as root and there is no user 'postgres' to run initdb as"
            if shutil.which("runuser") is None:
                return "running as root and runuser is missing (initdb refuses root)"
        return None

    def _pg(self, tool: str, *args: str, timeout: float = 120) -> None:
        subprocess.run([*self._as_user, str(self.bin / tool), *args], check=True, capture_output=True,
                       timeout=timeout)

    def __enter__(self) -> ThrowawayPostgres:
        try:
            if self._as_user:
                shutil.chown(self.root, "postgres", "postgres")
            self._pg("initdb", "-D", str(self.data), "--auth=trust", "--username=postgres", "--encoding=UTF8",
                     "--no-sync")
            self.start()
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        self.remove()

    def start(self) -> None:
        # fsync off: a test cluster; listen on loopback only, socket in our own folder.
        options = f"-p {self.port} -k {self.root} -h 127.0.0.1 -F"
        self._pg("pg_ctl", "-D", str(self.data), "-l", str(self.root / "server.log"), "-o", options, "-w",
                 "-t", "60", "start")

    def stop(self, mode: str = "fast") -> None:
        self._pg("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")

    def remove(self) -> None:
        if (self.data / "postmaster.pid").exists():
            with contextlib.suppress(subprocess.SubprocessError, OSError):
                self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)


def postgres_restart(world: World, workdir: Path, *, clients: int, down_seconds: float = 2.0,
                     settle_seconds: float = 3.0) -> Result:
    """The PostgreSQL request log stops (pg_ctl stop -m fast) and starts again while the load runs:
    bounded retries then 503 request_log_unavailable, service again without a restart, and no row
    reported as scored lost."""
    result = Result(f"PostgreSQL log restarted ({down_seconds:g} s down)")
    reason = ThrowawayPostgres.unavailable()
    if reason:
        result.skipped = reason
        return result
    with ThrowawayPostgres() as pg, serving(world, workdir, name="postgres", request_log=pg.url) as service:
        result.step("PostgreSQL and service up")
        with Load(service.url, world.rows, clients=clients, seconds=down_seconds + SLACK_SECONDS) as load:
            load.wait_for(lambda o: sum(x.ok for x in o) >= clients, "successful requests before the stop")
            pids_before = service.workers()
            stopping = time.monotonic()
            pg.stop()
            result.step("PostgreSQL stopped")
            load.sleep_until(time.monotonic() + down_seconds)
            pg.start()
            result.step("PostgreSQL started")
            started = time.monotonic()
            load.wait_for(lambda o: sum(x.ok and x.started > started for x in o) >= clients,
                          "successful requests after the restart")
            load.sleep_until(time.monotonic() + settle_seconds)
            outcomes = load.stop()
        pids_after = service.workers()
        logged = service.logged_ids()
        result.server_output = service.output()
    fill_load(result, outcomes, load)
    result.faults = 1
    # Requests that began before the database was up again may have met it down; later ones must not fail.
    _store_outage_checks(result, outcomes, started, pids_before, pids_after, expect_errors=True)
    result.notes.append(f"database down for {started - stopping:.1f} s")
    account(result, outcomes, logged, exact=False)
    return result


# --- 4: registry trouble --------------------------------------------------------------------------------------


class TrackingServer:
    """A real `mlflow server` over a registry copy, on a fixed loopback port so it can come back."""

    def __init__(self, store: MlflowStore, workdir: Path):
        self.store, self.workdir = store, workdir
        self.port = processes.free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server: processes.Server | None = None
        self.starts = 0

    def start(self, wait: bool = True) -> None:
        self.starts += 1
        argv = [str(processes.VENV_BIN / "mlflow"), "server", "--backend-store-uri", self.store.tracking_uri,
                "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"]
        self.server = processes.start(f"mlflow-server-{self.starts}", argv, env=processes.clean_env(**OFFLINE),
                                      cwd=self.workdir, log_dir=self.workdir)
        if wait:
            self.wait()

    def wait(self) -> None:
        assert self.server is not None, "the tracking server was not started"
        processes.wait_until(self.server, processes.http_ok(f"{self.url}/health"), "tracking server health",
                             timeout=START_SECONDS)

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None

    def kill(self) -> None:
        """Gone at once, as in a crash (a graceful stop waits for the workers' keep-alive connections)."""
        if self.server is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.server.process.pid, signal.SIGKILL)
            self.server.process.wait(30)
            self.server = None

    def __enter__(self) -> TrackingServer:
        self.start(wait=False)
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()


def corrupt_version(world: World, store: MlflowStore, dest: Path) -> str:
    """Register a copy of version 1 whose serialized model is garbage; returns its version."""
    return _altered_copy(world, store, dest, lambda model_dir: (model_dir / "model.skops").write_bytes(
        b"\x00this is not a model\x00" * 64))


def incompatible_version(world: World, store: MlflowStore, dest: Path) -> str:
    """Register a copy of version 1 whose signature takes 28 inputs (no Amount_scaled)."""
    from mlflow.models import Model, ModelSignature
    from mlflow.types import ColSpec, Schema

    def alter(model_dir: Path) -> None:
        model = Model.load(model_dir)
        model.signature = ModelSignature(inputs=Schema([ColSpec("double", name) for name in FEATURES[:-1]]),
                                         outputs=model.signature.outputs)
        model.save(model_dir / "MLmodel")

    return _altered_copy(world, store, dest, alter)


def _altered_copy(world: World, store: MlflowStore, dest: Path, alter: Callable[[Path], None]) -> str:
    import mlflow

    client = store.client()
    source = client.get_model_version_download_uri(world.name, world.registry.v1.version)
    model_dir = Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(dest),
                                                         tracking_uri=client.tracking_uri))
    alter(model_dir)
    return str(client.create_model_version(world.name, source=str(model_dir), run_id=None).version)


def registry_trouble(world: World, workdir: Path, *, clients: int, seconds: float, restart: bool = False) -> Result:
    """The service's registry is a real `mlflow server`.

    1. A corrupt and then an incompatible version are promoted by hand (move_to_stage, no gate):
       every worker refuses each, keeps version 1, and says so in /ready, its log and its metrics.
    2. The tracking server dies (SIGKILL): scoring goes on with version 1, and /ready and the
       fraud_registry_reachable gauge say the registry is unreachable. With `restart`, it comes
       back and the service notices.
    """
    result = Result("registry: bad versions, outage")
    store = world.private_registry(workdir / "tracked-registry")
    old = world.registry.v1.version
    # Both start at once (each takes a while): the workers poll until the tracking server answers.
    with TrackingServer(store, workdir) as tracking, \
            serving(world, workdir, name="registry", tracking_uri=tracking.url) as service:
        tracking.wait()
        result.step("tracking server and service up")
        outcomes, load, logged = _registry_trouble(result, world, service, tracking, store, workdir,
                                                   clients=clients, seconds=seconds, restart=restart)
    fill_load(result, outcomes, load)
    failures = [o for o in outcomes if not o.ok]
    result.expect(not failures, f"{len(failures)} requests failed: {summary(failures)}")
    versions = {o.version for o in outcomes if o.ok}
    result.expect(versions == {old}, f"versions answered {versions}; only {old} may serve")
    account(result, outcomes, logged, exact=True)
    return result


def _registry_trouble(result: Result, world: World, service: Service, tracking: TrackingServer,
                      store: MlflowStore, workdir: Path, *, clients: int,
                      seconds: float, restart: bool) -> tuple[list[Outcome], Load, set[str]]:
    old = world.registry.v1.version
    registry_client = store.client()
    with Load(service.url, world.rows, clients=clients, seconds=seconds + SLACK_SECONDS) as load:
        refused = 0
        for kind, make in (("corrupt", corrupt_version), ("incompatible", incompatible_version)):
            bad = make(world, store, workdir / kind)
            move_to_stage(registry_client, world.name, bad, "Production")
            result.step(f"{kind} version {bad} promoted by hand")
            refused += WORKERS
            service.wait_for(lambda n=refused: service.metrics().get(
                ("fraud_model_reloads_total", (("result", "refused"),)), 0) >= n,
                f"every worker to refuse the {kind} version {bad}")
            result.step(f"{kind} version {bad} refused by every worker")
            _check_refusal(result, service, world.name, kind, bad, old)
            result.faults += 1
        before_outage = len(service.output())
        tracking.kill()
        result.step("tracking server killed")
        service.wait_for(lambda: service.metrics()[("fraud_registry_reachable", ())] == 0,
                         "the service to notice the registry is down")
        status, ready = service.wait_for(lambda: (r := service.ready())[1]["registry"]["reachable"] is False and r,
                                         "/ready to say the registry is unreachable")
        result.expect(status == 200 and ready["model"]["version"] == old,
                      f"with the registry down, /ready is {status} serving {ready.get('model')}")
        result.expect(bool(ready["registry"]["error"]), "/ready gives no reason for the unreachable registry")
        result.faults += 1
        noticed = time.monotonic()
        result.step("the service says the registry is unreachable")
        result.expect("model registry unreachable" in service.output()[before_outage:],
                      "the service log does not say the registry became unreachable")
        load.wait_for(lambda o: sum(x.ok and x.started > noticed for x in o) >= clients,
                      "scoring while the registry is down")
        if restart:
            tracking.start()
            service.wait_for(lambda: service.metrics()[("fraud_registry_reachable", ())] == 1,
                             "the service to reach the registry again", timeout=START_SECONDS)
            result.step("tracking server back, and the service reaches it")
        load.sleep_until(load.started + seconds)
        outcomes = load.stop()
        result.step("load stopped")
    result.server_output = service.output()
    return outcomes, load, service.logged_ids()


def _check_refusal(result: Result, service: Service, name: str, kind: str, bad: str, old: str) -> None:
    samples = service.metrics()
    result.expect(samples[("fraud_model_refused_version", ())] == int(bad),
                  f"fraud_model_refused_version is {samples[('fraud_model_refused_version', ())]}, not {bad}")
    result.expect(service.versions_served() == {old: WORKERS},
                  f"after the {kind} version: workers serve {service.versions_served()}")
    for _ in range(2 * WORKERS):  # /ready answers from either worker; both must say it
        status, ready = service.ready()
        refusal = ready.get("refused") or {}
        result.expect(status == 200 and ready["model"]["version"] == old and refusal.get("version") == bad
                      and bool(refusal.get("error")),
                      f"/ready after the {kind} version {bad}: {status} {json.dumps(ready)[:400]}")
    result.expect(f"model load refused: {name} version {bad}" in service.output(),
                  f"the log does not say version {bad} was refused")


# --- 6: auth -------------------------------------------------------------------------------------------------

ROW = [0.1] * len(FEATURES)
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
    "token 8 KB long": "Bearer " + TOKEN * (8192 // len(TOKEN)),
}


def raw_request(url: str, method: str, path: str, headers: dict[str, str], body: bytes | None = None,
                timeout: float = 30.0) -> tuple[int, dict, dict]:
    """(status, JSON body or {}, headers), sending exactly these headers."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        payload = response.read()
        try:
            answer = json.loads(payload)
        except ValueError:
            answer = {}
        return response.status, answer, dict(response.getheaders())
    finally:
        conn.close()


def auth_scenario(service: Service) -> Result:
    """Every protected endpoint with every bad Authorization header: 401 in the error shape with a
    Bearer challenge, nothing scored, nothing logged, no label changed. The valid token still works."""
    result = Result("auth: bad tokens")
    status, answer, _ = raw_request(service.url, "POST", "/predict", {"Content-Type": "application/json", **AUTH},
                                    json.dumps({"data": [ROW]}).encode())
    result.expect(status == 200, f"the valid token was refused: {status} {answer}")
    target = answer.get("request_id", ["none-0"])[0]
    feedback = {"labels": [{"request_id": target, "is_fraud": True}]}
    rows_before, labelled_before = service.count(), service.count(labelled=True)
    scored_before = _predictions_total(service)
    for method, path, body in PROTECTED_CALLS:
        payload = json.dumps(feedback if path == "/feedback" else body).encode() if method == "POST" else None
        for case, authorization in BAD_AUTHORIZATION.items():
            headers = {"Content-Type": "application/json"} if payload else {}
            if authorization is not None:
                headers["Authorization"] = authorization
            status, answer, response_headers = raw_request(service.url, method, path, headers, payload)
            result.inputs += 1
            result.requests += 1
            result.expect(status == 401 and is_error_shape(answer, "unauthorized")
                          and response_headers.get("WWW-Authenticate", "").startswith("Bearer"),
                          f"{method} {path} with {case}: {status} {answer}")
    result.expect(service.count() == rows_before, f"refused requests logged {service.count() - rows_before} rows")
    result.expect(service.count(labelled=True) == labelled_before, "a refused /feedback stored a label")
    result.expect(_predictions_total(service) == scored_before, "refused requests were scored")
    return result


def _predictions_total(service: Service) -> float:
    return sum(v for (name, _), v in service.metrics().items() if name == "fraud_predictions_total")


# --- 7: input limits -----------------------------------------------------------------------------------------


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

    The body is sent from another thread while this one reads the answer: the server may answer
    413 and close before it has read the body, and the answer must not be lost in that race.
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


def limits_scenario(service: Service, *, repeats: int) -> Result:
    """Each hostile input `repeats` times: 413 or 400 in the error shape, nothing logged, and the
    worker's peak RSS at most PEAK_GROWTH_MB over its start. Run it against a service with one
    worker (`serving(..., workers=1)`), so that every input reaches the worker measured."""
    result = Result("hostile inputs")
    for _ in range(20):  # warm the worker up (and create the log's table) before measuring
        status, answer, _ = raw_request(service.url, "POST", "/predict", {"Content-Type": "application/json", **AUTH},
                                        json.dumps({"data": [ROW] * 10}).encode())
        result.expect(status == 200, f"a valid request failed before the burst: {status} {answer}")
    rows_before = service.count()
    baseline = service.rss_mb()
    slowest: dict[str, float] = {}
    after_round: list[dict[int, float]] = []
    for _ in range(repeats):
        for item in HOSTILE:
            status, answer, seconds = send_hostile(service.url, item)
            result.inputs += 1
            result.requests += 1
            slowest[item.name] = max(slowest.get(item.name, 0.0), seconds)
            error = answer.get("error") if isinstance(answer, dict) else None
            good = status in item.statuses and isinstance(error, dict) and is_error_shape(answer, error.get("code"))
            if not good:
                result.errors += 1
            result.expect(good, f"{item.name}: got {status} {str(answer)[:200]}; expected "
                                f"{sorted(item.statuses)} with the JSON error shape")
        after_round.append(service.rss_mb())
    peak = service.rss_mb("VmHWM")
    result.expect(set(peak) == set(baseline), f"workers changed during the burst: {baseline} -> {peak}")
    growth = max((peak.get(pid, 0) - mb for pid, mb in baseline.items()), default=0.0)
    result.expect(growth <= PEAK_GROWTH_MB, f"a worker's peak RSS grew {growth:.0f} MB (bound {PEAK_GROWTH_MB} MB)")
    result.expect(service.count() == rows_before, "hostile requests logged rows")
    worst = max(slowest, key=slowest.get)
    result.notes.append(f"worker RSS (MB) {_mb(baseline)}, after each round: "
                        f"{' '.join(_mb(r) for r in after_round)}; peak {_mb(peak)}")
    result.notes.append(f"slowest refusal {slowest[worst]:.2f} s ({worst})")
    return result


def _mb(by_pid: dict[int, float]) -> str:
    return "/".join(f"{v:.0f}" for _, v in sorted(by_pid.items()))


# --- 5: fuzzing -----------------------------------------------------------------------------------------------


def fuzz_scenario(service: Service, workdir: Path, *, max_examples: int, phases: tuple[str, ...] = ("fuzzing",),
                  seed: int = 0, timeout: float = 600.0) -> Result:
    """schemathesis against the service's own /openapi.json with a valid token, every check on
    (no server error, status codes, content types, headers and bodies conform to the schema, schema-
    valid bodies accepted, invalid ones refused, auth not ignored, ...). Also checked from the
    service's side: its latency histogram counts no 5xx answer."""
    result = Result(f"schemathesis ({','.join(phases)})")
    report = workdir / f"schemathesis-{'-'.join(phases)}.json"
    command = [str(processes.VENV_BIN / "schemathesis"), "run", f"{service.url}/openapi.json", "--checks", "all",
               "--header", f"Authorization: Bearer {TOKEN}", "--max-examples", str(max_examples),
               "--seed", str(seed), "--workers", "1", "--phases", ",".join(phases), "--request-timeout", "30",
               "--report", "json", "--report-json-path", str(report)]
    # The hooks teach schemathesis to send /invocations' CSV and Parquet tables (see the module).
    env = processes.clean_env(NO_COLOR="1", SCHEMATHESIS_HOOKS=str(SCHEMATHESIS_HOOKS), **OFFLINE)
    done = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    output = done.stdout[-6000:] + done.stderr[-2000:]
    if not report.exists():
        result.expect(False, f"schemathesis wrote no report (exit {done.returncode}):\n{output}")
        return result
    run = json.loads(report.read_text())
    cases = run["test_cases"]
    result.inputs = result.requests = int(cases["generated"])
    result.errors = int(cases["with_failures"]) + int(cases["errored"])
    result.expect(done.returncode == 0 and run["exit_code"] == 0, f"schemathesis exited {done.returncode}:\n{output}")
    result.expect(not run["failures"] and not run["errors"],
                  f"schemathesis found {len(run['failures'])} failures and {len(run['errors'])} errors:\n{output}")
    result.expect(run["operations"]["tested"] == run["operations"]["total"],
                  f"only {run['operations']['tested']} of {run['operations']['total']} operations were tested")
    result.expect(result.inputs > 0, "schemathesis generated no test case")
    server_errors = {labels: v for (name, labels), v in service.metrics().items()
                     if name == "fraud_http_request_duration_seconds_count" and dict(labels)["status"].startswith("5")}
    result.expect(not server_errors, f"the service answered 5xx: {server_errors}")
    result.notes.append(f"{cases['generated']} generated test cases over {run['operations']['tested']} operations")
    return result


# --- make reliability ------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.reliability", description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients for the load scenario")
    parser.add_argument("--seconds", type=float, default=20.0, help="seconds of load for the load scenario")
    parser.add_argument("--examples", type=int, default=50, help="schemathesis examples per operation")
    parser.add_argument("--kills", type=int, default=3, help="workers killed with SIGKILL during the crash scenario")
    parser.add_argument("--repeats", type=int, default=6, help="rounds of hostile inputs")
    parser.add_argument("--registry-restart", action="store_true",
                        help="also bring the killed tracking server back and wait for the service to reach it "
                             "(a minute or two more)")
    args = parser.parse_args(argv)
    os.environ.update(OFFLINE)  # this process trains the tiny models with MLflow
    fault_clients, fault_seconds = max(2, args.clients // 2), max(6.0, args.seconds / 2)
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="reliability-") as tmp:
        root = Path(tmp)
        print("building the world: reference data and two tiny model versions ...", file=sys.stderr, flush=True)
        world = build_world(root / "world")
        scenarios: list[tuple[str, Callable[[Path], Result]]] = [
            ("load", lambda d: load_scenario(world, d, clients=args.clients, seconds=args.seconds)),
            ("crash", lambda d: load_scenario(world, d, clients=fault_clients, seconds=fault_seconds,
                                              kills=args.kills)),
            ("sqlite-short", lambda d: sqlite_writer_lock(world, d, clients=fault_clients, hold_seconds=3.0)),
            ("sqlite-long", lambda d: sqlite_writer_lock(world, d, clients=fault_clients)),
            ("postgres", lambda d: postgres_restart(world, d, clients=fault_clients, down_seconds=5.0)),
            ("registry", lambda d: registry_trouble(world, d, clients=fault_clients, seconds=fault_seconds,
                                                    restart=args.registry_restart)),
            ("swap", lambda d: hot_swap(world, d, clients=fault_clients, seconds=fault_seconds)),
        ]
        for name, scenario in scenarios:
            results.append(_run(name, root, scenario))
        shared = root / "shared"
        shared.mkdir()
        # One worker: the memory of the worker that received every hostile input is what is measured.
        with serving(world, shared, name="shared", workers=1) as service:
            results.append(_run("auth", root, lambda _d: auth_scenario(service)))
            results.append(_run("limits", root, lambda _d: limits_scenario(service, repeats=args.repeats)))
            results.append(_run("fuzz", root, lambda d: fuzz_scenario(
                service, d, max_examples=args.examples, phases=("examples", "coverage", "fuzzing"))))
    print()
    print(table(results))
    for result in results:
        for note in result.notes:
            print(f"  {result.scenario}: {note}")
    failed = [r for r in results if not r.ok]
    for result in failed:
        print("\n" + result.explain(), file=sys.stderr)
    return 1 if failed else 0


def _run(name: str, root: Path, scenario: Callable[[Path], Result]) -> Result:
    workdir = root / name
    workdir.mkdir(exist_ok=True)
    print(f"scenario {name} ...", file=sys.stderr, flush=True)
    started = time.monotonic()
    try:
        result = scenario(workdir)
    except Exception as exc:  # a scenario that cannot finish is a failed row, not a lost table
        result = Result(name, problems=[f"{type(exc).__name__}: {str(exc)[:2000]}"])
    print(f"scenario {name}: {'ok' if result.ok else 'FAILED'} in {time.monotonic() - started:.0f} s",
          file=sys.stderr, flush=True)
    return result


if __name__ == "__main__":
    sys.exit(main())
