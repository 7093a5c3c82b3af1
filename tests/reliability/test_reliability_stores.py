"""Request-log trouble while the load runs: a SQLite file held by another writer, and a PostgreSQL
server stopped and started again (a throwaway cluster of our own, never the machine's shared one)."""

from __future__ import annotations

import os

import pytest

from benchmarks.reliability import SQLITE_RETRY_SECONDS, ThrowawayPostgres, postgres_restart, sqlite_writer_lock

pytestmark = pytest.mark.slow


def test_a_sqlite_log_locked_past_the_retry_budget_gives_503s_then_recovers_without_losing_rows(world, tmp_path):
    result = sqlite_writer_lock(world, tmp_path, clients=4)
    assert result.ok, result.explain()
    # Held longer than the retry budget, some requests must have met the lock for the whole budget.
    assert result.errors > 0, f"no 503 although the lock outlasted the {SQLITE_RETRY_SECONDS:g} s retry budget"
    assert result.rows_lost == 0


def test_a_restarted_postgresql_log_gives_503s_then_recovers_without_a_restart_or_lost_rows(world, tmp_path):
    reason = ThrowawayPostgres.unavailable()
    if reason:
        if os.environ.get("REQUIRE_POSTGRES") == "1":
            pytest.fail(f"{reason}, and REQUIRE_POSTGRES=1")
        pytest.skip(reason)
    result = postgres_restart(world, tmp_path, clients=4, down_seconds=2.0)
    assert result.ok, result.explain()
    assert result.errors > 0 and result.rows_lost == 0
