"""The serving benchmark's own logic, without its servers: the grown request log it starts one
target with, how it counts a server's CPU time, and the goals it judges (`make bench` runs the
rest, with wrk)."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
import uuid

import pytest

from benchmarks.serve import (
    CLIENTS,
    GOALS,
    REFERENCE,
    BatchResult,
    LoadResult,
    Roles,
    _grown,
    group_cpu_seconds,
    log_counts,
    postgres_cpu_seconds,
    prefill_request_log,
    print_table,
)
from common.store import RequestStore


def test_prefilled_log_holds_the_rows_as_the_service_writes_them(tmp_path):
    row = [0.5] * 29
    prefill_request_log(tmp_path / "grown.db", 25_001, row, "7", "8")
    store = RequestStore(str(tmp_path / "grown.db"), create=False)
    try:
        assert store.count() == 25_001
        frame = store.read_frame(("request_id", "model_version", "V1", "Amount_scaled", "shadow_score",
                                  "shadow_decision", "shadow_version"))
    finally:
        store.dispose()
    ids = frame["request_id"]
    assert ids.is_unique and ids.str.endswith("-0").all()
    assert {uuid.UUID(i.removesuffix("-0")).version for i in ids} == {7}
    assert set(frame["model_version"]) == {"7"} and set(frame["V1"]) == {0.5} and set(frame["Amount_scaled"]) == {0.5}
    # The challenger's view too, as the service logs it while a challenger is in Staging.
    assert set(frame["shadow_version"]) == {"8"} and frame["shadow_score"].notna().all()
    assert set(frame["shadow_decision"]) <= {0, 1}
    assert log_counts(str(tmp_path / "grown.db")) == (25_001, 0)


def test_log_counts_rows_without_the_challengers_score(tmp_path):
    from service.request_log import COLUMNS

    store = RequestStore(str(tmp_path / "log.db"))
    try:
        row = [0.5] * 29
        store.insert_values(COLUMNS, [("a-0", 1.0, *row, None, 0.1, 0, 0.5, "m", "1", 0.2, 0, "2"),
                                      ("b-0", 1.0, *row, None, 0.1, 0, 0.5, "m", "1", None, None, None)])
    finally:
        store.dispose()
    assert log_counts(str(tmp_path / "log.db")) == (2, 1)


def test_a_process_groups_cpu_time_counts_every_member_and_the_children_they_reaped():
    # A process group of its own: a parent that burns CPU, and a child that burns more and is reaped.
    burn = "import time\nend = time.process_time() + {0}\nwhile time.process_time() < end: pass\n"
    script = (f"import subprocess, sys\nsubprocess.run([sys.executable, '-c', {burn.format(0.6)!r}])\n"
              + burn.format(0.4) + "import time; time.sleep(30)\n")
    process = subprocess.Popen([sys.executable, "-c", script], start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while group_cpu_seconds(process.pid) < 1.0 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert 1.0 <= group_cpu_seconds(process.pid) < 2.0
        assert group_cpu_seconds(os.getpgid(0)) != group_cpu_seconds(process.pid)  # only that group
    finally:
        process.kill()
        process.wait()


@pytest.mark.postgres
def test_the_cpu_time_of_a_databases_backends_is_counted_and_no_other_databases(postgres_url):
    import psycopg
    import sqlalchemy as sa

    database = sa.make_url(postgres_url).database
    with psycopg.connect(postgres_url) as conn:
        before = postgres_cpu_seconds(database)
        conn.execute("SELECT count(*) FROM generate_series(1, 3000000)").fetchone()
        spent = postgres_cpu_seconds(database) - before
        assert spent >= 0.05
        assert postgres_cpu_seconds(database + "_other") == 0.0


def result(target: str, clients: int, rps: float, p99: float) -> LoadResult:
    return LoadResult(target, clients, rps, p99 / 4, p99, int(rps * 5), 0)


SERVICE = "service /predict, defaults (2 event-loop workers)"
BARE = "bare Flask + gunicorn (2 event-loop workers), parse only"
SHADOW_OFF = "service /predict, SHADOW=off (2 event-loop workers)"
POSTGRES = "service /predict, request log on PostgreSQL (2 event-loop workers)"


def base_results() -> list[LoadResult]:
    results = []
    for clients in CLIENTS:
        results += [result(SERVICE, clients, 5_000, 4.0), result(BARE, clients, 9_000, 2.0),
                    result(REFERENCE, clients, 8_000, 2.0),
                    result("mlflow models serve -w 2 (version 1), /invocations", clients, 50, 300.0)]
    return results


def missed_goals(capsys) -> list[str]:
    return [line for line in capsys.readouterr().out.splitlines() if line.endswith("MISSED")]


BATCH = BatchResult(1000, 7.0, 9.0, 6.0, 8.0)


def test_goals_hold_the_p99_on_the_grown_log_too(capsys):
    grown = _grown(1_000)
    results = [*base_results(), *(result(grown, clients, 4_900, 12.5) for clients in CLIENTS)]
    checks = print_table(results, {SERVICE: BATCH}, 3, 5, Roles(SERVICE, BARE, grown=grown, log_rows=1_000))
    assert checks["p99 latency at 8 clients (ms)"][:2] == (4.0, GOALS["p99_ms"])
    assert checks["p99 latency at 8 clients, log of 1,000 rows (ms)"][:2] == (12.5, GOALS["p99_ms"])
    assert checks["throughput vs bare Flask + gunicorn, 8 client(s)"][0] == 5_000 / 9_000
    missed = missed_goals(capsys)
    assert len(missed) == 1 and "log of 1,000 rows" in missed[0]
    without = print_table(base_results(), {SERVICE: BATCH}, 3, 5, Roles(SERVICE, BARE))
    assert not any("log of" in name for name in without)


def test_the_shadow_is_held_to_its_cpu_per_request_over_the_service_without_it(capsys):
    results = [dataclasses.replace(r, cpu_ms=0.40 if r.clients == 1 else 0.30) if r.target == SERVICE else r
               for r in base_results()]
    results += [dataclasses.replace(result(SHADOW_OFF, 1, 5_200, 3.5), cpu_ms=0.36),
                dataclasses.replace(result(SHADOW_OFF, 8, 5_300, 3.5), cpu_ms=0.25)]
    checks = print_table(results, {SERVICE: BATCH}, 3, 5, Roles(SERVICE, BARE, shadow_off=SHADOW_OFF))
    assert checks["CPU per request, shadow on / off, 1 client(s)"][:2] == (pytest.approx(0.40 / 0.36),
                                                                            GOALS["shadow_cpu"])
    assert checks["CPU per request, shadow on / off, 8 client(s)"][0] == pytest.approx(0.30 / 0.25)
    missed = missed_goals(capsys)
    assert len(missed) == 1 and "shadow on / off, 8 client(s)" in missed[0]  # 1.20 > 1.15; 1.11 is within


def test_the_postgresql_log_is_held_to_half_the_sqlite_throughput_its_p99_and_its_batch(capsys):
    results = [*base_results(), result(POSTGRES, 1, 2_600, 3.0), result(POSTGRES, 8, 2_400, 16.0)]
    batches = {SERVICE: BATCH, POSTGRES: BatchResult(1000, 41.0, 50.0, 30.0, 45.0)}
    checks = print_table(results, batches, 3, 5, Roles(SERVICE, BARE, postgres=POSTGRES))
    assert checks["throughput, PostgreSQL / SQLite request log, 1 client(s)"][:2] == (2_600 / 5_000,
                                                                                       GOALS["pg_vs_sqlite"])
    assert checks["throughput, PostgreSQL / SQLite request log, 8 client(s)"][0] == 2_400 / 5_000
    assert checks["p99 latency at 8 clients, PostgreSQL log (ms)"][:2] == (16.0, GOALS["pg_p99_ms"])
    assert checks["1,000-row batch, server time, PostgreSQL log (ms)"][:2] == (41.0, GOALS["pg_batch_ms"])
    missed = missed_goals(capsys)
    assert len(missed) == 3 and not any("1 client(s)" in line for line in missed)
