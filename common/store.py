"""The request store: one `requests` table for the reference data and the service's request log.

Both databases use the same table, so training, monitoring and the service read and write them with
the same code. The reference database holds imported labelled rows (`Class` set, `request_id` a
content key); the request log holds every scored row (`score`, `decision`, `threshold`, model
name and version) and, once feedback arrives, its true label in `Class`.

A location is a SQLite file path or a SQLAlchemy URL (PostgreSQL for several replicas).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from common.schema import FEATURES, LABEL

metadata = sa.MetaData()
requests_table = sa.Table(
    "requests",
    metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True, autoincrement=True),
    sa.Column("request_id", sa.String(64), nullable=False, unique=True),
    sa.Column("ts", sa.Float, nullable=False, index=True),
    sa.Column("Time", sa.Float),
    sa.Column("Amount", sa.Float),
    *(sa.Column(name, sa.Float, nullable=False) for name in FEATURES),
    sa.Column("score", sa.Float),
    sa.Column("decision", sa.SmallInteger),
    sa.Column("threshold", sa.Float),
    sa.Column("model_name", sa.String(200)),
    sa.Column("model_version", sa.String(32)),
    sa.Column(LABEL, sa.SmallInteger),
    sa.Column("label_ts", sa.Float),
)

# SQLite: WAL lets readers and the writers of several gunicorn workers proceed together; the busy
# timeout makes a writer wait for the lock instead of failing at once.
SQLITE_BUSY_TIMEOUT_MS = 5000


class StoreUnavailable(RuntimeError):
    """The store could not be reached or written after bounded retries."""


def to_url(location: str) -> str:
    """Turn a SQLite path or a URL into a SQLAlchemy URL (PostgreSQL through psycopg 3)."""
    if "://" not in location:
        return f"sqlite:///{Path(location).resolve()}"
    for prefix in ("postgres://", "postgresql://"):
        if location.startswith(prefix):
            return "postgresql+psycopg://" + location[len(prefix):]
    return location


def describe(location: str) -> str:
    """The location with any password removed, safe for logs and MLflow params."""
    url = sa.make_url(to_url(location))
    return url.render_as_string(hide_password=True)


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    # FULL: a commit is on disk before the client hears "scored".
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.close()


@dataclass(frozen=True)
class FeedbackResult:
    updated: list[str]
    unknown: list[str]


class RequestStore:
    """Access to one `requests` table. Create one per process (engines do not survive fork)."""

    def __init__(self, location: str, *, create: bool = True):
        self.location = location
        self.url = to_url(location)
        if self.url.startswith("sqlite:///") and create:
            Path(self.url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        kwargs = {"pool_pre_ping": True}
        if self.url.startswith("postgresql"):
            kwargs["connect_args"] = {"connect_timeout": 5}
        self.engine = sa.create_engine(self.url, **kwargs)
        if self.engine.dialect.name == "sqlite":
            sa.event.listen(self.engine, "connect", _sqlite_pragmas)
        if create:
            self.create_schema()

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    def create_schema(self) -> None:
        metadata.create_all(self.engine, checkfirst=True)

    def dispose(self) -> None:
        self.engine.dispose()

    # --- writes ----------------------------------------------------------------------------------

    def _insert(self, conn: sa.Connection, rows: Sequence[dict], ignore_existing: bool) -> int:
        if not rows:
            return 0
        if not ignore_existing:
            return conn.execute(requests_table.insert(), list(rows)).rowcount
        if self.dialect == "postgresql":
            stmt = postgresql.insert(requests_table).on_conflict_do_nothing(index_elements=["request_id"])
        elif self.dialect == "sqlite":
            stmt = sqlite.insert(requests_table).on_conflict_do_nothing(index_elements=["request_id"])
        else:  # pragma: no cover - only SQLite and PostgreSQL are supported
            raise StoreUnavailable(f"unsupported database dialect {self.dialect}")
        return conn.execute(stmt, list(rows)).rowcount

    def _bulk_sql(self, columns: Sequence[str], ignore_existing: bool) -> str:
        names = ", ".join(self.engine.dialect.identifier_preparer.quote(c) for c in columns)
        marker = "?" if self.engine.dialect.paramstyle == "qmark" else "%s"
        sql = f"INSERT INTO requests ({names}) VALUES ({', '.join([marker] * len(columns))})"  # noqa: S608 - column names come from the table definition, checked above
        return sql + (" ON CONFLICT (request_id) DO NOTHING" if ignore_existing else "")

    def insert_frame(self, frame: pd.DataFrame, *, ignore_existing: bool = False, retries: int = 2) -> int:
        """Bulk-insert a frame whose columns are `requests` columns, in one transaction.

        The fast path for imports: plain tuples through the driver's executemany, no per-row
        statement compilation. Same contract as `insert_rows`.
        """
        unknown = set(frame.columns) - set(requests_table.c.keys())
        if unknown:
            raise ValueError(f"not columns of the requests table: {sorted(unknown)}")
        sql = self._bulk_sql(list(frame.columns), ignore_existing)
        rows = list(frame.itertuples(index=False, name=None))
        return self._with_retries(lambda conn: _count_new(conn, sql, rows), len(rows), retries, 0.05)

    def _with_retries(self, work, default_count: int, retries: int, backoff: float) -> int:
        last: Exception | None = None
        for attempt in range(retries + 1):
            try:
                with self.engine.begin() as conn:
                    written = work(conn)
                return written if written is not None and written >= 0 else default_count
            except sa.exc.IntegrityError:
                raise
            except (sa.exc.OperationalError, sa.exc.InterfaceError, sa.exc.DatabaseError) as exc:
                last = exc
                if attempt < retries:
                    time.sleep(backoff * (2**attempt))
        raise StoreUnavailable(f"request store {describe(self.location)} unavailable: {_short(last)}")

    def insert_rows(self, rows: Sequence[dict], *, ignore_existing: bool = False, retries: int = 3,
                    backoff: float = 0.05) -> int:
        """Insert rows in one transaction, retrying a bounded number of times.

        Args:
            rows: dicts keyed by column name.
            ignore_existing: skip rows whose `request_id` is already stored (idempotent imports).
            retries: further attempts after the first when the database is locked or unreachable.
            backoff: seconds before the first retry; doubles each time.

        Returns:
            The number of rows written (rows skipped as existing are not counted).

        Raises:
            StoreUnavailable: every attempt failed; nothing was written.
        """
        return self._with_retries(lambda conn: self._insert(conn, rows, ignore_existing), len(rows), retries, backoff)

    def record_feedback(self, labels: dict[str, int], *, retries: int = 3) -> FeedbackResult:
        """Attach ground-truth labels to earlier requests, in one transaction.

        Returns:
            Which ids were updated and which are unknown (never silently dropped).

        Raises:
            StoreUnavailable: the store could not be written after bounded retries.
        """
        ids = list(labels)
        last: Exception | None = None
        for attempt in range(retries + 1):
            try:
                with self.engine.begin() as conn:
                    known: set[str] = set()
                    for chunk in _chunks(ids, 500):
                        found = conn.execute(sa.select(requests_table.c.request_id)
                                             .where(requests_table.c.request_id.in_(chunk)))
                        known.update(r[0] for r in found)
                    now = time.time()
                    updates = [{"rid": rid, "label": int(labels[rid]), "now": now} for rid in ids if rid in known]
                    if updates:
                        conn.execute(
                            requests_table.update()
                            .where(requests_table.c.request_id == sa.bindparam("rid"))
                            .values({LABEL: sa.bindparam("label"), "label_ts": sa.bindparam("now")}),
                            updates,
                        )
                return FeedbackResult([rid for rid in ids if rid in known], [rid for rid in ids if rid not in known])
            except (sa.exc.OperationalError, sa.exc.InterfaceError) as exc:
                last = exc
                if attempt < retries:
                    time.sleep(0.05 * (2**attempt))
        raise StoreUnavailable(f"request store {describe(self.location)} unavailable: {_short(last)}")

    # --- reads -----------------------------------------------------------------------------------

    def count(self, *, labelled: bool | None = None) -> int:
        """Rows in the table; `labelled=True` counts only rows with a true label."""
        stmt = sa.select(sa.func.count()).select_from(requests_table)
        if labelled is True:
            stmt = stmt.where(requests_table.c[LABEL].is_not(None))
        elif labelled is False:
            stmt = stmt.where(requests_table.c[LABEL].is_(None))
        with self.engine.connect() as conn:
            return int(conn.execute(stmt).scalar_one())

    def _window(self, columns: Iterable[str], *, labelled: bool | None, last_n: int | None,
                since_ts: float | None) -> sa.Select:
        cols = [requests_table.c[name] for name in columns]
        stmt = sa.select(*cols)
        if labelled is True:
            stmt = stmt.where(requests_table.c[LABEL].is_not(None))
        if since_ts is not None:
            stmt = stmt.where(requests_table.c.ts >= since_ts)
        if last_n is not None:
            newest = (sa.select(requests_table.c.id).order_by(requests_table.c.id.desc()).limit(last_n))
            if since_ts is not None:
                newest = newest.where(requests_table.c.ts >= since_ts)
            stmt = stmt.where(requests_table.c.id.in_(newest))
        return stmt.order_by(requests_table.c.id)

    def read_frame(self, columns: Sequence[str] = (*FEATURES, LABEL), *, labelled: bool | None = None,
                   last_n: int | None = None, since_ts: float | None = None) -> pd.DataFrame:
        """Read columns into a DataFrame, oldest first.

        Args:
            columns: column names of the `requests` table.
            labelled: True keeps only rows with a true label.
            last_n: keep only the newest n rows (after the other filters).
            since_ts: keep only rows logged at or after this epoch time.
        """
        stmt = self._window(columns, labelled=labelled, last_n=last_n, since_ts=since_ts)
        with self.engine.connect() as conn:
            result = conn.execute(stmt)
            return pd.DataFrame(result.fetchall(), columns=list(columns))

    def iter_arrays(self, columns: Sequence[str], *, chunk_rows: int = 100_000, last_n: int | None = None,
                    since_ts: float | None = None, labelled: bool | None = None) -> Iterator[np.ndarray]:
        """Yield float64 arrays of shape (rows, len(columns)), chunk by chunk, oldest first.

        Streams through the server-side cursor so memory stays bounded by the chunk size.
        """
        stmt = self._window(columns, labelled=labelled, last_n=last_n, since_ts=since_ts)
        with self.engine.connect() as conn:
            result = conn.execution_options(stream_results=True, yield_per=chunk_rows).execute(stmt)
            for part in result.partitions(chunk_rows):
                yield np.array(part, dtype=np.float64).reshape(len(part), len(columns))


def _count_new(conn: sa.Connection, sql: str, rows: list[tuple]) -> int:
    before = conn.execute(sa.select(sa.func.count()).select_from(requests_table)).scalar_one()
    conn.exec_driver_sql(sql, rows)
    return conn.execute(sa.select(sa.func.count()).select_from(requests_table)).scalar_one() - before


def _chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _short(exc: Exception | None) -> str:
    if exc is None:
        return "unknown error"
    orig = getattr(exc, "orig", None)
    return str(orig or exc).strip().splitlines()[0][:200]
