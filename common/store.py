"""The request store: one `requests` table for the reference data and the service's request log.

Both databases use the same table, so training, monitoring and the service read and write them with
the same code. The reference database holds imported labelled rows (`Class` set, `request_id` a
content key); the request log holds every scored row (`score`, `decision`, `threshold`, model
name and version) and, once feedback arrives, its true label in `Class`.

A location is a SQLite file path or a SQLAlchemy URL (PostgreSQL for several replicas).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import sqlite3
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import sqlalchemy as sa
import tenacity
from sqlalchemy.dialects import postgresql, sqlite

from common.retries import StoreUnavailable, call_with_retries
from common.schema import FEATURES, LABEL
from common.sqlite_writer import Checkpointer, WriterLock, apply_pragmas
from common.text import first_line
from common.thread_connections import ThreadConnections

log = logging.getLogger(__name__)

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
    # The challenger's view of the same row, when a challenger scored it in the shadow.
    sa.Column("shadow_score", sa.Float),
    sa.Column("shadow_decision", sa.SmallInteger),
    sa.Column("shadow_version", sa.String(32)),
)
# Columns added after the table's first release: `create_schema` adds them to a table that lacks them.
ADDED_COLUMNS = ("shadow_score", "shadow_decision", "shadow_version")

# The binary COPY format's type of each column type of the table (psycopg's names for PostgreSQL's types).
_POSTGRESQL_BINARY_TYPES = {sa.BigInteger: "int8", sa.Integer: "int4", sa.SmallInteger: "int2", sa.Float: "float8",
                            sa.String: "text"}

# SQLite request-log batches go in as multi-row INSERT statements of at most this many rows (fewer
# if the library's limit on bound values requires), which cost less CPU than executemany's one step
# per row: see docs/decisions/008-multi-row-insert-statements.md.
ROWS_PER_STATEMENT = 256


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


@dataclass(frozen=True)
class FeedbackResult:
    updated: list[str]
    unknown: list[str]


class RequestStore:
    """Access to one `requests` table. Create one per process (engines do not survive fork)."""

    def __init__(self, location: str, *, create: bool = True, partitioned: bool = False):
        self.location = location
        # A new table on PostgreSQL is range-partitioned by month (common/partitions.py): the request log's.
        self._partitioned = partitioned
        self.url = to_url(location)
        if self.url.startswith("sqlite:///") and create:
            Path(self.url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        # A SQLite file cannot go away under an open connection; pinging it costs a query per checkout.
        kwargs = {"pool_pre_ping": not self.url.startswith("sqlite")}
        if self.url.startswith("postgresql"):
            kwargs["connect_args"] = {"connect_timeout": 5}
        self.engine = sa.create_engine(self.url, **kwargs)
        self._unavailable = f"request store {describe(location)} unavailable"  # StoreUnavailable's message
        sqlite_file = self.url.removeprefix("sqlite:///") if self.url.startswith("sqlite:///") else None
        on_disk = bool(sqlite_file) and sqlite_file != ":memory:"
        self._write_lock = WriterLock(Path(sqlite_file + "-lock")) if on_disk else contextlib.nullcontext()
        # Every write hands its checkpoints to the thread: one inside a commit would hold the writers'
        # lock while it copies the WAL (decision 003); the archive job's deletes write the most.
        self._checkpointer = (Checkpointer(sqlite_file, self._write_lock, self._detached_connection) if on_disk
                              else None)
        # insert_values' statements by (columns, rows per statement or "copy"), built once each.
        self._insert_sql: dict[tuple[tuple[str, ...], int | str], str] = {}
        self._writers = ThreadConnections(self._detached_connection, self._prepare_writer)
        if self.engine.dialect.name == "sqlite":
            sa.event.listen(self.engine, "connect", apply_pragmas)
        if self._checkpointer is not None:
            sa.event.listen(self.engine, "connect", lambda dbapi_connection, _record:
                            Checkpointer.take_over(dbapi_connection))
        if create:
            self.create_schema()

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    def create_schema(self) -> None:
        """Create the `requests` table and its indexes unless the table exists.

        Several processes may create it at the same moment (the workers of one service opening their
        log): the one whose CREATE comes second fails (on PostgreSQL with a unique violation in the
        catalog or "already exists", on SQLite with "already exists"), and the table it finds is the
        one it would have created.

        Raises:
            sqlalchemy.exc.DBAPIError: the table could not be created and does not exist.
        """
        if self._partitioned and self.dialect == "postgresql":
            self._create_partitioned()
            return
        try:
            metadata.create_all(self.engine, checkfirst=True)
        except sa.exc.DBAPIError:
            exists = False
            with contextlib.suppress(sa.exc.DBAPIError):
                exists = sa.inspect(self.engine).has_table(requests_table.name)
            if not exists:
                raise
        self._add_missing_columns()

    def _create_partitioned(self) -> None:
        """Create the partitioned table unless a table exists; add this month's and next month's
        partitions to a partitioned table (a worker opening the log, never a request)."""
        from common import partitions

        # The driver's errors pass through as create_schema's do (the caller's retries expect them).
        def exists() -> bool:
            return sa.inspect(self.engine).has_table(requests_table.name)

        if not exists():
            try:
                partitions.create_partitioned(self.engine)
            except sa.exc.DBAPIError:
                if not exists():
                    raise
        if partitions.is_partitioned(self.engine):
            now = time.time()
            try:
                partitions.ensure_partitions(self.engine, now, now + 31 * 86_400)
            except sa.exc.ProgrammingError as exc:
                # A role that may not create tables (the service's, docker/postgres/roles.sql): the
                # default partition takes the rows of a month nobody created, and the archive job,
                # run as the tables' owner, creates the months ahead.
                log.warning("request log %s: cannot create the coming months' partitions (%s); rows of a "
                            "month without one go to %s until the archive job, as the tables' owner, creates it",
                            describe(self.url), first_line(exc.orig or exc), partitions.DEFAULT)
        self._add_missing_columns()

    def columns(self) -> set[str]:
        """The names of the table's columns as the database has them (empty when there is no table)."""
        if not self.has_table():
            return set()
        return {column["name"] for column in sa.inspect(self.engine).get_columns(requests_table.name)}

    def _add_missing_columns(self) -> None:
        """Bring a table created by an earlier release up to date: add the nullable ADDED_COLUMNS it lacks.

        Several processes may do it at the same moment; a column another one added first counts as added.
        """
        missing = [name for name in ADDED_COLUMNS if name not in self.columns()]
        preparer = self.engine.dialect.identifier_preparer
        for name in missing:
            column = requests_table.c[name]
            ddl = (f"ALTER TABLE {preparer.quote(requests_table.name)} ADD COLUMN {preparer.quote(name)} "
                   f"{column.type.compile(dialect=self.engine.dialect)}")
            try:
                with self.engine.begin() as conn:
                    conn.exec_driver_sql(ddl)
            except sa.exc.DBAPIError:
                if name not in self.columns():
                    raise

    def dispose(self) -> None:
        if self._checkpointer is not None:
            self._checkpointer.close()
        self._writers.close()
        if isinstance(self._write_lock, WriterLock):
            self._write_lock.close()
        self.engine.dispose()

    def has_table(self) -> bool:
        """Whether the `requests` table exists. A request log gets it with its first scored row, so
        readers (training, drift) treat a log without it as an empty log, not as an error.

        Raises:
            StoreUnavailable: the database cannot be reached.
        """
        try:
            return sa.inspect(self.engine).has_table(requests_table.name)
        except sa.exc.DBAPIError as exc:
            raise StoreUnavailable(f"request store {describe(self.location)} cannot be read: "
                                   f"{first_line(exc)}") from None

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

    def _bulk_sql(self, columns: Sequence[str], ignore_existing: bool, rows: int = 1) -> str:
        """INSERT of `rows` rows of `columns` (names from the table definition, checked by callers)."""
        names = ", ".join(self.engine.dialect.identifier_preparer.quote(c) for c in columns)
        marker = "?" if self.engine.dialect.paramstyle == "qmark" else "%s"
        row = f"({', '.join([marker] * len(columns))})"
        sql = f"INSERT INTO requests ({names}) VALUES {', '.join([row] * rows)}"  # noqa: S608 - see the docstring
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
        return self._transaction_with_retries(lambda conn: _count_new(conn, sql, rows), len(rows), retries, 0.05)

    def _transaction_with_retries(self, work, default_count: int, retries: int, backoff: float) -> int:
        """Run `work(connection)` in one transaction, retried; it returns the rows written, or None
        (or a negative count, as drivers give when they do not know) for `default_count`."""
        def attempt(_number: int) -> int:
            with self.engine.begin() as conn:
                written = work(conn)
            return written if written is not None and written >= 0 else default_count

        return self._retry(attempt, retries, backoff)

    def _retry(self, attempt, retries: int, backoff: float):
        """`common.retries.call_with_retries` with this store's backoff, doubling, and message."""
        return call_with_retries(attempt, retries=retries, wait=tenacity.wait_exponential(multiplier=backoff),
                                 failure=self._unavailable)

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
            StoreUnavailable: every attempt failed, or one failed in a way no retry cures
                (common.retries); nothing was written.
        """
        return self._transaction_with_retries(lambda conn: self._insert(conn, rows, ignore_existing), len(rows),
                                              retries, backoff)

    def insert_values(self, columns: Sequence[str], rows: Sequence[Sequence] | np.ndarray, *, retries: int = 3,
                      backoff: float = 0.05) -> int:
        """Insert plain value tuples in one transaction: the request log's hot path.

        Same contract as `insert_rows`, at a fraction of its cost: the statements are built once per
        column list, and each thread writes through its own driver connection (no pool checkout,
        no statement compilation), straight to the driver: multi-row INSERT statements on SQLite;
        on PostgreSQL one autocommit statement, so one round trip and one transaction, an INSERT for
        a single row and a binary COPY for more. A connection that fails is dropped and the retry
        opens a new one.

        Args:
            columns: `requests` column names, in the order of each row's values.
            rows: one sequence of values per row, or a 2-D array with one column per name (dtype
                object for mixed values: its cells are handed to the driver as they are).
            retries: further attempts after the first when the database is locked or unreachable.
            backoff: seconds before the first retry; doubles each time.

        An attempt that follows a failed one and finds every row's request_id already taken looks
        for the rows themselves: when the table holds exactly these rows, value for value, the
        failed attempt committed them and only its acknowledgement was lost (a PostgreSQL
        connection that dropped after its COMMIT reached the server), and the write succeeded.

        Returns:
            The number of rows written.

        Raises:
            ValueError: a name is not a column of `requests`, or a row does not have one value per column.
            sqlalchemy.exc.IntegrityError: a row breaks a constraint (e.g. a duplicate request_id),
                including a retry that finds other values under its request ids.
            StoreUnavailable: every attempt failed, or one failed in a way no retry cures
                (common.retries); nothing was written.
        """
        key = tuple(columns)
        if (key, 1) not in self._insert_sql:
            unknown = set(key) - set(requests_table.c.keys())
            if unknown:
                raise ValueError(f"not columns of the requests table: {sorted(unknown)}")
        sql = self._insert_statement(key, 1)
        width = len(key)
        if isinstance(rows, np.ndarray):
            if rows.ndim != 2 or rows.shape[1] != width:
                raise ValueError(f"an array of rows must have shape (n, {width}), not {rows.shape}")
        else:
            rows = rows if isinstance(rows, list) else list(rows)
            bad = next((i for i, row in enumerate(rows) if len(row) != width), None)
            if bad is not None:
                # Multi-row statements take the values end to end: a short row would shift the rest.
                raise ValueError(f"row {bad} has {len(rows[bad])} values for {width} columns")
        if len(rows) == 0:
            return 0
        dbapi = self.engine.dialect.loaded_dbapi

        def attempt(number: int) -> int:
            try:
                conn = self._writers.get()  # the pool hands connection failures on as the driver's errors
                with self._write_lock:
                    cursor = conn.cursor()
                    try:
                        if self.dialect == "sqlite":
                            self._execute_in_chunks(cursor, key, rows)
                        else:
                            self._write_postgresql(cursor, key, rows)
                    finally:
                        cursor.close()
                    conn.commit()  # ends _execute_in_chunks' BEGIN; nothing to do after a lone statement
            except BaseException as exc:
                self._writers.drop()  # the next attempt, or write, starts on a fresh connection
                if not isinstance(exc, dbapi.Error):
                    raise
                error = _as_sqlalchemy_error(exc, sql, dbapi)
                # Only a retry can meet its own rows. On SQLite it never does: the library reports a
                # commit's outcome from the very call that commits, so an attempt that failed wrote
                # nothing; a PostgreSQL connection can drop between the server's COMMIT and its answer.
                if number > 1 and isinstance(error, sa.exc.IntegrityError) and self._holds_exactly(key, rows):
                    return len(rows)
                raise error from exc
            self._committed()
            return len(rows)

        return self._retry(attempt, retries, backoff)

    def _holds_exactly(self, key: tuple[str, ...], rows: list | np.ndarray) -> bool:
        """Whether the table holds these rows, value for value in every column of `key`, under
        their request ids, and no other row under any of those ids."""
        if "request_id" not in key:
            return False
        at = key.index("request_id")
        given = rows.tolist() if isinstance(rows, np.ndarray) else rows
        by_id = {row[at]: row for row in given}
        columns = [requests_table.c[name] for name in key]
        found = 0
        with self.engine.connect() as conn:
            for chunk in _chunks(list(by_id), 500):
                for stored in conn.execute(sa.select(*columns).where(requests_table.c.request_id.in_(chunk))):
                    found += 1
                    if not all(_same_value(a, b) for a, b in zip(stored, by_id[stored[at]], strict=True)):
                        return False
        return found == len(given) == len(by_id)

    def _execute_in_chunks(self, cursor, key: tuple[str, ...], rows: list | np.ndarray) -> None:
        """Insert rows through multi-row statements, in one transaction. The chunk sizes are
        ROWS_PER_STATEMENT and then powers of two, so a writer connection prepares at most a dozen
        statement shapes, and SQLite's statement cache keeps them all.

        The writer connection is in autocommit mode (see `_writer`): a lone statement is its own
        transaction, and several statements run inside a BEGIN that the caller's commit ends."""
        array = isinstance(rows, np.ndarray)
        if len(rows) == 1:  # the common single-row request: the one-row statement, no copying
            cursor.execute(self._insert_statement(key, 1), rows[0].tolist() if array else rows[0])
            return
        most = min(ROWS_PER_STATEMENT, cursor.connection.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER) // len(key))
        sizes = list(_chunk_sizes(len(rows), most))
        if len(sizes) > 1:
            cursor.execute("BEGIN")
        start = 0
        for size in sizes:
            chunk = rows[start:start + size]
            cursor.execute(self._insert_statement(key, size),
                           chunk.ravel().tolist() if array else list(itertools.chain.from_iterable(chunk)))
            start += size

    def _write_postgresql(self, cursor, key: tuple[str, ...], rows: list | np.ndarray) -> None:
        """Insert rows on PostgreSQL as one statement on the autocommit writer connection (see
        `_prepare_writer`), which is then its own transaction: one round trip, and no BEGIN or
        COMMIT for the server to run (docs/decisions/018-postgresql-single-row-statement.md). A
        single row goes in as an INSERT, which psycopg prepares on the connection once it has run a
        few times; more rows as one binary COPY, the statement PostgreSQL loads rows fastest with
        (docs/decisions/019-postgresql-copy-and-synchronous-commit.md). A COPY, like any statement,
        stores all its rows or none, and a duplicate request_id fails it as it fails an INSERT."""
        values = rows.tolist() if isinstance(rows, np.ndarray) else rows
        if len(values) == 1:
            cursor.execute(self._insert_statement(key, 1), values[0])
            return
        with cursor.copy(self._copy_statement(key)) as copy:
            copy.set_types([_POSTGRESQL_BINARY_TYPES[type(requests_table.c[name].type)] for name in key])
            for row in values:
                copy.write_row(row)

    def _copy_statement(self, key: tuple[str, ...]) -> str:
        sql = self._insert_sql.get((key, "copy"))
        if sql is None:
            names = ", ".join(self.engine.dialect.identifier_preparer.quote(c) for c in key)
            sql = self._insert_sql[(key, "copy")] = f"COPY requests ({names}) FROM STDIN (FORMAT BINARY)"
        return sql

    def _insert_statement(self, key: tuple[str, ...], rows: int) -> str:
        sql = self._insert_sql.get((key, rows))
        if sql is None:
            sql = self._insert_sql[(key, rows)] = self._bulk_sql(key, ignore_existing=False, rows=rows)
        return sql

    def _prepare_writer(self, conn) -> None:
        """Set up a new writer connection of `insert_values` (it has the pragmas the pool applies)."""
        if self.dialect == "sqlite":
            # Autocommit: a single-row insert runs as one statement instead of three (the driver's
            # implicit BEGIN, the INSERT, COMMIT); _execute_in_chunks opens a transaction itself
            # when it needs several statements.
            conn.isolation_level = None
        elif self.dialect == "postgresql":
            conn.autocommit = True  # each write is one statement: see _write_postgresql
        if self._checkpointer is not None:
            self._checkpointer.take_over(conn)

    def _detached_connection(self):
        """A driver connection of its own, with the pragmas the pool applies on connect."""
        pooled = self.engine.raw_connection()
        pooled.detach()
        return pooled.dbapi_connection

    def record_feedback(self, labels: dict[str, int], *, retries: int = 3) -> FeedbackResult:
        """Attach ground-truth labels to earlier requests, in one transaction.

        Returns:
            Which ids were updated and which are unknown (never silently dropped).

        Raises:
            StoreUnavailable: the store could not be written, after bounded retries where they help
                (common.retries).
        """
        ids = list(labels)

        def attempt(_number: int) -> FeedbackResult:
            with self._write_lock, self.engine.begin() as conn:
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
            self._committed()
            return FeedbackResult([rid for rid in ids if rid in known], [rid for rid in ids if rid not in known])

        return self._retry(attempt, retries, 0.05)

    def _committed(self) -> None:
        """A write committed: the checkpoint thread takes it from here (SQLite on disk)."""
        if self._checkpointer is not None:
            self._checkpointer.committed()

    def delete_ids(self, ids: Sequence[int], *, also=None, retries: int = 3) -> int:
        """Delete the rows with these ids in one short transaction, queued with the log's writers.

        Args:
            ids: row ids (`id`); ids no longer stored are skipped. Ids that form a range without
                gaps are deleted as that range.
            also: a function of the transaction's connection, run in the same transaction (the
                archive job records its progress with it).
            retries: further attempts after the first when the database is locked or unreachable.

        Returns:
            The number of rows deleted.

        Raises:
            StoreUnavailable: every attempt failed; nothing was deleted.
        """
        values = sorted(int(i) for i in ids)
        # Ids with no gap between them are a range: one index range, not a lookup per id.
        contiguous = bool(values) and values[-1] - values[0] + 1 == len(values) == len(set(values))

        def attempt(_number: int) -> int:
            with self._write_lock, self.engine.begin() as conn:
                if contiguous:
                    deleted = conn.execute(requests_table.delete().where(requests_table.c.id >= values[0],
                                                                         requests_table.c.id <= values[-1]))
                elif self.dialect == "postgresql":
                    deleted = conn.execute(sa.text("DELETE FROM requests WHERE id = ANY(:ids)"), {"ids": values})
                else:
                    deleted = conn.execute(requests_table.delete().where(requests_table.c.id.in_(values)))
                if also is not None:
                    also(conn)
            self._committed()
            return deleted.rowcount

        return self._retry(attempt, retries, 0.05)

    def sqlite_vacuum(self) -> int:
        """Rewrite a SQLite file without its free pages (`VACUUM`), holding the writers' lock for
        the whole rewrite: writes wait for it, and fail as on a busy database after the busy timeout.
        A job for a quiet hour (docs/decisions/033-sqlite-reclaim-off-hours.md); 0 on PostgreSQL.

        Returns:
            The pages the file gave back.
        """
        if self.dialect != "sqlite":
            return 0
        with self._write_lock:
            raw = self.engine.raw_connection()
            try:
                cursor = raw.dbapi_connection.cursor()
                before = cursor.execute("PRAGMA page_count").fetchone()[0]
                cursor.execute("VACUUM")
                after = cursor.execute("PRAGMA page_count").fetchone()[0]
                cursor.close()
            finally:
                raw.close()
        self._committed()
        return before - after

    # --- reads -----------------------------------------------------------------------------------

    def count(self, *, labelled: bool | None = None) -> int:
        """Rows in the table; `labelled=True` counts only rows with a true label."""
        if not self.has_table():
            return 0
        stmt = sa.select(sa.func.count()).select_from(requests_table)
        if labelled is True:
            stmt = stmt.where(requests_table.c[LABEL].is_not(None))
        elif labelled is False:
            stmt = stmt.where(requests_table.c[LABEL].is_(None))
        with self.engine.connect() as conn:
            return int(conn.execute(stmt).scalar_one())

    def _window(self, columns: Iterable[str], *, labelled: bool | None, last_n: int | None,
                since_ts: float | None, until_ts: float | None = None) -> sa.Select:
        cols = [requests_table.c[name] for name in columns]
        stmt = sa.select(*cols)
        if labelled is True:
            stmt = stmt.where(requests_table.c[LABEL].is_not(None))
        if since_ts is not None:
            stmt = stmt.where(requests_table.c.ts >= since_ts)
        if until_ts is not None:
            stmt = stmt.where(requests_table.c.ts < until_ts)
        if last_n is not None:
            if last_n < 1:
                return stmt.where(sa.false()).order_by(requests_table.c.id)
            # The newest n rows are those from the n-th newest id on: one index step, where
            # `id IN (newest n ids)` would build a temporary set of n ids (docs/decisions/013-drift-window-reads.md).
            nth_newest = (sa.select(requests_table.c.id).order_by(requests_table.c.id.desc())
                          .limit(1).offset(last_n - 1))
            if since_ts is not None:
                nth_newest = nth_newest.where(requests_table.c.ts >= since_ts)
            if until_ts is not None:
                nth_newest = nth_newest.where(requests_table.c.ts < until_ts)
            stmt = stmt.where(requests_table.c.id >= sa.func.coalesce(nth_newest.scalar_subquery(), -1))
        return stmt.order_by(requests_table.c.id)

    def read_frame(self, columns: Sequence[str] = (*FEATURES, LABEL), *, labelled: bool | None = None,
                   last_n: int | None = None, since_ts: float | None = None,
                   equals: dict[str, str] | None = None) -> pd.DataFrame:
        """Read columns into a DataFrame, oldest first.

        Args:
            columns: column names of the `requests` table.
            labelled: True keeps only rows with a true label.
            last_n: keep only the newest n rows (after the other filters).
            since_ts: keep only rows logged at or after this epoch time.
            equals: keep only the window's rows whose columns hold these values (e.g. a model version).
        """
        stmt = self._window(columns, labelled=labelled, last_n=last_n, since_ts=since_ts)
        for name, value in (equals or {}).items():
            stmt = stmt.where(requests_table.c[name] == value)
        with self.engine.connect() as conn:
            result = conn.execute(stmt)
            return pd.DataFrame(result.fetchall(), columns=list(columns))

    def window_versions(self, *, last_n: int | None = None,
                        since_ts: float | None = None) -> dict[str | None, tuple[int, int]]:
        """Which model versions scored a window: {model_version: (rows with a score, rows)}.

        Raises:
            StoreUnavailable: the database cannot be read.
        """
        if not self.has_table():
            return {}
        window = self._window(["model_version", "score"], labelled=None, last_n=last_n,
                              since_ts=since_ts).order_by(None).subquery()
        stmt = (sa.select(window.c.model_version, sa.func.count(window.c.score), sa.func.count())
                .group_by(window.c.model_version))
        try:
            with self.engine.connect() as conn:
                return {version: (int(scored), int(total)) for version, scored, total in conn.execute(stmt)}
        except sa.exc.DBAPIError as exc:
            raise StoreUnavailable(f"request store {describe(self.location)} cannot be read: "
                                   f"{first_line(exc)}") from None

    def _shard(self, stmt: sa.Select, *, labelled: bool | None, last_n: int | None, since_ts: float | None,
               shard: tuple[int, int]) -> sa.Select:
        """Restrict a window statement to the k-th of n contiguous id ranges of the window."""
        index, shards = shard
        if not 0 <= index < shards:
            raise ValueError(f"shard {index} of {shards} does not exist")
        ids = self._window(["id"], labelled=labelled, last_n=last_n, since_ts=since_ts).order_by(None).subquery()
        try:
            with self.engine.connect() as conn:
                low, high = conn.execute(sa.select(sa.func.min(ids.c.id), sa.func.max(ids.c.id))).one()
        except sa.exc.DBAPIError as exc:
            raise StoreUnavailable(f"request store {describe(self.location)} cannot be read: "
                                   f"{first_line(exc)}") from None
        if low is None:
            return stmt.where(sa.false())
        size = high - low + 1
        start, stop = low + size * index // shards, low + size * (index + 1) // shards
        return stmt.where(requests_table.c.id >= start, requests_table.c.id < stop)

    def read_columns(self, columns: Sequence[str], *, dtype: type = np.float32, chunk_rows: int = 50_000,
                     last_n: int | None = None, since_ts: float | None = None, labelled: bool | None = None,
                     model_version: str | None = None, not_null: Sequence[str] = (),
                     shard: tuple[int, int] | None = None, until_ts: float | None = None) -> np.ndarray:
        """Read a window into one column-major array of shape (len(columns), rows), oldest first.

        The fast path for large windows (the drift check): rows go from the driver's cursor (a
        server-side cursor on PostgreSQL) into a preallocated array of `dtype` a chunk at a time,
        with no per-row objects beyond the driver's tuples, so memory stays at the result plus one
        chunk. NULLs become NaN.

        Args:
            columns: numeric column names of the `requests` table.
            dtype: the array's float type (float32 halves the memory of float64).
            chunk_rows: rows fetched per round trip.
            last_n, since_ts, labelled: the window, as in `read_frame`.
            until_ts: keep only rows logged before this epoch time.
            model_version: keep only the window's rows scored by this model version.
            not_null: keep only the window's rows where these columns are set.
            shard: (k, n) keeps only the k-th of n contiguous id ranges of the window, so n
                processes can read one window in parallel, each scanning only its own part.

        Raises:
            StoreUnavailable: the database cannot be read.
        """
        if not self.has_table():
            return np.empty((len(columns), 0), dtype=dtype)
        stmt = self._window(columns, labelled=labelled, last_n=last_n, since_ts=since_ts, until_ts=until_ts)
        if model_version is not None:
            stmt = stmt.where(requests_table.c.model_version == str(model_version))
        for name in not_null:
            stmt = stmt.where(requests_table.c[name].is_not(None))
        if shard is not None:
            stmt = self._shard(stmt, labelled=labelled, last_n=last_n, since_ts=since_ts, shard=shard)
        count = sa.select(sa.func.count()).select_from(stmt.order_by(None).subquery())
        # Literal values only (numbers and a version string), rendered by SQLAlchemy's own quoting.
        sql = str(stmt.compile(dialect=self.engine.dialect, compile_kwargs={"literal_binds": True}))
        try:
            with self.engine.connect() as conn:
                expected = int(conn.execute(count).scalar_one())
                if self.dialect == "sqlite":
                    arrays = _read_sqlite_arrow(self.url.removeprefix("sqlite:///"), sql, len(columns), expected,
                                                dtype)
                    if arrays is not None:
                        return arrays
                raw = conn.connection.dbapi_connection
                cursor = raw.cursor(name="read_columns") if self.dialect == "postgresql" else raw.cursor()
                try:
                    cursor.execute(sql)
                    return _fill_columns(cursor, len(columns), expected, dtype, chunk_rows)
                finally:
                    cursor.close()
        except (sa.exc.DBAPIError, self.engine.dialect.loaded_dbapi.Error) as exc:
            # The raw cursor raises the driver's own errors, not SQLAlchemy's wrappers.
            raise StoreUnavailable(f"request store {describe(self.location)} cannot be read: "
                                   f"{first_line(exc)}") from None


def _read_sqlite_arrow(path: str, sql: str, width: int, expected: int, dtype: type) -> np.ndarray | None:
    """Run a numeric query through the ADBC SQLite driver into a (width, rows) array.

    Arrow batches are built in C, at a fraction of the CPU of Python's sqlite3 tuples
    (docs/decisions/013-drift-window-reads.md). Returns None when the driver cannot type a column
    (it infers types from the first rows, so e.g. a column that starts with NULLs and later holds
    numbers), and the caller reads through the DB-API cursor instead.
    """
    import adbc_driver_sqlite.dbapi as adbc_sqlite
    import pyarrow as pa

    try:
        with adbc_sqlite.connect(path) as conn, conn.cursor() as cursor:
            cursor.execute(sql)
            out = np.empty((width, expected), dtype=dtype)
            filled, extra = 0, []
            for batch in cursor.fetch_record_batch():
                block = np.empty((width, batch.num_rows), dtype=dtype)
                for i in range(width):
                    block[i] = batch.column(i).to_numpy(zero_copy_only=False)
                room = min(batch.num_rows, expected - filled)
                out[:, filled:filled + room] = block[:, :room]
                filled += room
                if room < batch.num_rows:
                    extra.append(block[:, room:])
    except (adbc_sqlite.Error, pa.ArrowException, OSError, TypeError, ValueError):
        # e.g. "[SQLite] Type mismatch in column 0: expected INT64 but got DOUBLE"
        return None
    if extra:
        return np.concatenate([out, *extra], axis=1)
    return out[:, :filled]


def _fill_columns(cursor, width: int, expected: int, dtype: type, chunk_rows: int) -> np.ndarray:
    """Fetch a cursor's rows into a (width, rows) array; rows written meanwhile may add to `expected`."""
    out = np.empty((width, expected), dtype=dtype)
    filled, extra = 0, []
    while True:
        rows = cursor.fetchmany(chunk_rows)
        if not rows:
            break
        block = np.array(rows, dtype=dtype).reshape(len(rows), width)
        room = min(len(rows), expected - filled)
        out[:, filled:filled + room] = block[:room].T
        filled += room
        if room < len(rows):
            extra.append(block[room:].T)
    if extra:
        return np.concatenate([out, *extra], axis=1)
    return out[:, :filled]


def _as_sqlalchemy_error(exc: Exception, statement: str, dbapi) -> sa.exc.DBAPIError:
    """The SQLAlchemy error of a driver's error, as the engine would raise it.

    `insert_values` talks to the driver directly; its callers and the retry policy
    (common.retries.RETRYABLE) then see the same classes as for any other statement. The driver's
    classes are those of PEP 249, which SQLAlchemy's mirror by name.
    """
    for kind in ("IntegrityError", "OperationalError", "InterfaceError", "ProgrammingError", "DataError",
                 "InternalError", "NotSupportedError", "DatabaseError"):  # DatabaseError, their base, last
        if isinstance(exc, getattr(dbapi, kind)):
            return getattr(sa.exc, kind)(statement, None, exc)
    return sa.exc.DBAPIError(statement, None, exc)


def _same_value(stored, given) -> bool:
    """A stored value equals the value given for it (numbers by value: 1 == 1.0 == True)."""
    if stored is None or given is None:
        return stored is None and given is None
    if isinstance(given, str) or isinstance(stored, str):
        return stored == given
    stored, given = float(stored), float(given)
    return stored == given or (math.isnan(stored) and math.isnan(given))


def _count_new(conn: sa.Connection, sql: str, rows: list[tuple]) -> int:
    before = conn.execute(sa.select(sa.func.count()).select_from(requests_table)).scalar_one()
    conn.exec_driver_sql(sql, rows)
    return conn.execute(sa.select(sa.func.count()).select_from(requests_table)).scalar_one() - before


def _chunk_sizes(n: int, most: int) -> Iterator[int]:
    """Split n rows into chunks of `most` rows, then powers of two (largest first) for the rest.

    >>> list(_chunk_sizes(1000, 256))
    [256, 256, 256, 128, 64, 32, 8]
    """
    most = max(1, most)
    full, rest = divmod(n, most)
    yield from itertools.repeat(most, full)
    bit = 1 << max(rest.bit_length() - 1, 0)
    while rest:
        if rest & bit:
            yield bit
            rest ^= bit
        bit >>= 1


def _chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m common.store --create URL...`: create (or bring up to date) the `requests` table in each
    database, as whoever runs it. On PostgreSQL that is the databases' owner (`make postgres-roles`),
    because the roles the components log in as may not create tables (docker/postgres/roles.sql)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m common.store", description=main.__doc__.splitlines()[0])
    parser.add_argument("--create", nargs="+", required=True, metavar="URL",
                        help="request log or reference database: a SQLite path or a URL")
    args = parser.parse_args(argv)
    for location in args.create:
        try:
            RequestStore(location).dispose()
        except sa.exc.DBAPIError as exc:
            print(f"store: {describe(location)}: {first_line(exc)}", file=sys.stderr)
            return 1
        print(f"store: table requests ready in {describe(location)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
