"""The request log: every scored row, committed before the client hears it was scored.

Rows go to the `requests` table through `common.store.RequestStore` (SQLite at LATEST_DB by
default, or a SQLAlchemy URL such as PostgreSQL for several replicas), in one transaction per
request, with bounded retries. If the write still fails the caller answers 503
`request_log_unavailable` and counts the failure. There is deliberately no write-behind buffer: a
response that carries scores always means the rows are in the table, so monitoring and retraining
see exactly what clients saw, and an outage is loud rather than a silent gap
(docs/decisions/005-no-write-behind-buffer.md).
"""

from __future__ import annotations

import logging
import os
import threading
import time

import numpy as np
import tenacity

from common.retries import call_with_retries
from common.schema import FEATURES
from common.store import FeedbackResult, RequestStore, StoreUnavailable, describe
from service.parsing import Batch
from service.scoring import Predictions

log = logging.getLogger("service.request_log")

COLUMNS = ("request_id", "ts", *FEATURES, "Amount", "score", "decision", "threshold", "model_name", "model_version",
           "shadow_score", "shadow_decision", "shadow_version")
# With the busy timeout inside each attempt, a locked SQLite file gets about 3 x 5 s before a 503.
WRITE_RETRIES = 2


# UUID version 7 (RFC 9562), from the most significant bit: unix_ts_ms (48 bits), ver (4), rand_a
# (12), var (2), rand_b (62).
_UUID7_VERSION_AND_VARIANT = (0x7 << 76) | (0b10 << 62)
_RAND_B_MASK = (1 << 62) - 1


def new_request_id() -> str:
    """A request's id: a UUID version 7 (RFC 9562) as 32 hex digits.

    The first 48 bits are the Unix time in milliseconds and 74 of the other 80 are random (the rest
    are the version and variant), so ids sort by time, and two ids of the same millisecond are equal
    with a chance of 2^-74. The request log's `request_id` index then grows at one end, as the table
    and its `ts` index do, instead of taking each new row on a random page of an index that grows
    with the log, which slows commits as the log grows (docs/decisions/004-time-ordered-request-ids.md).
    """
    random = int.from_bytes(os.urandom(10), "big")  # 80 bits: 12 for rand_a, 62 for rand_b, 6 unused
    rand_a, rand_b = (random >> 62) & 0xFFF, random & _RAND_B_MASK
    value = ((time.time_ns() // 1_000_000) << 80) | _UUID7_VERSION_AND_VARIANT | (rand_a << 64) | rand_b
    return f"{value:032x}"


def row_ids(request_id: str, n: int) -> list[str]:
    """The per-row ids of one request: `<request id>-<row index>`."""
    return [f"{request_id}-{i}" for i in range(n)]


class RequestLog:
    """One store per process (database engines do not survive fork), created on first use."""

    def __init__(self, location: str):
        self.location = location
        self._store: RequestStore | None = None
        self._pid: int | None = None
        self._lock = threading.Lock()
        self.last_error: str | None = None
        self.last_error_at: float | None = None

    def store(self) -> RequestStore:
        """The process's store, creating the table on first use.

        Raises:
            StoreUnavailable: the database cannot be reached or the table cannot be created.
        """
        store = self._store
        if store is not None and self._pid == os.getpid():
            return store
        with self._lock:
            if self._store is None or self._pid != os.getpid():
                self._store, self._pid = self._open(), os.getpid()
            return self._store

    def _open(self) -> RequestStore:
        # Three attempts, 50 then 100 ms apart: a database that is starting or busy may take the next.
        return call_with_retries(lambda _number: RequestStore(self.location, partitioned=True), retries=2,
                                 wait=tenacity.wait_incrementing(start=0.05, increment=0.05),
                                 failure=f"request log {describe(self.location)} cannot be opened")

    def record(self, request_id: str, batch: Batch, predictions: Predictions, shadow: Predictions | None = None,
               ts: float | None = None) -> list[str]:
        """Commit one row per scored row, with the challenger's score beside the champion's when it
        scored the rows in the shadow, and return their ids.

        Raises:
            StoreUnavailable: nothing was written after bounded retries.
        """
        ids = row_ids(request_id, len(batch))
        ts = time.time() if ts is None else ts
        try:
            self.store().insert_values(COLUMNS, _values(ids, ts, batch, predictions, shadow), retries=WRITE_RETRIES)
        except StoreUnavailable as exc:
            self._failed(exc)
            raise
        self.last_error = None
        return ids

    def feedback(self, labels: dict[str, int]) -> FeedbackResult:
        """Attach true labels to logged rows.

        Raises:
            StoreUnavailable: after bounded retries.
        """
        try:
            return self.store().record_feedback(labels, retries=WRITE_RETRIES)
        except StoreUnavailable as exc:
            self._failed(exc)
            raise

    def _failed(self, exc: Exception) -> None:
        self.last_error, self.last_error_at = str(exc), time.time()

    def status(self) -> dict:
        return {"location": describe(self.location), "last_error": self.last_error,
                "last_error_at": self.last_error_at}

    def dispose(self) -> None:
        if self._store is not None:
            self._store.dispose()
            self._store = None


def _values(ids: list[str], ts: float, batch: Batch, predictions: Predictions,
            shadow: Predictions | None) -> list[tuple] | np.ndarray:
    """The COLUMNS values of each row: one tuple for the common single row, else an object array
    filled column by column, which is quicker to build than a tuple per row, and from which the
    store hands each multi-row statement its values with one `ravel().tolist()` instead of chaining
    the tuples (docs/decisions/008-multi-row-insert-statements.md)."""
    threshold, name, version = predictions.threshold, predictions.model_name, predictions.model_version
    if len(ids) == 1:
        amount = None if batch.amount is None or np.isnan(batch.amount[0]) else float(batch.amount[0])
        seen = (None, None, None) if shadow is None else (shadow.probabilities[0], int(shadow.is_fraud[0]),
                                                           shadow.model_version)
        return [(ids[0], ts, *batch.X[0].tolist(), amount, predictions.probabilities[0],
                 int(predictions.is_fraud[0]), threshold, name, version, *seen)]
    values = np.empty((len(ids), len(COLUMNS)), dtype=object)  # None in every cell until filled
    values[:, 0] = ids
    values[:, 1] = ts
    values[:, _FIRST_FEATURE:_AMOUNT] = batch.X  # object cells take Python floats, as sqlite3 binds them
    if batch.amount is not None:
        given = ~np.isnan(batch.amount)
        values[given, _AMOUNT] = batch.amount[given]
    values[:, _AMOUNT + 1] = predictions.probabilities
    values[:, _AMOUNT + 2] = predictions.is_fraud.astype(np.int8)
    values[:, _AMOUNT + 3:_SHADOW] = (threshold, name, version)
    if shadow is not None:
        values[:, _SHADOW] = shadow.probabilities
        values[:, _SHADOW + 1] = shadow.is_fraud.astype(np.int8)
        values[:, _SHADOW + 2] = shadow.model_version
    return values


_FIRST_FEATURE = COLUMNS.index(FEATURES[0])
_AMOUNT = COLUMNS.index("Amount")
_SHADOW = COLUMNS.index("shadow_score")
