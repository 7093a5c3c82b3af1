"""One gate at a time: the gate lock in the request log's database (a file lock beside SQLite, an
advisory lock in PostgreSQL), and gate processes started together on the embedded store and on a
tracking server with a PostgreSQL backend."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from common import registry
from common.paths import REPO_ROOT
from monitoring import gate
from monitoring.gate_lock import LockBusy, gate_lock
from tests.helpers.builders import MlflowStore, train_model
from tests.helpers.gates import GENEROUS, gate_world, start_gate, wait_for_output
from tests.helpers.processes import clean_env, free_port, http_ok, start, wait_until
from tests.helpers.tracking_server import SERVER_ENV


def _sqlite(tmp_path: Path) -> str:
    return str(tmp_path / "requests.db")


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def request_log(request, tmp_path) -> str:
    if request.param == "sqlite":
        return _sqlite(tmp_path)
    return request.getfixturevalue("postgres_url")


def test_a_second_holder_waits_its_bounded_time_then_gives_up_and_gets_the_lock_once_it_is_free(request_log):
    waits: list[str] = []
    with gate_lock(request_log, 5):
        started = time.monotonic()
        with pytest.raises(LockBusy, match=r"another promotion or rollback held the gate lock \(.+\) for all of 0.5 s"):
            with gate_lock(request_log, 0.5, poll_seconds=0.05, on_wait=waits.append):
                pytest.fail("two holders at once")
        assert 0.5 <= time.monotonic() - started < 3
        assert len(waits) == 1  # said once, not at every try
    with gate_lock(request_log, 0):
        pass


def test_a_waiting_holder_gets_the_lock_as_soon_as_the_first_releases_it(request_log):
    release = threading.Event()
    holding = threading.Event()

    def first() -> None:
        with gate_lock(request_log, 5):
            holding.set()
            release.wait(10)

    thread = threading.Thread(target=first)
    thread.start()
    assert holding.wait(10)
    threading.Timer(0.3, release.set).start()
    started = time.monotonic()
    with gate_lock(request_log, 10, poll_seconds=0.05):
        assert 0.25 <= time.monotonic() - started < 5
    thread.join(10)


def test_the_lock_dies_with_a_killed_holder(request_log, tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom monitoring.gate_lock import gate_lock\n"
                               "with gate_lock(sys.argv[1], 5):\n    print('held', flush=True)\n    time.sleep(600)\n",
         request_log], cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LockBusy):
            with gate_lock(request_log, 0.2):
                pass
        holder.send_signal(signal.SIGKILL)
        holder.wait(10)
        with gate_lock(request_log, 5, poll_seconds=0.05):  # the kernel, or the server, released it
            pass
    finally:
        holder.kill()
        holder.wait(10)
        holder.stdout.close()


def test_the_sqlite_gate_lock_is_its_own_file_not_the_writers_lock(tmp_path):
    with gate_lock(_sqlite(tmp_path), 0) as where:
        assert where == f"file {tmp_path / 'requests.db-gate-lock'}"
        assert not (tmp_path / "requests.db-lock").exists()


# --- gate processes -------------------------------------------------------------------------------


def _two_gates_then_one_more(env: dict[str, str], request_log: str, tmp_path: Path, client, name: str) -> None:
    """While this test holds the gate lock: gates A and B (waiting up to 10 minutes) both wait, and
    C (waiting 1 s) gives up with exit code 4. Then the lock is released: exactly one of A and B
    promotes version 2, and the other, once it has the lock, finds it already Production."""
    promote = ("--version", "2", "--reason", "manual")
    with gate_lock(request_log, 5):
        gates = [start_gate(label, env, tmp_path / label, *promote, "--lock-wait", "600") for label in ("a", "b")]
        impatient = start_gate("c", env, tmp_path / "c", *promote, "--lock-wait", "1")
        try:
            for server in gates:
                wait_for_output(server, "holds the gate lock")
            assert impatient.process.wait(120) == gate.EXIT_BUSY, impatient.output()
            assert "gate: gave up: another promotion or rollback held the gate lock" in impatient.output()
            assert "for all of 1 s; nothing was changed" in impatient.output()
            assert str(registry.production_version(client, name).version) == "1"
        except BaseException:
            for server in (*gates, impatient):
                server.stop()
            raise
    codes = sorted(server.process.wait(300) for server in gates)
    outputs = "\n".join(server.output() for server in gates)
    assert codes == [gate.EXIT_PASSED, gate.EXIT_USAGE], outputs
    assert "v2 is already Production" in outputs
    promoted = [p for p in (tmp_path / "a", tmp_path / "b") if (p / gate.RESULT_FILE).exists()]
    assert len(promoted) == 1 and json.loads((promoted[0] / gate.RESULT_FILE).read_text())["decision"] == "promoted"
    assert [str(v.version) for v in registry.production_versions(client, name)] == ["2"]
    assert str(client.get_model_version_by_alias(name, "champion").version) == "2"
    assert str(client.get_model_version_by_alias(name, "previous").version) == "1"


@pytest.mark.slow
def test_two_gates_started_together_on_the_embedded_store_promote_once(serving_registry, tmp_path):
    world = gate_world(serving_registry, tmp_path, request_log=_sqlite(tmp_path))
    _two_gates_then_one_more(clean_env(**world.env), world.env["LATEST_DB"], tmp_path, world.client, world.name)


@pytest.mark.slow
@pytest.mark.postgres
def test_two_gates_started_together_on_a_tracking_server_with_postgresql_promote_once(
        make_postgres_url, reference_data, tmp_path):
    tracking_db, request_log = make_postgres_url("tracking"), make_postgres_url("requests")
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    server = start("mlflow-server", ["mlflow", "server", "--backend-store-uri",
                                     tracking_db.replace("postgresql://", "postgresql+psycopg://", 1),
                                     "--artifacts-destination", str(tmp_path / "mlartifacts"), "--serve-artifacts",
                                     "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                   env=clean_env(**SERVER_ENV), cwd=tmp_path, log_dir=tmp_path)
    try:
        wait_until(server, http_ok(f"{uri}/health"), "tracking server health", timeout=180)
        store = MlflowStore(tmp_path, uri, tmp_path / "unused-artifact-root")
        first = train_model(store, reference_data, seed=0)
        train_model(store, reference_data, seed=1)
        client = registry.client(uri)
        registry.move_to_stage(client, first.name, first.version, "Production")
        config = tmp_path / "promotion.json"
        config.write_text(json.dumps(GENEROUS))
        env = clean_env(MLFLOW_TRACKING_URI=uri, **reference_data.env(), MODEL_NAME=first.name,
                        LATEST_DB=request_log, PROMOTION_CONFIG=str(config))
        _two_gates_then_one_more(env, request_log, tmp_path, client, first.name)
    finally:
        server.stop()  # before make_postgres_url drops the database it holds
