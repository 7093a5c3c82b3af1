"""The service's default gunicorn worker: requests served on the worker's own event loop.

gunicorn's gthread worker hands every request from its poller to a thread pool and back, and a sync
worker waits for an idle connection without a limit; serving a readable connection at once in the
worker's own thread avoids both (the figures: docs/decisions/001-event-loop-worker.md).

`EventLoopWorker` keeps gthread's poller and drops its pool:

- a new connection waits in the poller until it has sent something, and a kept-alive one between
  requests (for `keepalive` seconds, as in gthread), so idle connections cost nothing;
- a readable connection is served at once, in the worker's main thread, and goes back to the
  poller if it stays open.

The worker serves one request at a time, so a client that stops sending in the middle of a request,
or stops reading the response, would hold it. Its socket therefore has a timeout (CLIENT_TIMEOUT,
default 10 s) for each read and write while a request is served: the worker drops such a client
and goes on, well before gunicorn's own `timeout` would restart it. A buffering proxy (nginx, an
ingress) in front removes the issue altogether.

Built on gunicorn's `ThreadWorker`, whose internals are no public API: it overrides how connections
are accepted and where a readable one is served, and keeps the rest (keep-alive bookkeeping,
timeouts of idle connections, graceful shutdown, the heartbeat). `check_gunicorn` checks every
assumption it makes about them; service/gunicorn.conf.py runs it in the master and serves with the
stock gthread worker instead, with one warning, when one fails (service/worker_choice.py).
"""

from __future__ import annotations

import errno
import inspect
import selectors
import socket
import time
from concurrent import futures
from functools import partial
from types import ModuleType

import gunicorn
from gunicorn.workers import gthread

from common import settings

# --- what this worker assumes about gunicorn's gthread worker (check_gunicorn checks each) -------------

# Versions whose gthread internals it was built and tested on: 26.2.0, the pinned one, and patch
# releases of it (the names and signatures below still catch a patch that moves what it uses). 27.0
# changes murder_keepalived's signature and what finish_request does; 26.1 was not tested.
GUNICORN_VERSIONS = ((26, 2, 0), (26, 3))  # from, included; to, excluded
# ThreadWorker methods it overrides or calls, with their parameters.
THREAD_WORKER_METHODS: dict[str, tuple[str, ...]] = {
    "init_process": ("self",),
    "get_thread_pool": ("self",),  # overridden: no pool
    "accept": ("self", "listener"),  # overridden: the poller's callback for a listening socket
    "enqueue_req": ("self", "conn"),  # overridden: serve the readable connection now
    "handle": ("self", "conn"),  # called: serves one request, returns whether the connection stays open
    "finish_request": ("self", "conn", "fs"),  # called with a done Future: keeps or closes the connection
    "on_pending_socket_readable": ("self", "conn", "client"),  # the poller's callback for a new connection
    "murder_keepalived": ("self",),  # overridden: run() calls it without arguments
    "murder_pending": ("self",),  # overridden: run() calls it without arguments
    "notify": ("self",),  # called: tells the arbiter the worker is alive
}
# Names that ThreadWorker's methods must still use: the attributes this worker reads and writes, and
# the calls it relies on gthread making (the code's own names, co_names: cheap, and no instance).
THREAD_WORKER_USES: dict[str, tuple[str, ...]] = {
    "__init__": ("pending_conns", "keepalived_conns", "nr_conns"),
    "init_process": ("get_thread_pool", "poller"),
    "run": ("murder_keepalived", "murder_pending", "shutdown"),  # shutdown: of the pool, here _NoPool
    # A pending connection that turns readable is marked data_ready, so handle() does not wait for
    # data (gthread's wait would block this worker's only thread).
    "on_pending_socket_readable": ("pending_conns", "data_ready", "enqueue_req"),
    "on_client_socket_readable": ("keepalived_conns", "enqueue_req"),
    "handle": ("data_ready", "setblocking"),
    "finish_request": ("result", "keepalived_conns", "nr_conns", "poller", "setblocking"),
}
TCONN_METHODS: dict[str, tuple[str, ...]] = {
    "__init__": ("self", "cfg", "sock", "client", "server"),
    "close": ("self", "graceful"),
}
# TConn switches its socket with setblocking, which _TimedSocket turns into a timeout.
TCONN_USES: dict[str, tuple[str, ...]] = {"__init__": ("timeout", "setblocking"), "init": ("setblocking",)}


def check_gunicorn(version: tuple[int, ...] | None = None, module: ModuleType | None = None) -> list[str]:
    """Check this worker's assumptions about gunicorn's gthread worker (the tables above).

    Args:
        version: gunicorn's `version_info`; default: the installed gunicorn's.
        module: the gthread module to check; default: `gunicorn.workers.gthread`.

    Returns:
        What does not hold, one phrase each (empty: the worker can run).
    """
    version = gunicorn.version_info if version is None else tuple(version)
    module = gthread if module is None else module
    problems = []
    low, high = GUNICORN_VERSIONS
    if not low <= version < high:
        problems.append(f"gunicorn {_dotted(version)} is not in the versions this worker was built for "
                        f"(>={_dotted(low)}, <{_dotted(high)})")
    for name, methods, uses in (("ThreadWorker", THREAD_WORKER_METHODS, THREAD_WORKER_USES),
                                ("TConn", TCONN_METHODS, TCONN_USES)):
        cls = getattr(module, name, None)
        if not isinstance(cls, type):
            problems.append(f"gunicorn.workers.gthread has no class {name}")
            continue
        problems += _check_class(name, cls, methods, uses)
    return problems


def _check_class(name: str, cls: type, methods: dict[str, tuple[str, ...]],
                 uses: dict[str, tuple[str, ...]]) -> list[str]:
    problems = []
    for method in dict.fromkeys([*methods, *uses]):
        function = getattr(cls, method, None)
        if not callable(function):
            problems.append(f"{name}.{method} is missing")
            continue
        if method in methods:
            try:
                parameters = tuple(inspect.signature(function).parameters)
            except (TypeError, ValueError):
                parameters = ("?",)
            if parameters != methods[method]:
                problems.append(f"{name}.{method} takes ({', '.join(parameters)}), "
                                f"expected ({', '.join(methods[method])})")
        if method in uses:
            names = getattr(getattr(function, "__code__", None), "co_names", ())
            unused = [n for n in uses[method] if n not in names]
            if unused:
                problems.append(f"{name}.{method} no longer uses {', '.join(unused)}")
    return problems


def _dotted(version: tuple[int, ...]) -> str:
    return ".".join(str(part) for part in version)


# --- the worker ------------------------------------------------------------------------------------------


class _TimedSocket(socket.socket):
    """A client socket whose blocking mode has a timeout.

    gunicorn switches a connection to blocking mode before it serves a request on it, and back to
    non-blocking mode when the connection returns to the poller; here blocking mode means "block
    for at most `timeout` seconds" instead of without a limit.
    """

    __slots__ = ()
    timeout_seconds: float = 10.0

    def setblocking(self, flag: bool) -> None:
        if flag:
            self.settimeout(self.timeout_seconds)
        else:
            super().setblocking(False)


class _NoPool:
    """Stands in for gthread's thread pool, which this worker does not have."""

    def shutdown(self, wait: bool = True) -> None:
        pass


class EventLoopWorker(gthread.ThreadWorker):
    """gunicorn's gthread worker without the thread pool: see the module docstring."""

    def init_process(self) -> None:
        _TimedSocket.timeout_seconds = settings.client_timeout()
        super().init_process()

    def get_thread_pool(self) -> _NoPool:
        return _NoPool()

    def accept(self, listener) -> None:
        """Take a new connection and let it wait in the poller until the client sends something."""
        try:
            client, address = listener.accept()
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.ECONNABORTED, errno.EWOULDBLOCK):
                return
            raise
        timed = _TimedSocket(client.family, client.type, client.proto, fileno=client.detach())
        self.nr_conns += 1
        conn = gthread.TConn(self.cfg, timed, address, listener.getsockname())
        # gthread's queue of connections that have not sent anything yet: dropped after `keepalive`
        # seconds (murder_pending), in the order they came, so appending keeps it sorted.
        conn.timeout = time.monotonic() + self.cfg.keepalive
        self.pending_conns.append(conn)
        self.poller.register(conn.sock, selectors.EVENT_READ, partial(self.on_pending_socket_readable, conn))

    def enqueue_req(self, conn) -> None:
        """Serve the readable connection now, in this thread, then keep it or close it."""
        done: futures.Future = futures.Future()
        try:
            done.set_result(self.handle(conn))
        except Exception as exc:  # handle() logs what it can; finish_request closes the connection
            done.set_exception(exc)
        self.finish_request(conn, done)
        # Several readable connections are served in one turn of the loop, which tells the arbiter
        # it is alive only once per turn: a few slow requests in a row must not look like a hang.
        self.notify()

    def murder_keepalived(self) -> None:
        self._close_idle(self.keepalived_conns)

    def murder_pending(self) -> None:
        self._close_idle(self.pending_conns)

    def _close_idle(self, conns) -> None:
        """Close the connections of `conns` that have waited `keepalive` seconds without data.

        gthread closes every connection whose time is up: its main thread is never busy, so such a
        connection sent nothing. Here a request may arrive while the worker serves another (a slow
        one: a locked request log, a stalled client), and closing its connection would reset it
        with the request unread. Such a connection stays, and the next turn of the loop serves it.
        """
        now = time.monotonic()
        waiting = []
        while conns and conns[0].timeout <= now:
            conn = conns.popleft()
            if _has_data(conn.sock):
                waiting.append(conn)
                continue
            try:
                self.poller.unregister(conn.sock)
            except (KeyError, ValueError, OSError):
                pass
            self.nr_conns -= 1
            conn.close()
        conns.extendleft(reversed(waiting))  # still the oldest: the queue stays in timeout order


def _has_data(sock: socket.socket) -> bool:
    """Whether bytes wait to be read on the connection (not: it is idle, or the client closed it)."""
    try:
        return bool(sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
    except OSError:  # BlockingIOError: nothing to read; anything else: the connection is gone
        return False
