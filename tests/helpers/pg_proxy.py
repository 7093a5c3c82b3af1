"""A TCP proxy on loopback in front of the test PostgreSQL that can lose a commit's acknowledgement.

It forwards bytes both ways and reads the server's side as PostgreSQL's wire protocol (version 3)
messages. Once armed, it waits for the next transaction to commit: a statement that wrote (its
CommandComplete tag is INSERT, COPY, UPDATE, DELETE or COMMIT) followed by ReadyForQuery with the
status "idle", which the server sends only once the transaction is committed, whether it ended
with a COMMIT or was a lone statement in autocommit mode. Instead of passing that answer on, it
closes both sides of the connection: the client's statement fails with a lost connection although
the rows are in the table. Every other connection, and every connection after the cut, is
forwarded untouched.
"""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Callable

import sqlalchemy as sa

# Requests a client may send before its startup message; the server answers each with one byte.
_SSL_REQUEST, _GSSENC_REQUEST = 80877103, 80877104
# CommandComplete tags of statements that write, or commit what was written.
_WRITES = {b"INSERT", b"COPY", b"UPDATE", b"DELETE", b"COMMIT"}


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
        """Cut the connection of the next transaction that commits once the server has answered it;
        then run `after_cut` (before the client sees the connection close)."""
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
            state = {"one_byte_answers": 0}
            threading.Thread(target=self._client_to_server, args=(client, server, state), daemon=True).start()
            threading.Thread(target=self._server_to_client, args=(server, client, state), daemon=True).start()

    def _client_to_server(self, client: socket.socket, server: socket.socket, state: dict) -> None:
        try:
            while True:  # the startup phase: messages without a type byte
                length = struct.unpack("!I", _read(client, 4))[0]
                body = _read(client, length - 4)
                request = struct.unpack("!I", body[:4])[0]
                if request in (_SSL_REQUEST, _GSSENC_REQUEST):
                    with self._lock:
                        state["one_byte_answers"] += 1  # before it goes on, so the answer cannot come first
                server.sendall(struct.pack("!I", length) + body)
                if request not in (_SSL_REQUEST, _GSSENC_REQUEST):
                    break
            while True:
                data = client.recv(65536)
                if not data:
                    break
                server.sendall(data)
        except OSError:
            pass
        finally:
            _close(client)
            _close(server)

    def _server_to_client(self, server: socket.socket, client: socket.socket, state: dict) -> None:
        held: list[bytes] = []  # a write's answer, from its CommandComplete to the next ReadyForQuery
        try:
            while True:
                with self._lock:
                    answers, state["one_byte_answers"] = state["one_byte_answers"], 0
                for _ in range(answers):  # an SSL or GSS encryption request's answer: one byte, no framing
                    client.sendall(_read(server, 1))
                kind = _read(server, 1)
                length = struct.unpack("!I", _read(server, 4))[0]
                message = kind + struct.pack("!I", length) + _read(server, length - 4)
                if not held and not (kind == b"C" and self._armed and _tag(message) in _WRITES):
                    client.sendall(message)
                    continue
                held.append(message)
                if kind != b"Z":
                    continue
                if message[5:6] == b"I":  # idle: the write is committed (T: a transaction is still open)
                    with self._lock:
                        cut, self._armed = self._armed, False
                        after_cut = self._after_cut
                    if cut:
                        if after_cut is not None:
                            after_cut()
                        self.cut.set()
                        break  # the answer is dropped, and the connection closed
                client.sendall(b"".join(held))
                held = []
        except OSError:
            pass
        finally:
            _close(client)
            _close(server)


def _tag(message: bytes) -> bytes:
    """The command of a CommandComplete message's tag, e.g. INSERT of "INSERT 0 1"."""
    return message[5:].split(b"\0")[0].split(b" ")[0]


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
