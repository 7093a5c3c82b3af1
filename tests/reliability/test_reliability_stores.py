"""Request-log trouble while the load runs: a SQLite file held by another writer, a PostgreSQL server
stopped and started again (a private cluster, never the machine's shared one), and PostgreSQL
commits whose acknowledgement is lost on the way back."""

from __future__ import annotations

import fcntl
import os
import sqlite3
import time

import pytest

from common.schema import FEATURES
from common.sqlite_writer import SQLITE_BUSY_TIMEOUT_MS
from common.store import RequestStore, StoreUnavailable
from service.request_log import WRITE_RETRIES
from tests.helpers.gunicorn import WORKERS
from tests.helpers.load import Load, Outcome, reconcile, summary
from tests.helpers.pg_proxy import CommitAckCutter

# The request log's retry budget on a locked SQLite file: each attempt waits out the busy timeout,
# with 50 ms and 100 ms of backoff between attempts (common/store.py, service/request_log.py).
SQLITE_RETRY_SECONDS = (WRITE_RETRIES + 1) * SQLITE_BUSY_TIMEOUT_MS / 1000 + 0.05 * (2**WRITE_RETRIES - 1)
# SQLite's busy handler adds up its planned sleeps rather than reading the clock, so on a busy CPU
# the budget stretches in wall time. A 503 later than this means the wait is not bounded: it grows
# with the number of writers queued on the log (8 request threads: over a minute before the fix).
SQLITE_LOCK_LIMIT = 3 * SQLITE_RETRY_SECONDS
# Load keeps running until the outage's effects are seen, at most this much longer.
SLACK_SECONDS = 120.0
SETTLE_SECONDS = 3.0


def check_outage(outcomes: list[Outcome], outage_ends: float, pids_before: list[int], pids_after: list[int], *,
                 expect_errors: bool) -> None:
    """While the log was away, failures are 503 request_log_unavailable only (and there were some,
    if `expect_errors`, else none); requests started after it came back succeed, from the same workers."""
    failures = [o for o in outcomes if not o.ok]
    wrong = [o for o in failures if (o.status, o.code) != (503, "request_log_unavailable")]
    assert not wrong, f"while the request log was away, expected 503 request_log_unavailable only; got {summary(wrong)}"
    if expect_errors:
        assert failures, "no request was answered 503 while the log was away"
    else:
        assert not failures, f"a short outage within the retry budget failed requests: {summary(failures)}"
    late = [o for o in failures if o.started > outage_ends]
    assert not late, f"{len(late)} requests started after the log was back still failed"
    assert any(o.ok and o.started > outage_ends for o in outcomes), "no request succeeded after the log was back"
    assert pids_before == pids_after, f"the workers changed ({pids_before} -> {pids_after}): recovery needed a restart"


def note_failures(scenario, outcomes: list[Outcome]) -> None:
    failures = [o for o in outcomes if not o.ok]
    if failures:
        slowest = max(o.ended - o.started for o in failures)
        scenario.notes.append(f"{len(failures)} answered 503; the slowest after {slowest:.1f} s")


@pytest.mark.slow
@pytest.mark.scenario("SQLite log held by another writer")
@pytest.mark.parametrize("hold_seconds", [None, 3.0], ids=["until-503", "3s"])
def test_a_sqlite_log_held_by_another_writer_gives_bounded_503s_then_recovers_without_losing_rows(
        serve, sample_rows, size, scenario, hold_seconds):
    """Another connection holds the SQLite request log's write lock (BEGIN EXCLUSIVE).

    Until requests have waited out the retry budget and been answered 503 request_log_unavailable,
    and released then: the 503 comes within SQLITE_LOCK_LIMIT seconds (a longer wait would be an
    unbounded retry). Or for `hold_seconds`, shorter than the budget: requests just wait and succeed.
    Either way the same workers serve again once it is released, and no row reported as scored is lost.
    """
    # More clients than the workers have request threads: every thread queues on the log at once.
    clients = max(4 * WORKERS, size.fault_clients)
    if hold_seconds is not None:
        scenario.name = f"SQLite log held {hold_seconds:g} s"
    service = serve("sqlite-lock")
    scenario.step("service up")
    with Load(service.url, sample_rows, clients=clients, seconds=SQLITE_LOCK_LIMIT + SLACK_SECONDS) as load:
        load.wait_for(lambda o: sum(x.ok for x in o) >= clients, "successful requests before the lock")
        pids_before = service.workers()
        holder = sqlite3.connect(service.request_log, timeout=30, isolation_level=None)
        try:
            holder.execute("BEGIN EXCLUSIVE")
            locked = time.monotonic()
            scenario.step("request log locked")
            if hold_seconds is None:
                while time.monotonic() < locked + SQLITE_LOCK_LIMIT and not any(o.status == 503 for o in load.outcomes):
                    time.sleep(0.05)
            else:
                load.sleep_until(locked + hold_seconds)
            holder.execute("ROLLBACK")
        finally:
            holder.close()
        released = time.monotonic()
        scenario.step("request log released")
        load.wait_for(lambda o: sum(x.ok and x.started > released for x in o) >= clients,
                      "successful requests after the lock", timeout=SQLITE_LOCK_LIMIT)
        load.sleep_until(released + SETTLE_SECONDS)
        outcomes = load.stop()
    pids_after = service.workers()
    ledger = reconcile(outcomes, service.logged_ids())
    scenario.took(load)
    scenario.faults = 1
    scenario.rows_lost = len(ledger.lost)
    scenario.notes.append(f"lock held {released - locked:.1f} s; retry budget {SQLITE_RETRY_SECONDS:g} s")
    note_failures(scenario, outcomes)

    check_outage(outcomes, released, pids_before, pids_after,
                 expect_errors=hold_seconds is None or hold_seconds > SQLITE_RETRY_SECONDS + 1)
    slow = [o for o in outcomes if not o.ok and o.ended - o.started > SQLITE_LOCK_LIMIT]
    assert not slow, f"{len(slow)} requests waited longer than {SQLITE_LOCK_LIMIT:g} s for their 503"
    assert service.integrity() == "ok", f"PRAGMA integrity_check says {service.integrity()!r}"
    ledger.check(exact=True)


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
@pytest.mark.scenario("PostgreSQL log restarted")
def test_a_restarted_postgresql_log_gives_503s_then_recovers_without_a_restart_or_lost_rows(
        private_postgres, serve, sample_rows, size, scenario):
    """The PostgreSQL request log stops (pg_ctl stop -m fast) and starts again while the load runs:
    bounded retries then 503 request_log_unavailable, service again without a restart, and no row
    reported as scored lost."""
    clients, down_seconds = size.fault_clients, size.fault_seconds / 2
    scenario.name = f"PostgreSQL log restarted ({down_seconds:g} s down)"
    service = serve("postgres", request_log=private_postgres.url)
    scenario.step("PostgreSQL and service up")
    with Load(service.url, sample_rows, clients=clients, seconds=down_seconds + SLACK_SECONDS) as load:
        load.wait_for(lambda o: sum(x.ok for x in o) >= clients, "successful requests before the stop")
        pids_before = service.workers()
        stopping = time.monotonic()
        private_postgres.stop()
        scenario.step("PostgreSQL stopped")
        load.sleep_until(time.monotonic() + down_seconds)
        private_postgres.start()
        scenario.step("PostgreSQL started")
        started = time.monotonic()
        load.wait_for(lambda o: sum(x.ok and x.started > started for x in o) >= clients,
                      "successful requests after the restart")
        load.sleep_until(time.monotonic() + SETTLE_SECONDS)
        outcomes = load.stop()
    pids_after = service.workers()
    ledger = reconcile(outcomes, service.logged_ids())
    scenario.took(load)
    scenario.faults = 1
    scenario.rows_lost = len(ledger.lost)
    scenario.notes.append(f"database down for {started - stopping:.1f} s")
    note_failures(scenario, outcomes)

    # Requests that began before the database was up again may have met it down; later ones must not fail.
    check_outage(outcomes, started, pids_before, pids_after, expect_errors=True)
    ledger.check(exact=False)


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.scenario("PostgreSQL commit acknowledgement lost")
def test_commits_whose_acknowledgement_is_lost_still_answer_200_and_log_each_row_once(postgres_url, serve,
                                                                                   sample_rows, size, scenario):
    """The request log is on PostgreSQL behind a loopback proxy (tests/helpers/pg_proxy.py) that, again
    and again while the load runs, lets a COMMIT through and cuts its connection before the answer: the
    rows are committed, and the worker that wrote them sees its connection lost. Its retry finds them and
    counts the write as done, so every client gets 200, and the log holds each row exactly once."""
    clients, seconds = size.fault_clients, size.seconds
    with CommitAckCutter() as proxy:
        service = serve("lost-ack", request_log=proxy.url(postgres_url))
        scenario.step("PostgreSQL proxy and service up")
        with Load(service.url, sample_rows, clients=clients, seconds=seconds + SLACK_SECONDS) as load:
            cut_at = load.started
            while time.monotonic() < load.started + seconds:
                # Every client answered since the last cut, the one whose COMMIT was cut too: one fault
                # per request at a time (a retry cut again would be two in a row).
                load.wait_for(lambda o, t=cut_at: len({x.client for x in o if x.started > t}) == clients,
                              "an answer to every client since the last cut")
                proxy.lose_next_commit_ack()
                assert proxy.cut.wait(30), "no COMMIT went through the proxy within 30 s"
                cut_at = time.monotonic()
                scenario.faults += 1
            outcomes = load.stop()
        scenario.step(f"{scenario.faults} acknowledgements lost")
        service.stop()
    store = RequestStore(postgres_url, create=False)
    try:
        logged = list(store.read_frame(("request_id",))["request_id"])
    finally:
        store.dispose()
    ledger = reconcile(outcomes, set(logged))
    scenario.took(load)
    scenario.rows_lost = len(ledger.lost)
    scenario.duplicates = len(logged) - len(set(logged))

    failures = [o for o in outcomes if not o.ok]
    assert scenario.faults > 0, "no acknowledgement was lost"
    assert not failures, (f"{len(failures)} requests failed with {scenario.faults} acknowledgements lost: "
                          f"{summary(failures)}")
    assert scenario.duplicates == 0, f"{scenario.duplicates} rows are logged more than once"
    ledger.check(exact=True)
