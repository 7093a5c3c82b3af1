"""Writing one SQLite file fast and safely from many threads and processes.

SQLite lets one writer at a time into a file. This module owns what the request log's writers (the
threads of several gunicorn workers) need beyond SQL to take their turns quickly and keep the file
healthy; it knows nothing of any table:

- `apply_pragmas`: what every connection gets when it opens (WAL, the busy timeout, `synchronous`).
- `WriterLock`: queues the writers of one file, across threads and processes, with a bounded wait.
- `Checkpointer`: checkpoints the WAL in a background thread instead of inside commits, and keeps
  the WAL file bounded under continuous writes.
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import sqlalchemy as sa

from common import settings
from common.text import first_line
from common.thread_connections import close_quietly

log = logging.getLogger(__name__)

# WAL lets readers and the writers of several gunicorn workers proceed together; the busy timeout
# makes a writer wait for the database's lock instead of failing at once.
SQLITE_BUSY_TIMEOUT_MS = 5000
# The WAL is checkpointed by a Checkpointer this often while rows arrive; once the WAL holds more
# than WAL_RESET_BYTES of frames, the thread completes one checkpoint while holding the writers'
# lock, so that the next commit starts the file over.
CHECKPOINT_INTERVAL_SECONDS = 0.2
WAL_RESET_BYTES = 32 * 1024**2


def apply_pragmas(dbapi_connection, _record=None) -> None:
    """Set up a new SQLite driver connection; usable as an engine's "connect" event listener."""
    cursor = dbapi_connection.cursor()
    # A new (empty) file gets auto_vacuum=INCREMENTAL before WAL writes its header (decision 029; kept
    # when 033 moved the space's return to a VACUUM: see there). Only on a new file: on an existing
    # one the pragma would wait for its lock, and take effect only at a VACUUM.
    path = next((row[2] for row in cursor.execute("PRAGMA database_list") if row[1] == "main"), "")
    if path and (not os.path.exists(path) or os.path.getsize(path) == 0):
        cursor.execute("PRAGMA auto_vacuum=INCREMENTAL")
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    # NORMAL by default: in WAL mode a committed row survives any process crash without a disk flush
    # per commit; FULL adds one for power-loss durability. See docs/decisions/006-sqlite-synchronous-normal.md.
    cursor.execute(f"PRAGMA synchronous={settings.sqlite_synchronous()}")
    cursor.close()


class WriterLock:
    """Queues the writers of one SQLite file, across threads and processes, on a kernel lock.

    A writer waiting in SQLite's own busy handler sleeps ever longer between tries; one waiting here
    gets the file as soon as the writer before it is done (docs/decisions/002-sqlite-writer-lock.md).
    Readers never take it (WAL). The lock is a side file, `<database>-lock`, so SQLite's own locks on
    the database are untouched; the kernel releases it when its holder dies.

    The wait is bounded (`timeout`, the busy timeout by default): a writer that holds the lock may
    itself wait out SQLite's busy timeout when another program holds the database, and the writers
    queued behind it must not wait for each of those in turn. A writer that cannot get the lock in
    time fails like a busy database does: `sqlalchemy.exc.OperationalError`, "database is locked".

    Use it as a context manager around a write transaction: `with lock: ...`.
    """

    # Between tries of the process lock: a commit holds it only briefly, so a waiter first only
    # yields the CPU, then sleeps a little, and in a long wait (another program holding the
    # database) sleeps longer so as not to spin. The values: docs/decisions/002-sqlite-writer-lock.md.
    _SPIN_SECONDS = 0.0005
    _SHORT_POLL_SECONDS = 0.00005
    _SHORT_WAIT_SECONDS = 0.002
    _LONG_POLL_SECONDS = 0.0005

    def __init__(self, path: Path, timeout: float = SQLITE_BUSY_TIMEOUT_MS / 1000):
        self.path = path
        self.timeout = timeout
        self._thread_lock = threading.Lock()
        self._fd: int | None = None
        self._pid: int | None = None

    def __enter__(self) -> None:
        started = time.monotonic()
        deadline = started + self.timeout
        if not self._thread_lock.acquire(timeout=self.timeout):
            raise self._locked()
        try:
            if self._fd is None or self._pid != os.getpid():
                self._fd, self._pid = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644), os.getpid()
            while True:
                try:
                    fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    return
                except BlockingIOError:
                    now = time.monotonic()
                    if now >= deadline:
                        raise self._locked() from None
                    waited = now - started
                    if waited < self._SPIN_SECONDS:
                        os.sched_yield()
                    else:
                        time.sleep(self._SHORT_POLL_SECONDS if waited < self._SHORT_WAIT_SECONDS
                                   else self._LONG_POLL_SECONDS)
        except BaseException:
            self._thread_lock.release()
            raise

    def _locked(self) -> sa.exc.OperationalError:
        return sa.exc.OperationalError(f"waiting for {self.path.name}", None,
                                       TimeoutError(f"database is locked: no write turn within {self.timeout:g} s"))

    def __exit__(self, *_exc) -> None:
        try:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            self._thread_lock.release()

    def close(self) -> None:
        with self._thread_lock:
            if self._fd is not None and self._pid == os.getpid():
                os.close(self._fd)
            self._fd = None


class Checkpointer:
    """Runs the WAL checkpoints of one SQLite file in a background thread instead of inside commits.

    SQLite's own checkpoint runs inside the commit that takes the WAL past a threshold, while that
    commit still holds the writers' turn, so every writer queued behind it waits too
    (docs/decisions/003-wal-checkpoint-thread.md). The writers that hand their checkpoints to this
    thread turn SQLite's off (`take_over`) and call `committed` after each commit; the thread then
    runs a PASSIVE checkpoint, which copies pages while writers go on appending, every `interval`.

    A WAL file starts over only when a commit finds every frame checkpointed, which continuous
    writes can postpone for ever. So when a checkpoint reports more than `reset_bytes` of frames,
    the thread runs one more while holding the writers' lock: it copies only the frames appended
    meanwhile, and the next commit restarts the file. Durability does not depend on any of this: a
    committed row is in the WAL, and readers see it there. Another process's thread checkpointing at
    the same moment makes a PASSIVE checkpoint report busy, not fail.

    Args:
        path: the database file.
        write_lock: the lock its writers take for each write transaction.
        connect: opens a driver connection of the thread's own (with `apply_pragmas` applied).
        interval: seconds between checkpoints while commits arrive (CHECKPOINT_INTERVAL_SECONDS).
        reset_bytes: WAL frames, in bytes, beyond which a checkpoint restarts the file (WAL_RESET_BYTES).
    """

    def __init__(self, path: str, write_lock: WriterLock, connect: Callable[[], object], *,
                 interval: float | None = None, reset_bytes: int | None = None):
        self.wal = Path(path + "-wal")
        self._write_lock = write_lock
        self._connect = connect
        self._interval = interval
        self._reset_bytes = reset_bytes
        self._pending = threading.Event()
        self._stop = threading.Event()
        self._guard = threading.Lock()
        self._thread: threading.Thread | None = None
        self._pid: int | None = None
        self._last_warning = 0.0
        self._page_bytes: int | None = None
        self.checkpoints = 0
        self.resets = 0

    @property
    def interval(self) -> float:
        return CHECKPOINT_INTERVAL_SECONDS if self._interval is None else self._interval

    @property
    def reset_bytes(self) -> int:
        return WAL_RESET_BYTES if self._reset_bytes is None else self._reset_bytes

    @staticmethod
    def take_over(conn) -> None:
        """Stop a writer's driver connection from checkpointing inside its commits."""
        conn.execute("PRAGMA wal_autocheckpoint=0")

    def committed(self) -> None:
        """A writer committed: checkpoint soon (starting the thread in this process if needed)."""
        if self._pid != os.getpid():
            with self._guard:
                if self._pid != os.getpid():
                    self._stop.clear()
                    self._thread = threading.Thread(target=self._run, name="sqlite-wal-checkpoint", daemon=True)
                    self._thread.start()
                    self._pid = os.getpid()
        if not self._pending.is_set():  # set() takes a lock and notifies: once per checkpoint is enough
            self._pending.set()

    def close(self, timeout: float = 5.0) -> None:
        with self._guard:
            thread, self._thread = self._thread, None
            self._pid = None
            self._stop.set()
        if thread is not None and thread.is_alive():
            thread.join(timeout)

    def _run(self) -> None:
        conn = None
        try:
            while not self._stop.wait(self.interval):
                if not self._pending.is_set():
                    continue
                self._pending.clear()
                try:
                    conn = conn or self._connect()
                    self._checkpoint(conn)
                except Exception as exc:  # the thread must outlive a bad moment: it warns and retries
                    if conn is not None:
                        close_quietly(conn)
                        conn = None
                    self._pending.set()
                    self._warn(exc)
        finally:
            if conn is not None:
                close_quietly(conn)

    def _checkpoint(self, conn) -> None:
        # (busy, frames in the WAL, frames checkpointed); the file's size is only its high-water mark.
        _busy, frames, _done = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        self.checkpoints += 1
        if frames * self._page_size(conn) > self.reset_bytes:
            with self._write_lock:
                conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
            self.resets += 1

    def _page_size(self, conn) -> int:
        if self._page_bytes is None:
            self._page_bytes = int(conn.execute("PRAGMA page_size").fetchone()[0])
        return self._page_bytes

    def _warn(self, exc: Exception) -> None:
        now = time.monotonic()
        if now - self._last_warning >= 60:
            self._last_warning = now
            log.warning("WAL checkpoint of %s failed (retrying): %s", self.wal.name, first_line(exc))
