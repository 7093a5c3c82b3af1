"""One gate at a time: the lock a promotion or a rollback holds for its whole decision and registry change.

The lock lives in the request log's database (LATEST_DB): the one store that every machine of a
deployment shares (the services, the drift check, CI and a person at a terminal all point at it),
and whose locks die with their holder, so a gate killed in the middle never leaves the next one
locked out (docs/decisions/016-one-gate-at-a-time.md):

- PostgreSQL: a session-level advisory lock, held on a connection of the gate's own; the server
  releases it when that session ends, however it ends.
- SQLite: an exclusive `flock` on `<database>-gate-lock` beside the database file; the kernel
  releases it when the process dies. Not the writers' `<database>-lock` (common.sqlite_writer),
  which the service takes for every write.

A gate that finds the lock held tries again every `poll_seconds` until `wait_seconds` have passed,
then gives up with `LockBusy`.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import sqlalchemy as sa

from common.store import describe, to_url
from common.text import first_line

# The advisory lock's key (any 64-bit number; this one spells "fraudgat" in ASCII). Every gate of
# every model in one database shares it: a deployment serves one model.
ADVISORY_KEY = 0x6672617564676174


class LockBusy(RuntimeError):
    """Another gate held the lock for the whole wait."""


class LockUnavailable(RuntimeError):
    """The lock's database or file cannot be reached, so whether another gate runs is unknown."""


@contextlib.contextmanager
def gate_lock(location: str, wait_seconds: float, *, poll_seconds: float = 0.2,
              on_wait: Callable[[str], None] | None = None) -> Iterator[str]:
    """Hold the gate lock of the request log at `location` (a SQLite path or a URL) for the block.

    Args:
        location: the request log (LATEST_DB).
        wait_seconds: how long to wait for another gate to finish.
        poll_seconds: the time between tries while waiting.
        on_wait: called once, with where the lock is, when the first try finds it held.

    Yields:
        Where the lock is, for messages.

    Raises:
        LockBusy: another gate held it for all of `wait_seconds`.
        LockUnavailable: the database or the lock file cannot be opened.
    """
    url = to_url(location)
    if url.startswith("sqlite:///"):
        lock = _FileLock(Path(url.removeprefix("sqlite:///") + "-gate-lock"))
    elif url.startswith("postgresql"):
        lock = _AdvisoryLock(url)
    else:
        raise LockUnavailable(f"the request log {describe(location)} is neither SQLite nor PostgreSQL, "
                              "so it cannot hold the gate lock")
    where = lock.where
    deadline = time.monotonic() + wait_seconds
    try:
        lock.open()
        waited = False
        while not lock.try_acquire():
            if time.monotonic() >= deadline:
                raise LockBusy(f"another promotion or rollback held the gate lock ({where}) for all of "
                               f"{wait_seconds:g} s")
            if not waited and on_wait is not None:
                on_wait(where)
            waited = True
            time.sleep(poll_seconds)
    except (OSError, sa.exc.SQLAlchemyError) as exc:
        lock.close()
        raise LockUnavailable(f"the gate lock ({where}) cannot be taken: {first_line(exc)}") from None
    except BaseException:
        lock.close()
        raise
    try:
        yield where
    finally:
        lock.close()  # releases it


class _FileLock:
    def __init__(self, path: Path):
        self.path = path
        self.where = f"file {path}"
        self._fd: int | None = None

    def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)

    def try_acquire(self) -> bool:
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the only descriptor of the open file releases its flock
            self._fd = None


class _AdvisoryLock:
    def __init__(self, url: str):
        self.where = f"PostgreSQL advisory lock {ADVISORY_KEY} in {describe(url)}"
        self._engine = sa.create_engine(url, poolclass=sa.pool.NullPool, connect_args={"connect_timeout": 5})
        self._conn: sa.Connection | None = None

    def open(self) -> None:
        # Autocommit: the session holds the lock, and no transaction stays open for the gate's minutes.
        self._conn = self._engine.connect().execution_options(isolation_level="AUTOCOMMIT")

    def try_acquire(self) -> bool:
        return bool(self._conn.execute(sa.text("SELECT pg_try_advisory_lock(:key)"), {"key": ADVISORY_KEY})
                    .scalar_one())

    def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(sa.exc.SQLAlchemyError):
                self._conn.close()  # ends the session, which releases its advisory locks
            self._conn = None
        self._engine.dispose()
