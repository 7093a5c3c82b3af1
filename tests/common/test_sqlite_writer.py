"""The SQLite writer machinery on real files and real processes: the writer lock queues every writer
of a file and bounds their wait, survives a holder killed mid-write, and the checkpointer keeps the
WAL bounded under continuous commits."""

from __future__ import annotations

import multiprocessing
import os
import queue
import signal
import sqlite3
import threading
import time

import pytest
import sqlalchemy as sa

from common.retries import RETRYABLE
from common.text import first_line
from tests.helpers.sqlite_writers import (
    connect,
    hold_turn,
    hold_turn_until_killed,
    lock_of,
    take_turns,
    write_continuously,
    write_turn,
)

# Spawned, not forked: the test process has threads (pytest's, the checkpointer's of other tests).
spawn = multiprocessing.get_context("spawn")


@pytest.fixture
def database(tmp_path) -> str:
    path = str(tmp_path / "requests.db")
    connect(path).close()
    return path


def _rows(path: str) -> list[str]:
    with sqlite3.connect(path) as conn:
        return [writer for (writer,) in conn.execute("SELECT writer FROM turns ORDER BY id")]


def _stop(process) -> None:
    if process.is_alive():
        process.kill()
    process.join(10)


def test_writers_of_several_processes_and_threads_all_get_their_turns_and_none_starves(database):
    # Every writer commits back to back, the worst case for a waiter, for longer than the lock's
    # timeout: a writer left waiting while the others take turns fails with "no write turn". Each
    # one's connection has no busy timeout, so two writers inside the file at once would fail with
    # "database is locked": only the lock queues them. Nine writers on a shared two-core machine: the
    # timeout leaves room for a writer the scheduler did not run for a while, not for one left out.
    processes, threads, seconds, timeout = 3, 3, 6.0, 4.0
    start, results = spawn.Event(), spawn.Queue()
    writers = [spawn.Process(target=take_turns, args=(database, f"p{i}", threads, seconds, timeout, start, results))
               for i in range(processes)]
    for process in writers:
        process.start()
    try:
        time.sleep(1.0)  # the interpreters start and their writers connect
        start.set()
        outcomes = sorted(results.get(timeout=120) for _ in range(processes * threads))
    finally:
        for process in writers:
            _stop(process)
    assert [error for *_, error in outcomes if error] == []
    names = [f"p{p}-t{t}" for p in range(processes) for t in range(threads)]
    assert [name for name, *_ in outcomes] == names
    assert all(written > 0 and longest < timeout for _, written, longest, _ in outcomes), outcomes
    rows = _rows(database)
    assert {name: rows.count(name) for name in names} == {name: written for name, written, *_ in outcomes}
    assert len(rows) == sum(written for _, written, *_ in outcomes)


@pytest.mark.parametrize("holder", ["another process", "another thread"])
def test_a_writer_that_gets_no_turn_within_the_timeout_fails_like_a_busy_database(database, holder):
    lock = lock_of(database, timeout=0.3)  # this process's lock of the file, shared by its threads as in a store
    holding, release = spawn.Event(), spawn.Event()
    if holder == "another process":
        other = spawn.Process(target=hold_turn, args=(database, holding, release))
    else:
        other = threading.Thread(target=_hold_in_thread, args=(lock, holding, release))
    other.start()
    conn = connect(database)
    try:
        assert holding.wait(30), "the holder never got the lock"
        asked = time.monotonic()
        with pytest.raises(sa.exc.OperationalError) as failed:
            write_turn(lock, conn, "late")
        waited = time.monotonic() - asked
    finally:
        release.set()
        other.join(30)
    assert isinstance(failed.value, RETRYABLE)  # retried, then StoreUnavailable, as a busy database is
    assert first_line(failed.value) == "database is locked: no write turn within 0.3 s"
    assert 0.3 <= waited < 0.3 + 2.0, waited  # about the timeout, not for ever
    assert _rows(database) == []
    write_turn(lock, conn, "next")  # the next turn is there once the holder is done
    conn.close()
    assert _rows(database) == ["next"]


def _hold_in_thread(lock, holding, release) -> None:
    with lock:
        holding.set()
        release.wait(60)


def test_a_writer_killed_while_holding_the_lock_leaves_it_to_the_next_writer(database):
    holding = spawn.Event()
    killed = spawn.Process(target=hold_turn_until_killed, args=(database, holding))
    killed.start()
    try:
        assert holding.wait(30), "the child never took the lock"
        conn = connect(database)
        with pytest.raises(sa.exc.OperationalError, match="no write turn"):  # it really holds the turn
            write_turn(lock_of(database, timeout=0.2), conn, "too early")
        os.kill(killed.pid, signal.SIGKILL)
        killed.join(30)
        assert killed.exitcode == -signal.SIGKILL
        write_turn(lock_of(database, timeout=5), conn, "next")
        conn.close()
    finally:
        _stop(killed)
    assert _rows(database) == ["next"]  # the killed writer's row was never committed


def test_the_checkpointer_restarts_a_wal_that_outgrows_its_limit_under_continuous_commits(database):
    # Each commit writes a row of two pages or more; SQLite's own checkpoints are off. Without the
    # restart, 2,000 commits leave a WAL of well over 20 MiB, since the file only ever grows, and
    # a checkpoint running while the writer appends never finds every frame copied.
    commits, reset_bytes = 2000, 1024**2
    results = spawn.Queue()
    writer = spawn.Process(target=write_continuously,
                           args=(database, commits, 0.01, reset_bytes, 8000, results))
    wal = database + "-wal"
    largest = 0
    writer.start()
    try:
        while writer.is_alive():
            if os.path.exists(wal):
                largest = max(largest, os.path.getsize(wal))
            time.sleep(0.002)
        checkpoints, resets = results.get(timeout=30)
    except queue.Empty:
        pytest.fail(f"the writer ended without a result (exit code {writer.exitcode})")
    finally:
        _stop(writer)
    assert writer.exitcode == 0
    assert checkpoints > 0 and resets > 0
    assert largest < 8 * reset_bytes, f"the WAL reached {largest / 1024**2:.1f} MiB"
    assert len(_rows(database)) == commits
