"""Load on /predict as real clients send it, and the request log checked against what they were told.

`Load` runs client threads, each with its own requests.Session (so its connection is kept alive, as
real clients' are), and records every request as an `Outcome`; with `refusals`, every other request
is one the service refuses (a `Refusal`: a bad token, a body too large, ...). `reconcile` compares
the rows the clients were told were scored with the rows the request log holds; its `Ledger` checks
the promise every reliability scenario makes: a row reported as scored is in the log, and the log
holds no row that no answer accounts for.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import requests

from tests.helpers.service import AUTH, is_error_shape

CLIENT_TIMEOUT = 60.0
NOT_SHAPED = "not the JSON error shape"


@dataclass(frozen=True)
class Refusal:
    """A request the service answers with an error, and the answer it must give."""

    name: str
    path: str
    headers: dict[str, str]
    body: bytes
    status: int
    code: str


@dataclass(frozen=True)
class Outcome:
    """One request as its client saw it; status None when no answer came (reset, timeout)."""

    client: int
    started: float
    ended: float
    status: int | None
    code: str | None = None  # the JSON error code, or the exception's name when no answer came
    ids: tuple[str, ...] = ()  # the row ids a 200 reported as scored
    version: str | None = None
    request_id: str | None = None  # X-Request-ID, on errors too
    expected: int = 200  # a Refusal's status for a refusal
    expected_code: str | None = None  # and its error code
    port: int | None = None  # the client's end of the connection the answer came on
    closes: bool = False  # the answer said `Connection: close`

    @property
    def ok(self) -> bool:
        """The answer a healthy service gives: 200, or the refusal's status and code."""
        return self.status == self.expected and self.code == self.expected_code


class Load:
    """`clients` threads posting /predict (1 to 3 rows each) until stopped or `seconds` pass.

    Use as a context manager: the clients always stop. Each keeps one requests.Session, so its
    connection stays open from one request to the next (the server may still close it, e.g. after
    KEEPALIVE_REQUESTS, or by dying; the session then opens another). With `refusals`, every other
    request of a client is the next of them in turn, and the request after it a valid one again. With
    `pause`, each client waits that long after each answer (a paced client, for a scenario that
    watches what the service answers rather than how much it takes). Each outcome names the
    connection its answer came on (`port`), so a test can tell a connection kept from one closed.
    """

    def __init__(self, url: str, rows: list[list[float]], *, clients: int, seconds: float,
                 timeout: float = CLIENT_TIMEOUT, refusals: Sequence[Refusal] = (), pause: float = 0.0):
        self.url, self.rows, self.clients, self.seconds, self.timeout = url, rows, clients, seconds, timeout
        self.refusals, self.pause = tuple(refusals), pause
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._outcomes: list[Outcome] = []
        self.started = self.deadline = 0.0
        self.stopped: float | None = None

    def __enter__(self) -> Load:
        self.started = time.monotonic()
        self.deadline = self.started + self.seconds
        self._threads = [threading.Thread(target=self._client, args=(i,), name=f"load-{i}", daemon=True)
                         for i in range(self.clients)]
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    @property
    def outcomes(self) -> list[Outcome]:
        with self._lock:
            return list(self._outcomes)

    def stop(self) -> list[Outcome]:
        """Stop the clients now (each finishes the request it is sending) and return every outcome."""
        self._stop.set()
        return self.wait()

    def wait(self) -> list[Outcome]:
        """Wait for the clients to finish (each stops at the deadline) and return every outcome."""
        for thread in self._threads:
            thread.join(max(0.0, self.deadline - time.monotonic()) + self.timeout + 5)
        if self.stopped is None:
            self.stopped = time.monotonic()
        return self.outcomes

    @property
    def elapsed(self) -> float:
        return (self.stopped or time.monotonic()) - self.started

    def sleep_until(self, moment: float) -> None:
        """Sleep until `moment`, or the deadline if earlier, or until the load is stopped."""
        self._stop.wait(max(0.0, min(moment, self.deadline) - time.monotonic()))

    def wait_for(self, condition: Callable[[list[Outcome]], bool], what: str, timeout: float = 60.0) -> None:
        """Wait until `condition(outcomes so far)` holds; AssertionError naming `what` otherwise."""
        deadline = time.monotonic() + timeout
        while not condition(self.outcomes):
            if time.monotonic() > deadline:
                raise AssertionError(f"no {what} within {timeout:g} s: {summary(self.outcomes)}")
            time.sleep(0.05)

    def _client(self, index: int) -> None:
        sent = 0
        with requests.Session() as session:
            session.trust_env = False  # no proxy from the environment: loopback only
            while not self._stop.is_set() and time.monotonic() < self.deadline:
                refusal, path, body, headers = self._request(index, sent)
                expected = {"expected": refusal.status, "expected_code": refusal.code} if refusal else {}
                sent += 1
                started = time.monotonic()
                try:
                    # Streamed, so that the connection is still the response's until its body is read.
                    response = session.post(f"{self.url}{path}", data=body, headers=headers, timeout=self.timeout,
                                            stream=True)
                    port = _local_port(response)
                    response.content  # noqa: B018 - reads the body, and hands the connection back to the session
                except requests.RequestException as exc:
                    self._record(Outcome(index, started, time.monotonic(), None, type(exc).__name__, **expected))
                    self._stop.wait(0.05)  # do not spin while the server is away
                    continue
                self._record(replace(_outcome(index, started, time.monotonic(), response), port=port, **expected))
                if self.pause:
                    self._stop.wait(self.pause)

    def _request(self, index: int, sent: int) -> tuple[Refusal | None, str, bytes | str, dict[str, str]]:
        """A client's `sent`-th request: (the refusal it is, or None), path, body, headers."""
        if self.refusals and sent % 2:
            refusal = self.refusals[(index + sent // 2) % len(self.refusals)]
            return refusal, refusal.path, refusal.body, refusal.headers
        n = 1 + sent % 3
        first = (index * 7 + sent) % len(self.rows)
        body = json.dumps({"data": [self.rows[(first + k) % len(self.rows)] for k in range(n)]})
        return None, "/predict", body, {"Content-Type": "application/json", **AUTH}

    def _record(self, outcome: Outcome) -> None:
        with self._lock:
            self._outcomes.append(outcome)


def _local_port(response: requests.Response) -> int | None:
    """The client's port of the connection a streamed response came on (None if it is gone already)."""
    sock = getattr(response.raw.connection, "sock", None)
    return sock.getsockname()[1] if sock is not None else None


def _outcome(client: int, started: float, ended: float, response: requests.Response) -> Outcome:
    request_id = response.headers.get("X-Request-ID")
    closes = response.headers.get("Connection", "").lower() == "close"
    try:
        answer = response.json()
    except ValueError:
        answer = {}
    if response.status_code == 200:
        return Outcome(client, started, ended, 200, None, tuple(answer.get("request_id", ())),
                       str(answer.get("model_version")), request_id, closes=closes)
    error = answer.get("error") if isinstance(answer, dict) else None
    code = error.get("code") if isinstance(error, dict) else None
    shaped = isinstance(code, str) and is_error_shape(answer, code)
    return Outcome(client, started, ended, response.status_code, code if shaped else NOT_SHAPED,
                   request_id=request_id, closes=closes)


def summary(outcomes: list[Outcome]) -> str:
    """Outcomes counted by kind, e.g. "ok: 310, 401 as expected: 40, 503 request_log_unavailable: 12"."""
    counts = Counter(("ok" if o.expected == 200 else f"{o.expected} as expected") if o.ok
                     else f"{o.status} {o.code}" + ("" if o.expected == 200 else f" (expected {o.expected})")
                     for o in outcomes)
    return ", ".join(f"{k}: {v}" for k, v in counts.most_common()) or "no requests"


@dataclass(frozen=True)
class Ledger:
    """The request log against what clients were told."""

    lost: frozenset[str]  # rows reported as scored (in a 200) that the log does not hold
    extra: frozenset[str]  # logged rows that no 200 reported
    unexplained: int  # requests with extra rows that no failed answer (its X-Request-ID) accounts for
    unanswered: int  # failed requests that got no answer at all (reset, timeout)

    def check(self, *, exact: bool) -> None:
        """Assert that every row reported as scored is logged, and that the log holds no more.

        Args:
            exact: nothing else may be logged. Without it, a logged row nobody was told about must
                belong to a request that failed (a worker killed after its commit, a commit whose
                acknowledgement was lost), and there can be no more such requests than failures
                without an answer.

        Raises:
            AssertionError: naming the broken promise and a few of the rows.
        """
        assert not self.lost, (f"{len(self.lost)} rows reported as scored are missing from the request log, "
                               f"e.g. {sorted(self.lost)[:3]}")
        if exact:
            assert not self.extra, (f"{len(self.extra)} logged rows were never reported as scored, "
                                    f"e.g. {sorted(self.extra)[:3]}")
        else:
            assert self.unexplained <= self.unanswered, (
                f"{self.unexplained} requests left rows in the log that no answer accounts for "
                f"(only {self.unanswered} requests failed without an answer)")


def reconcile(outcomes: list[Outcome], logged: set[str]) -> Ledger:
    """Compare the row ids the request log holds with what the clients' outcomes reported."""
    scored = {rid for o in outcomes if o.ok for rid in o.ids}
    extra = logged - scored
    failed_ids = {o.request_id for o in outcomes if not o.ok and o.request_id}
    unexplained = {rid.rsplit("-", 1)[0] for rid in extra} - failed_ids
    unanswered = sum(1 for o in outcomes if not o.ok and o.request_id is None)
    return Ledger(frozenset(scored - logged), frozenset(extra), len(unexplained), unanswered)
