"""A TCP proxy on loopback in front of the test PostgreSQL that can lose a COMMIT's acknowledgement.

It forwards bytes both ways and reads the client's side as PostgreSQL's wire protocol (version 3)
messages. Once armed, it lets the next COMMIT through to the server, waits for the server's answer
(which the server sends only once the transaction is committed), and then closes both sides of
that connection instead of passing the answer on: the client's COMMIT fails with a lost
connection although the rows are in the table. Every other connection, and every connection after
the cut, is forwarded untouched.
"""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Callable

import sqlalchemy as sa

# Requests a client may send before its startup message; the server answers each with one byte.
_SSL_REQUEST, _GSSENC_REQUEST = 80877103, 80877104


class CommitAckCutter:
    """A proxy to `upstream`; use as a context manager. `url(database_url)` points a URL at it."""

    def __init__(self, upstream: tuple[str, int] = ("127.0.0.1", 5432)):
        self.upstream = upstream
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._armed = False
        self._after_cut: Callable[[], None] | None = None
        self.cut = threading.Event()
        self.commits_seen = 0
        self._sockets: list[socket.socket] = []
        self._accepting = threading.Thread(target=self._accept, name="pg-proxy", daemon=True)

    def __enter__(self) -> CommitAckCutter:
        self._accepting.start()
        return self

    def __exit__(self, *_exc) -> None:
        self._listener.close()
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            _close(sock)

    def url(self, database_url: str) -> str:
        """`database_url` through this proxy, without TLS or GSS encryption (the proxy reads the bytes)."""
        url = sa.make_url(database_url).set(host="127.0.0.1", port=self.port)
        url = url.update_query_dict({"sslmode": "disable", "gssencmode": "disable"})
        return url.render_as_string(hide_password=False)

    def lose_next_commit_ack(self, after_cut: Callable[[], None] | None = None) -> None:
        """Cut the connection of the next COMMIT once the server has answered it; then run `after_cut`
        (before the client sees the connection close)."""
        with self._lock:
            self._armed, self._after_cut = True, after_cut
            self.cut.clear()

    # --- forwarding --------------------------------------------------------------------------------

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            server = socket.create_connection(self.upstream)
            for sock in (client, server):
                # Messages are passed on one at a time: without this, Nagle's algorithm holds each small
                # one back until the last is acknowledged, some 40 ms per round trip under load.
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._sockets += [client, server]
            state = {"cut_pending": False, "after_cut": None}
            threading.Thread(target=self._client_to_server, args=(client, server, state), daemon=True).start()
            threading.Thread(target=self._server_to_client, args=(server, client, state), daemon=True).start()

    def _client_to_server(self, client: socket.socket, server: socket.socket, state: dict) -> None:
        try:
            while True:  # the startup phase: messages without a type byte
                length = struct.unpack("!I", _read(client, 4))[0]
                body = _read(client, length - 4)
                server.sendall(struct.pack("!I", length) + body)
                if struct.unpack("!I", body[:4])[0] not in (_SSL_REQUEST, _GSSENC_REQUEST):
                    break
            while True:
                kind = _read(client, 1)
                length = struct.unpack("!I", _read(client, 4))[0]
                body = _read(client, length - 4)
                if self._is_commit(kind, body):
                    with self._lock:
                        self.commits_seen += 1
                        if self._armed:
                            # Before the COMMIT goes on, so that its answer cannot slip through.
                            self._armed = False
                            state["cut_pending"], state["after_cut"] = True, self._after_cut
                server.sendall(kind + struct.pack("!I", length) + body)
        except OSError:
            pass
        finally:
            _close(client)
            _close(server)

    def _server_to_client(self, server: socket.socket, client: socket.socket, state: dict) -> None:
        try:
            while True:
                data = server.recv(65536)
                if not data:
                    break
                if state["cut_pending"]:
                    # The server answered the COMMIT: the transaction is committed. Drop the answer.
                    if state["after_cut"] is not None:
                        state["after_cut"]()
                    self.cut.set()
                    break
                client.sendall(data)
        except OSError:
            pass
        finally:
            _close(client)
            _close(server)

    @staticmethod
    def _is_commit(kind: bytes, body: bytes) -> bool:
        if kind == b"Q":  # simple query: the SQL, NUL-terminated
            sql = body
        elif kind == b"P":  # Parse: statement name, NUL, the SQL, NUL, ...
            sql = body.split(b"\0", 1)[1] if b"\0" in body else b""
        else:
            return False
        return sql.lstrip().upper().startswith((b"COMMIT", b"END"))


def _read(sock: socket.socket, n: int) -> bytes:
    chunks, left = [], n
    while left:
        chunk = sock.recv(left)
        if not chunk:
            raise ConnectionError("closed")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()
