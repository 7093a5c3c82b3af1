"""The client's connection after an early answer: the unread body is read first, or the connection closes.

An answer given on the headers alone (401, 404, 405, 413, 415) leaves the request's body unread.
gunicorn reads it after the answer has gone out, and by then the client may have sent its next
request too: that read can take in the start of the next request with the body, and gunicorn 26.2
then waits for the socket to turn readable while the request sits in its buffer, until it closes
the connection without an answer (issue 22; both workers do it). So the app reads and discards the
body *before* it answers, while the client, which sends its body before it reads the answer,
cannot have sent anything after it. When that is not possible, the answer says `Connection: close`
and the client sends its next request on a new connection:

- the body is larger than MAX_BODY_BYTES (a 413): it is refused whatever it holds, so it is not read;
- the body has not arrived within DRAIN_SECONDS (or CLIENT_TIMEOUT, when shorter), as from a client
  that holds its body back until it has the answer: reading it after the answer is what can lose
  the request behind it;
- the client stalled in the middle of its body (a 408), or reading it failed.

gunicorn closes the connection after a response when its request's `must_close` is set (the
KEEPALIVE_REQUESTS hook sets it too); its `pre_request` hook (service/gunicorn.conf.py) hands that
request to `serving`, in the thread that then runs the app.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import BinaryIO

from common import settings

# A body sent right behind its headers arrives at the speed of the network: MAX_BODY_BYTES' default
# (4 MiB) takes about 0.3 s at 100 Mbit/s, a single row less than a millisecond. A client that holds
# its body back holds the worker meanwhile (the default worker serves one request at a time), so the
# wait stops well before CLIENT_TIMEOUT's 10 s.
DRAIN_SECONDS = 1.0
# Closes without reading: the body is refused as too large (413), or the client stopped sending it (408).
_CLOSE_STATUSES = frozenset((408, 413))
_READ_BYTES = 64 * 1024

DRAINED = "drained"
TOO_LARGE = "too_large"
TOO_SLOW = "too_slow"
FAILED = "failed"
OUTCOMES = (DRAINED, TOO_LARGE, TOO_SLOW, FAILED)

_gunicorn = threading.local()


def serving(request: object) -> None:
    """gunicorn's pre_request hook: remember gunicorn's request, so the app can close its connection."""
    _gunicorn.request = request


def close_after_response() -> bool:
    """Make gunicorn close the connection after this response, which then says `Connection: close`.

    Returns:
        False outside gunicorn (the Flask test client), where there is no connection to close.
    """
    request = getattr(_gunicorn, "request", None)
    if request is None:
        return False
    request.must_close = True
    return True


def settle(environ: dict, status: int, max_bytes: int, body: Callable[[], BinaryIO] | None = None) -> str | None:
    """Leave the connection usable after an answer that may not have read the request's body.

    Call it before the answer is sent. It reads and discards what is left of the body, or closes
    the connection after the answer when it cannot (see the module docstring).

    Args:
        environ: the request's WSGI environ.
        status: the answer's status.
        max_bytes: MAX_BODY_BYTES; a longer body is not read.
        body: gives the request's body stream as the app reads it (werkzeug's, which stops at the end of
            the body and knows what the app has read already); default `wsgi.input`, which under
            gunicorn does both, but under a plain WSGI server may read on into the next request.

    Returns:
        None when nothing was left (no body, or the app read it), DRAINED when the rest was read
        here, or why the connection closes: TOO_LARGE, TOO_SLOW or FAILED.
    """
    declared = environ.get("CONTENT_LENGTH")
    chunked = "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower()
    if not chunked and (not declared or declared == "0"):
        return None
    if status in _CLOSE_STATUSES:
        outcome = TOO_LARGE if status == 413 else TOO_SLOW
    elif not chunked and not declared.isdigit():
        outcome = FAILED
    elif not chunked and int(declared) > max_bytes:
        outcome = TOO_LARGE
    else:
        stream = body() if body is not None else environ["wsgi.input"]
        outcome = _drain(environ, stream, max_bytes, min(DRAIN_SECONDS, settings.client_timeout()))
    if outcome not in (None, DRAINED):
        close_after_response()
    return outcome


def _drain(environ: dict, stream: BinaryIO, max_bytes: int, seconds: float) -> str | None:
    """Read the body to its end within `seconds` and `max_bytes` (the app may have read some of it).

    Under gunicorn the socket's timeout bounds each wait for data by the time left, so a client that
    sends nothing is left at the deadline; one that trickles its body a few bytes at a time can
    stretch it, as it can with any body the app reads (a buffering proxy in front ends both).
    """
    sock = environ.get("gunicorn.socket")
    previous = sock.gettimeout() if sock is not None else None
    deadline = time.monotonic() + seconds
    read = 0
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return TOO_SLOW
            if sock is not None:
                sock.settimeout(remaining)
            chunk = stream.read(_READ_BYTES)
            if not chunk:
                return DRAINED if read else None
            read += len(chunk)
            if read > max_bytes:
                return TOO_LARGE
    except TimeoutError:
        return TOO_SLOW
    except Exception:  # a reset, a malformed chunk: the connection cannot carry another request
        return FAILED
    finally:
        if sock is not None:
            try:
                sock.settimeout(previous)
            except OSError:
                pass
