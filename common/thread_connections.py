"""One driver connection per thread, for a hot write path that should never queue for a pool.

The request log's writes (`RequestStore.insert_values`) go straight to the driver through a
connection of the writing thread's own, detached from SQLAlchemy's pool: no checkout, no statement
compilation. A connection that failed is dropped, and the thread's next write opens a fresh one.
"""

from __future__ import annotations

import threading
from collections.abc import Callable


class ThreadConnections:
    """The calling thread's driver connection, opened on first use.

    Args:
        connect: opens a driver connection (e.g. a pool connection, detached).
        prepare: sets up a new connection before its first use (e.g. its transaction mode).
    """

    def __init__(self, connect: Callable[[], object], prepare: Callable[[object], None] | None = None):
        self._connect = connect
        self._prepare = prepare
        self._local = threading.local()
        self._lock = threading.Lock()
        self._all: list = []

    def get(self):
        """This thread's connection, opening and preparing it if it has none."""
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._connect()
            try:
                if self._prepare is not None:
                    self._prepare(conn)
            except BaseException:
                close_quietly(conn)
                raise
            self._local.conn = conn
            with self._lock:
                self._all.append(conn)
        return conn

    def drop(self) -> None:
        """Close this thread's connection (after a failure); its next `get` opens another."""
        conn = getattr(self._local, "conn", None)
        self._local.conn = None
        if conn is not None:
            close_quietly(conn)
            with self._lock:
                if conn in self._all:  # not if `close` closed it meanwhile
                    self._all.remove(conn)

    def close(self) -> None:
        """Close every thread's connection; a later `get` in any thread opens a new one."""
        with self._lock:
            connections, self._all = self._all, []
            self._local = threading.local()
        for conn in connections:
            close_quietly(conn)


def close_quietly(conn) -> None:
    """Roll back and close a driver connection that may already be broken."""
    for step in (conn.rollback, conn.close):
        try:
            step()
        except Exception:  # noqa: S112 - a broken connection may fail either step; it is dropped anyway
            continue
