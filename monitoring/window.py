"""Reading a drift window from the request log: the newest rows and/or those since a time.

A separate module so that the parallel reader's worker function is importable by name (it must
be, to reach a forked worker), also when the drift check runs as `python -m monitoring.drift`.
"""

from __future__ import annotations

import math
import multiprocessing
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np
import sqlalchemy as sa

from common.archive import READABLE, list_batches, read_log
from common.store import RequestStore, StoreUnavailable

PARALLEL_MIN_ROWS = 200_000
MAX_READERS = 4


class WindowReadError(RuntimeError):
    """The request log cannot be read."""


@dataclass(frozen=True)
class Window:
    """The newest `last_n` rows (None: no limit), of those logged at or after `since_ts` (None: any)."""

    last_n: int | None
    since_ts: float | None
    description: str


def needs_production(since: str | None) -> bool:
    """Whether `--since` names the Production version's promotion, which only the registry knows."""
    return since is not None and since.strip().lower() == "promotion"


def parse_since(value: str | None, production) -> tuple[float | None, str]:
    """(epoch seconds or None, description) for `--since`: an epoch time, an ISO-8601 time, or
    `promotion` (when the Production version was promoted).

    Raises:
        ValueError: unparseable, or `promotion` without a Production version.
    """
    if value is None or value.strip() == "":
        return None, ""
    text = value.strip()
    if needs_production(text):
        # MLflow only here: a drift check starts reading its window before it imports MLflow
        # (docs/decisions/020-drift-check-start-up-and-ks.md).
        from monitoring.runs import promoted_at

        if production is None:
            raise ValueError("--since promotion needs a Production model, and there is none")
        ts = promoted_at(production)
        return ts, f"since the promotion of v{production.version} ({iso(ts)})"
    ts = parse_time(text, "--since", "or 'promotion'")
    return ts, f"since {iso(ts)}"


def parse_time(text: str, option: str, also: str = "") -> float:
    """Epoch seconds from an epoch time or an ISO-8601 time (UTC unless it says otherwise).

    Raises:
        ValueError: neither, naming `option`.
    """
    try:
        ts = float(text)
    except ValueError:
        try:
            parsed = datetime.fromisoformat(text)
        except ValueError:
            raise ValueError(f"{option} {text!r} is neither an epoch time nor an ISO-8601 time"
                             + (f" {also}" if also else "")) from None
        ts = (parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).timestamp()
    if not math.isfinite(ts):
        raise ValueError(f"{option} {text!r} is not a finite time")
    return ts


def iso(ts: float) -> str:
    """An epoch time as ISO-8601 in UTC, to the second."""
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")


def _read_shard(job: tuple) -> np.ndarray:
    location, columns, last_n, since_ts, model_version, not_null, shard = job
    store = RequestStore(location, create=False)
    try:
        return store.read_columns(columns, last_n=last_n, since_ts=since_ts, model_version=model_version,
                                  not_null=not_null, shard=shard)
    finally:
        store.dispose()


class PendingWindow:
    """A window being read in the background by forked readers; `result()` waits for it.

    Started before the check loads its reference and builds its detector, so that work overlaps
    the read. `close()` stops the readers if the result is never collected.
    """

    def __init__(self, jobs: list[tuple], workers: int, *, archive: bool = False):
        self._jobs = jobs
        self._archive = archive
        self._pool = multiprocessing.get_context("fork").Pool(workers) if workers > 1 else None
        self._async = self._pool.map_async(_read_shard, jobs) if self._pool else None
        self.sources: dict[str, int] = {}  # rows read from the live log and from its archive

    def result(self) -> np.ndarray:
        """The (len(columns), rows) float32 array.

        Raises:
            WindowReadError: the request log cannot be read.
        """
        try:
            if self._archive:
                location, columns, last_n, since_ts, model_version, not_null, _ = self._jobs[0]
                read = read_log(location, columns, last_n=last_n, since_ts=since_ts, model_version=model_version,
                                not_null=not_null)
                self.sources = read.sources
                return read.values
            parts = self._async.get() if self._async is not None else [_read_shard(self._jobs[0])]
        except StoreUnavailable as exc:
            raise WindowReadError(str(exc)) from None
        finally:
            self.close()
        values = np.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]
        self.sources = {"live": int(values.shape[1]), "archive": 0}
        return values

    def close(self) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
            self._pool = None


def start_reading(location: str, columns: Sequence[str], window: Window, *, model_version: str | None = None,
                  not_null: Sequence[str] = ()) -> PendingWindow:
    """Start reading the window's columns; rows come back in no particular order.

    Large windows (no row limit, or at least PARALLEL_MIN_ROWS) are read by one forked process
    per core (at most MAX_READERS), each converting the rows of one id shard: the driver's
    per-value work is the bulk of a million-row check, and it parallelises. Small windows are read
    in this process when the result is asked for.
    """
    jobs = [(location, list(columns), window.last_n, window.since_ts, model_version, tuple(not_null), None)]
    if _archive_reaches(location, window.since_ts):
        # Read in this process when the result is asked for: the live part, then the archive's files.
        return PendingWindow(jobs, 1, archive=True)
    workers = min(os.cpu_count() or 1, MAX_READERS)
    parallel = workers > 1 and (window.last_n is None or window.last_n >= PARALLEL_MIN_ROWS) \
        and "fork" in multiprocessing.get_all_start_methods()
    shards = [(k, workers) for k in range(workers)] if parallel else [None]
    jobs = [(location, list(columns), window.last_n, window.since_ts, model_version, tuple(not_null), shard)
            for shard in shards]
    return PendingWindow(jobs, workers if parallel else 1)


def _archive_reaches(location: str, since_ts: float | None) -> bool:
    """Whether the log's archive (common/archive.py) holds rows logged at or after `since_ts`."""
    try:
        store = RequestStore(location, create=False)
    except sa.exc.ArgumentError:
        return False
    try:
        batches = list_batches(store.engine, READABLE) if store.has_table() else []
    except (StoreUnavailable, sa.exc.DBAPIError):
        return False  # the read itself reports the failure
    finally:
        store.dispose()
    return any(since_ts is None or b.max_ts is None or b.max_ts >= since_ts for b in batches)


def read_window(location: str, columns: Sequence[str], window: Window, *, model_version: str | None = None,
                not_null: Sequence[str] = ()) -> np.ndarray:
    """`start_reading(...).result()`: the window's columns as a float32 (len(columns), rows) array.

    Raises:
        WindowReadError: the request log cannot be read.
    """
    return start_reading(location, columns, window, model_version=model_version, not_null=not_null).result()
