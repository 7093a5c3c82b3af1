"""The simulated chargeback feed's ledger: which labels the simulator owes the service, and when.

The simulator (`monitoring.simulate`) scores a month of traffic through the service and learns each
row's request id. The label-delay model (`training.scenarios.LabelDelay`) says when that row's label
becomes known. Both go into this ledger, a small SQLite file on the client's side. At the end of
each simulated month, the labels that are known by then are posted through `/feedback` and marked
posted; the rest wait for a later month. A later run of the simulator, for a later month, picks them up.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS labels (
    request_id TEXT PRIMARY KEY,
    scenario TEXT NOT NULL,
    month INTEGER NOT NULL,
    ts REAL NOT NULL,
    known_at REAL NOT NULL,
    label INTEGER NOT NULL,
    posted_at REAL
);
CREATE INDEX IF NOT EXISTS labels_due ON labels (posted_at, known_at);
"""


@dataclass(frozen=True)
class Due:
    """Labels known by the clock and not yet posted."""

    request_ids: list[str]
    labels: list[int]


@dataclass(frozen=True)
class Pending:
    rows: int
    frauds: int
    next_known_at: float | None


class Ledger:
    """One ledger file. Every method commits before it returns."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(self.path)
        self._conn.executescript(SCHEMA)

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *_exc) -> None:
        self.close()

    def add(self, scenario: str, month: int, rows: Iterable[tuple[str, float, float, int]]) -> None:
        """Record (request_id, ts, known_at, label) of rows the service scored."""
        with self._conn:
            self._conn.executemany(
                "INSERT OR REPLACE INTO labels (request_id, scenario, month, ts, known_at, label) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                ((rid, scenario, int(month), float(ts), float(known), int(label)) for rid, ts, known, label in rows))

    def due(self, clock: float) -> Due:
        """Every label known at `clock` and not yet posted, oldest first."""
        found = self._conn.execute("SELECT request_id, label FROM labels WHERE posted_at IS NULL AND known_at <= ? "
                                   "ORDER BY known_at, request_id", (clock,)).fetchall()
        return Due([r[0] for r in found], [int(r[1]) for r in found])

    def mark_posted(self, request_ids: Iterable[str]) -> None:
        now = time.time()
        with self._conn:
            self._conn.executemany("UPDATE labels SET posted_at = ? WHERE request_id = ?",
                                   ((now, rid) for rid in request_ids))

    def pending(self, clock: float) -> Pending:
        """Labels not known yet at `clock`."""
        rows, frauds, first = self._conn.execute(
            "SELECT count(*), coalesce(sum(label), 0), min(known_at) FROM labels "
            "WHERE posted_at IS NULL AND known_at > ?", (clock,)).fetchone()
        return Pending(int(rows), int(frauds), first)
