"""Request-log trouble while the load runs: a SQLite file held by another writer, and a PostgreSQL
server stopped and started again (a throwaway cluster of our own, never the machine's shared one)."""

from __future__ import annotations

import fcntl
import os
import time

import pytest

from benchmarks.reliability import (
    SQLITE_LOCK_LIMIT,
    WORKERS,
    ThrowawayPostgres,
    postgres_restart,
    sqlite_writer_lock,
)
from common.schema import FEATURES
from common.store import RequestStore, StoreUnavailable


@pytest.mark.slow
def test_a_sqlite_log_held_by_another_writer_gives_bounded_503s_then_recovers_without_losing_rows(world, tmp_path):
    # More clients than the workers have request threads: every thread queues on the log at once.
    result = sqlite_writer_lock(world, tmp_path, clients=4 * WORKERS)
    assert result.ok, result.explain()
    assert result.errors > 0, f"no 503 within {SQLITE_LOCK_LIMIT:g} s of the lock"
    assert result.rows_lost == 0


def test_a_sqlite_writer_waits_a_bounded_time_for_its_turn_then_fails_the_write(tmp_path):
    store = RequestStore(str(tmp_path / "requests.db"))
    store._write_lock.timeout = 0.3  # the busy timeout (5 s) in the service
    row = ("r-0", 0.0, *[0.0] * len(FEATURES))
    holder = os.open(tmp_path / "requests.db-lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(holder, fcntl.LOCK_EX)  # another worker's writer has the turn and keeps it
        started = time.monotonic()
        with pytest.raises(StoreUnavailable, match=r"no write turn within 0\.3 s"):
            store.insert_values(("request_id", "ts", *FEATURES), [row], retries=2, backoff=0.01)
        assert time.monotonic() - started < 3 * 0.3 + 2
        fcntl.flock(holder, fcntl.LOCK_UN)
        assert store.insert_values(("request_id", "ts", *FEATURES), [row]) == 1
    finally:
        os.close(holder)
        store.dispose()


@pytest.mark.slow
def test_a_restarted_postgresql_log_gives_503s_then_recovers_without_a_restart_or_lost_rows(world, tmp_path):
    reason = ThrowawayPostgres.unavailable()
    if reason:
        if os.environ.get("REQUIRE_POSTGRES") == "1":
            pytest.fail(f"{reason}, and REQUIRE_POSTGRES=1")
        pytest.skip(reason)
    result = postgres_restart(world, tmp_path, clients=4, down_seconds=2.0)
    assert result.ok, result.explain()
    assert result.errors > 0 and result.rows_lost == 0
