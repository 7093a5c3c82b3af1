"""The serving benchmark's own logic, without its servers: the grown request log it starts one
target with, and the goals it judges (`make bench` runs the rest, with wrk)."""

from __future__ import annotations

import uuid

from benchmarks.serve import (
    CLIENTS,
    GOALS,
    REFERENCE,
    BatchResult,
    LoadResult,
    _grown,
    prefill_request_log,
    print_table,
)
from common.store import RequestStore


def test_prefilled_log_holds_the_rows_as_the_service_writes_them(tmp_path):
    row = [0.5] * 29
    prefill_request_log(tmp_path / "grown.db", 25_001, row, "7")
    store = RequestStore(str(tmp_path / "grown.db"), create=False)
    try:
        assert store.count() == 25_001
        frame = store.read_frame(("request_id", "model_version", "V1", "Amount_scaled"))
    finally:
        store.dispose()
    ids = frame["request_id"]
    assert ids.is_unique and ids.str.endswith("-0").all()
    assert {uuid.UUID(i.removesuffix("-0")).version for i in ids} == {7}
    assert set(frame["model_version"]) == {"7"} and set(frame["V1"]) == {0.5} and set(frame["Amount_scaled"]) == {0.5}


def result(target: str, clients: int, rps: float, p99: float) -> LoadResult:
    return LoadResult(target, clients, rps, p99 / 4, p99, int(rps * 5), 0)


def test_goals_hold_the_p99_on_the_grown_log_too(capsys):
    service, bare, grown = ("service /predict, defaults (2 event-loop workers)",
                            "bare Flask + gunicorn (2 event-loop workers), parse only", _grown(1_000))
    results = []
    for clients in CLIENTS:
        results += [result(service, clients, 5_000, 4.0), result(grown, clients, 4_900, 12.5),
                    result(bare, clients, 9_000, 2.0), result(REFERENCE, clients, 8_000, 2.0),
                    result("mlflow models serve -w 2 (version 1), /invocations", clients, 50, 300.0)]
    batch = BatchResult(1000, 7.0, 9.0, 6.0, 8.0)
    checks = print_table(results, batch, 100, 100, 3, 5, service, bare, log_rows=1_000)
    assert checks["p99 latency at 8 clients (ms)"][:2] == (4.0, GOALS["p99_ms"])
    assert checks["p99 latency at 8 clients, log of 1,000 rows (ms)"][:2] == (12.5, GOALS["p99_ms"])
    assert checks["throughput vs bare Flask + gunicorn, 8 client(s)"][0] == 5_000 / 9_000
    missed = [line for line in capsys.readouterr().out.splitlines() if line.endswith("MISSED")]
    assert len(missed) == 1 and "log of 1,000 rows" in missed[0]
    without = print_table([r for r in results if r.target != grown], batch, 100, 100, 3, 5, service, bare)
    assert not any("log of" in name for name in without)
