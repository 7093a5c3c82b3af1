"""Options, fixtures and the summary table of the reliability scenarios.

A scenario is a test marked `@pytest.mark.scenario(name)` that fills in the `scenario` fixture (a
`ScenarioRecord`: load held, requests, errors, faults, inputs, rows lost, rows logged twice, registry
repairs). After the run, the terminal summary prints one table of every scenario with its outcome.

Size comes from the options below. `make test` runs every scenario small (the defaults);
`make reliability` runs the same tests heavier (see the Makefile), e.g.
`pytest tests/reliability --clients 16 --seconds 20 --kills 3 --examples 50 --repeats 6`.

Processes are real and started per test on loopback ports: gunicorn (`serve`, and one shared
single-worker service per module for scenarios that only send requests), `mlflow server`
(`tracking_server`), and a private PostgreSQL cluster (`private_postgres`) for the scenario that
stops its database: the shared server behind `postgres_url` must never be stopped.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

import pytest

from tests.helpers import processes
from tests.helpers.gunicorn import Service, start_service
from tests.helpers.postgres_cluster import PrivatePostgres
from tests.helpers.scenario import FAILED, OK, SKIPPED, ScenarioRecord, table
from tests.helpers.tracking_server import TrackingServer

RECORD = pytest.StashKey[ScenarioRecord]()
SERVERS = pytest.StashKey[list[processes.Server]]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("reliability", "size of the reliability scenarios (tests/reliability)")
    group.addoption("--clients", type=int, default=4,
                    help="concurrent clients of the load and refusal scenarios; fault scenarios use half, at least 4 "
                         "(default 4)")
    group.addoption("--seconds", type=float, default=4.0,
                    help="seconds of load in the load, refusal and lost-acknowledgement scenarios; other fault "
                         "scenarios use half, at least 6 (default 4)")
    group.addoption("--kills", type=int, default=1,
                    help="workers killed with SIGKILL under load, gates killed mid-promotion, and rounds of two "
                         "gates started together (default 1)")
    group.addoption("--repeats", type=int, default=4, help="rounds of hostile inputs (default 4)")
    group.addoption("--examples", type=int, default=10, help="schemathesis examples per operation (default 10)")
    group.addoption("--fuzz-phases", default="fuzzing",
                    help="schemathesis phases, comma-separated (default fuzzing; all: examples,coverage,fuzzing)")
    group.addoption("--registry-restart", action="store_true",
                    help="bring the killed tracking server back and wait for the service to reach it again")


@dataclass(frozen=True)
class Size:
    clients: int
    seconds: float
    kills: int
    repeats: int
    examples: int
    fuzz_phases: tuple[str, ...]
    registry_restart: bool

    @property
    def fault_clients(self) -> int:
        """Clients while a fault is injected: half the load's, never below the `make test` size."""
        return max(4, self.clients // 2)

    @property
    def fault_seconds(self) -> float:
        return max(6.0, self.seconds / 2)


@pytest.fixture(scope="session")
def size(pytestconfig) -> Size:
    option = pytestconfig.getoption
    return Size(option("--clients"), option("--seconds"), option("--kills"), option("--repeats"),
                option("--examples"), tuple(option("--fuzz-phases").split(",")), option("--registry-restart"))


# --- processes ------------------------------------------------------------------------------------------


@pytest.fixture
def serve(serving_registry, tmp_path, request) -> Iterator[Callable[..., Service]]:
    """Start gunicorn (2 workers, SQLite request log under tmp_path) and wait until every worker
    serves; keyword arguments as `start_service`'s. Every service is stopped after the test, and
    its output is shown with a failure."""
    services: list[Service] = []

    def factory(name: str = "service", **kwargs) -> Service:
        service = start_service(serving_registry, tmp_path, name=name, **kwargs)
        services.append(service)
        _show_on_failure(request.node, service.server)
        return service

    yield factory
    for service in services:
        service.stop()


@pytest.fixture(scope="module")
def shared_service(serving_registry, tmp_path_factory) -> Iterator[Service]:
    """One gunicorn for the scenarios that only send requests (auth, refusals, hostile input, fuzzing), with
    one worker: the memory measured is that of the worker that received every hostile input."""
    service = start_service(serving_registry, tmp_path_factory.mktemp("shared-service"), name="shared", workers=1)
    yield service
    service.stop()


@pytest.fixture
def tracking_server(private_registry, tmp_path, request) -> Iterator[TrackingServer]:
    """`mlflow server` over a private copy of the serving registry, started but not waited on (it
    takes a while: start the service against it meanwhile, then call `wait()`); stopped after."""
    tracking = TrackingServer(private_registry, tmp_path)
    tracking.start(wait=False)
    _show_on_failure(request.node, tracking.server)
    yield tracking
    tracking.stop()


@pytest.fixture
def private_postgres() -> Iterator[PrivatePostgres]:
    """A PostgreSQL cluster of this test's own, which it may stop and start. Skipped without the
    server binaries (failed with REQUIRE_POSTGRES=1, as the `postgres_url` fixture is)."""
    reason = PrivatePostgres.unavailable()
    if reason:
        if os.environ.get("REQUIRE_POSTGRES") == "1":
            pytest.fail(f"{reason}, and REQUIRE_POSTGRES=1")
        pytest.skip(reason)
    with PrivatePostgres() as cluster:
        yield cluster


def _show_on_failure(item: pytest.Item, server: processes.Server | None) -> None:
    if server is not None:
        item.stash.setdefault(SERVERS, []).append(server)


# --- the table --------------------------------------------------------------------------------------------


def _record(item: pytest.Item) -> ScenarioRecord | None:
    marker = item.get_closest_marker("scenario")
    if marker is None:
        return None
    return item.stash.setdefault(RECORD, ScenarioRecord(marker.args[0]))


@pytest.fixture
def scenario(request) -> ScenarioRecord:
    """This scenario's row of the table, for the test to fill in (its result is the test's outcome)."""
    record = _record(request.node)
    if record is None:
        pytest.fail("a test that uses the `scenario` fixture is marked @pytest.mark.scenario(name)")
    return record


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator:
    report = yield
    if report.failed:
        # The servers the test started (`serve`, `tracking_server`) and the ones it was handed (`shared_service`).
        shared = [v.server for v in getattr(item, "funcargs", {}).values() if isinstance(v, Service)]
        for server in [*item.stash.get(SERVERS, []), *shared]:
            report.sections.append((f"{server.name} output (end)", server.output()))
    record = _record(item)
    # One row per scenario: from its call, or from the setup or teardown that failed or skipped it.
    if record is not None and (report.when == "call" or not report.passed):
        if report.skipped:
            reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
            result = f"{SKIPPED}: {reason.removeprefix('Skipped: ')}"
        else:
            result = FAILED if report.failed else OK
        report.user_properties.append(("scenario", {**asdict(record), "result": result}))
    return report


class ScenarioTable:
    """Collects the scenarios' rows from test reports (so it works under pytest-xdist too) and
    prints them as one table at the end of the run."""

    def __init__(self) -> None:
        self.rows: dict[str, ScenarioRecord] = {}

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        for name, value in report.user_properties:
            if name == "scenario":
                self.rows[report.nodeid] = ScenarioRecord(**value)  # a failed teardown's row is the last

    def pytest_terminal_summary(self, terminalreporter) -> None:
        if not self.rows:
            return
        records = list(self.rows.values())
        terminalreporter.write_sep("=", "reliability scenarios")
        terminalreporter.write_line(table(records))
        for record in records:
            for note in record.notes:
                terminalreporter.write_line(f"  {record.name}: {note}")


def pytest_configure(config: pytest.Config) -> None:
    config.pluginmanager.register(ScenarioTable(), "reliability-scenario-table")
