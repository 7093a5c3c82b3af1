"""How many bytes a logged row takes on disk, with its indexes, in SQLite and PostgreSQL.

`python -m benchmarks storage [--rows N] [--postgres URL]` fills a fresh request log of each store
with N rows shaped as the service writes them (29 features, Amount, score, decision, threshold,
model name and version, a UUIDv7-style row id, the time), a quarter of them labelled, and prints
bytes per row (table and indexes) and the disk a log needs per day and month at several rates.
PostgreSQL is measured when `--postgres` (or BENCH_POSTGRES_URL) names a server database where
the benchmark may create and drop a scratch database.
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import sys
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import sqlalchemy as sa

from common.schema import FEATURES, LABEL
from common.store import RequestStore

# What the service writes (service/request_log.py COLUMNS, without the empty shadow columns) and a label.
LOG_COLUMNS = ("request_id", "ts", *FEATURES, "Amount", "score", "decision", "threshold", "model_name",
               "model_version", LABEL, "label_ts")
RATES_TPS = (10, 50, 200, 1000)
DAY_SECONDS = 86_400
MONTH_DAYS = 30


@dataclass(frozen=True)
class Size:
    store: str
    rows: int
    table_bytes: int
    index_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.table_bytes + self.index_bytes

    def per_row(self) -> float:
        return self.total_bytes / self.rows


def log_rows(n: int, start_ts: float, end_ts: float, *, labelled: float = 0.25, fraud_rate: float = 0.002,
             seed: int = 0) -> np.ndarray:
    """n rows of LOG_COLUMNS (an object array, oldest first) spread evenly over [start_ts, end_ts).

    `labelled` of them carry a label that arrived a day after the row.
    """
    rng = np.random.default_rng(seed)
    values = np.empty((n, len(LOG_COLUMNS)), dtype=object)
    ts = start_ts + (end_ts - start_ts) * np.arange(n) / max(n, 1)
    # Time-ordered ids like the service's UUIDv7 row ids: 32 hex digits and the row's index in its request.
    millis = (ts * 1000).astype(np.int64)
    tails = rng.integers(0, 2**62, size=n, dtype=np.int64)
    values[:, 0] = [f"{m:012x}7{t:019x}-0" for m, t in zip(millis.tolist(), tails.tolist(), strict=True)]
    values[:, 1] = ts.tolist()
    features = rng.standard_normal((n, len(FEATURES)))
    at = LOG_COLUMNS.index(FEATURES[0])
    values[:, at:at + len(FEATURES)] = features.tolist()
    values[:, at + len(FEATURES)] = np.round(rng.lognormal(3, 1.5, n), 2).tolist()
    score = rng.random(n)
    values[:, LOG_COLUMNS.index("score")] = score.tolist()
    values[:, LOG_COLUMNS.index("decision")] = (score > 0.5).astype(int).tolist()
    values[:, LOG_COLUMNS.index("threshold")] = 0.5
    values[:, LOG_COLUMNS.index("model_name")] = "fraud-detector"
    values[:, LOG_COLUMNS.index("model_version")] = "3"
    has_label = rng.random(n) < labelled
    label = (rng.random(n) < fraud_rate).astype(int)
    values[:, LOG_COLUMNS.index(LABEL)] = [int(v) if h else None for v, h in zip(label, has_label, strict=True)]
    values[:, LOG_COLUMNS.index("label_ts")] = [t + DAY_SECONDS if h else None
                                                 for t, h in zip(ts.tolist(), has_label, strict=True)]
    return values


def fill(store: RequestStore, n: int, start_ts: float, end_ts: float, *, chunk: int = 50_000, seed: int = 0,
         labelled: float = 0.25) -> None:
    """Insert n log rows over [start_ts, end_ts) into `store`, a chunk per transaction."""
    span = (end_ts - start_ts) / max(n, 1)
    for k, start in enumerate(range(0, n, chunk)):
        size = min(chunk, n - start)
        rows = log_rows(size, start_ts + start * span, start_ts + (start + size) * span, seed=seed + k,
                        labelled=labelled)
        store.insert_values(LOG_COLUMNS, rows)


def sqlite_size(path: Path, rows: int) -> Size:
    """The table's and its indexes' pages, from SQLite's dbstat table (the file after a checkpoint)."""
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        by_name = dict(conn.execute("SELECT name, SUM(pgsize) FROM dbstat GROUP BY name").fetchall())
    table = by_name.pop("requests", 0)
    indexes = sum(size for name, size in by_name.items() if name not in ("sqlite_schema", "sqlite_master"))
    return Size("SQLite", rows, int(table), int(indexes))


def postgres_size(url: str, rows: int) -> Size:
    """pg_table_size (heap, TOAST, free-space and visibility maps) and pg_indexes_size, after VACUUM."""
    engine = sa.create_engine(url, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql("VACUUM ANALYZE requests")
            table, indexes = conn.exec_driver_sql(
                "SELECT pg_table_size('requests'), pg_indexes_size('requests')").one()
    finally:
        engine.dispose()
    return Size("PostgreSQL", rows, int(table), int(indexes))


def scratch_postgres(admin_url: str):
    """(url of a new scratch database, drop function) on the server of `admin_url`."""
    name = f"bench_storage_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(RequestStore(admin_url, create=False).url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    url = sa.make_url(admin.url).set(database=name).render_as_string(hide_password=False)

    def drop() -> None:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()

    return url, drop


def measure(rows: int, postgres: str | None) -> list[Size]:
    end = 1_700_000_000.0
    start = end - 30 * DAY_SECONDS
    sizes = []
    with tempfile.TemporaryDirectory(prefix="bench-storage-") as scratch:
        path = Path(scratch) / "requests.db"
        store = RequestStore(str(path))
        try:
            fill(store, rows, start, end)
        finally:
            store.dispose()
        sizes.append(sqlite_size(path, rows))
    if postgres:
        url, drop = scratch_postgres(postgres)
        try:
            store = RequestStore(url)
            try:
                fill(store, rows, start, end)
            finally:
                store.dispose()
            sizes.append(postgres_size(RequestStore(url, create=False).url, rows))
        finally:
            drop()
    return sizes


def table(sizes: list[Size]) -> str:
    lines = [f"{'store':<11} {'rows':>9} {'table B/row':>12} {'index B/row':>12} {'total B/row':>12}"]
    for s in sizes:
        lines.append(f"{s.store:<11} {s.rows:>9,} {s.table_bytes / s.rows:>12.0f} {s.index_bytes / s.rows:>12.0f} "
                     f"{s.per_row():>12.0f}")
    lines.append("")
    lines.append(f"{'tps':>6} " + " ".join(f"{s.store + ' GB/day':>18} {s.store + ' GB/month':>20}" for s in sizes))
    for tps in RATES_TPS:
        cells = []
        for s in sizes:
            day = tps * DAY_SECONDS * s.per_row() / 1e9
            cells.append(f"{day:>18.1f} {day * MONTH_DAYS:>20.0f}")
        lines.append(f"{tps:>6} " + " ".join(cells))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks storage", description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=500_000, help="rows logged into each store")
    parser.add_argument("--postgres", default=os.environ.get("BENCH_POSTGRES_URL",
                                                             "postgresql://postgres@127.0.0.1:5432/postgres"),
                        help="a PostgreSQL database URL for a scratch database; 'none' to skip")
    args = parser.parse_args(argv)
    postgres = None if args.postgres.lower() == "none" else args.postgres
    try:
        sizes = measure(args.rows, postgres)
    except sa.exc.OperationalError as exc:
        print(f"PostgreSQL at {args.postgres} unreachable ({str(exc).splitlines()[0]}); SQLite only", file=sys.stderr)
        sizes = measure(args.rows, None)
    print(table(sizes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
