"""Writers of one SQLite file in other processes, for the tests of common.sqlite_writer.

Module-level functions, so that multiprocessing's "spawn" start method can run them in a fresh
interpreter (no fork of a test process that has threads). Every writer takes the file's
WriterLock for each write transaction, as RequestStore's writers do.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

from common.sqlite_writer import Checkpointer, WriterLock, apply_pragmas

SCHEMA = "CREATE TABLE IF NOT EXISTS turns (id INTEGER PRIMARY KEY, writer TEXT NOT NULL, payload BLOB)"


def connect(path: str, *, busy_timeout_s: float = 0.0) -> sqlite3.Connection:
    """An autocommit connection in WAL mode. With no busy timeout, a writer that finds another one
    inside the file fails at once ("database is locked"): the lock, not SQLite, must queue them."""
    conn = sqlite3.connect(path, isolation_level=None, timeout=busy_timeout_s, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(SCHEMA)
    return conn


def lock_of(path: str, timeout: float) -> WriterLock:
    return WriterLock(Path(path + "-lock"), timeout=timeout)


def write_turn(lock: WriterLock, conn: sqlite3.Connection, writer: str, payload: bytes = b"") -> float:
    """One write transaction in one turn of the lock; returns the seconds spent waiting for the turn."""
    asked = time.monotonic()
    with lock:
        waited = time.monotonic() - asked
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("INSERT INTO turns (writer, payload) VALUES (?, ?)", (writer, payload))
        conn.execute("COMMIT")
    return waited


def take_turns(path: str, process: str, threads: int, seconds: float, timeout: float, start, results) -> None:
    """Run `threads` writers that write rows back to back for `seconds`, one turn of the lock each.

    Every writer puts (name, rows written, longest wait for a turn, error or None) on `results`
    once it is done or has failed. `start` (an Event) holds every writer back until all are ready.
    """
    lock = lock_of(path, timeout)

    def writer(name: str) -> None:
        written, longest, error = 0, 0.0, None
        conn = connect(path)
        try:
            start.wait(60)
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                longest = max(longest, write_turn(lock, conn, name))
                written += 1
        except Exception as exc:  # reported to the test, which fails on it
            error = f"{type(exc).__name__}: {exc}"
        finally:
            conn.close()
        results.put((name, written, longest, error))

    workers = [threading.Thread(target=writer, args=(f"{process}-t{i}",)) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()


def hold_turn_until_killed(path: str, holding) -> None:
    """Take the lock, start a write transaction, insert a row, set `holding`, and never commit."""
    lock = lock_of(path, timeout=5)
    conn = connect(path)
    lock.__enter__()
    conn.execute("BEGIN IMMEDIATE")
    conn.execute("INSERT INTO turns (writer) VALUES ('killed')")
    holding.set()
    time.sleep(600)


def hold_turn(path: str, holding, release) -> None:
    """Take the lock, set `holding`, and give the turn back once `release` is set."""
    with lock_of(path, timeout=5):
        holding.set()
        release.wait(60)


def write_continuously(path: str, commits: int, interval: float, reset_bytes: int, payload_bytes: int,
                       results) -> None:
    """Commit `commits` rows one by one, as a request log's worker does: through the lock, with
    SQLite's own checkpoints off and a Checkpointer (the given limits) notified after each commit.

    Puts (checkpoints, resets) of the Checkpointer on `results` when done.
    """
    lock = lock_of(path, timeout=5)
    conn = connect(path, busy_timeout_s=5)

    def checkpoint_connection() -> sqlite3.Connection:
        own = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        apply_pragmas(own)
        return own

    checkpointer = Checkpointer(path, lock, checkpoint_connection, interval=interval, reset_bytes=reset_bytes)
    checkpointer.take_over(conn)
    payload = b"x" * payload_bytes
    try:
        for i in range(commits):
            write_turn(lock, conn, "w", payload)
            checkpointer.committed()
            if i % 100 == 0:
                time.sleep(0.0005)  # requests come with gaps; the checkpoint thread needs the GIL now and then
    finally:
        checkpointer.close()
        conn.close()
    results.put((checkpointer.checkpoints, checkpointer.resets))
