"""Archive and retention of the request log: old rows with final labels move to Parquet by month.

`python -m monitoring.archive` (or `mlflow run . -e archive`) moves the rows logged more than
`archive_after_days` ago whose labels are final (labelled through /feedback, or older than the
performance check's maturity window) from the live `requests` table to Parquet files under
`archive_uri`, one folder per month, in batches of at most `batch_rows` rows. Each batch goes:

1. planned: its rows (a time range within one month, and the filter) are recorded in the log's
   `archive_batches` table (common/archive.py);
2. written: its rows are read from the live log and written to `month=YYYY-MM/part-<first id>-<last
   id>.parquet`; the file is fsynced (on a local disk) and read back;
3. verified: the row count and the SHA-256 of the values read back equal those of the rows read
   from the log; only then is the batch recorded as verified;
4. deleted: the file's rows are deleted from the live log `delete_chunk_rows` at a time, each chunk
   in its own short transaction that also records how far the deletes got, so the service's writes
   keep their turns.

A run that is killed at any point and run again finishes the batches it finds unfinished first: a
planned batch's file is written again from the rows (none has been deleted yet), a verified batch's
deletes resume. The file name depends only on the batch, so a rerun overwrites, never adds, and no
row is lost or stored twice (tests/monitoring/test_archive.py kills a run with SIGKILL at each step).

Files older than `delete_archive_after_days` (off by default) are deleted, batch by batch, after the
manifest says so. On SQLite the deleted rows' pages stay in the file for new rows; `--reclaim only`,
at a quiet hour, gives them back to the filesystem (`VACUUM`). PostgreSQL drops whole months and
leaves the rest to autovacuum. Each run is an MLflow run in
experiment `data-retention` with rows archived and deleted, bytes and seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import itertools
import json
import multiprocessing
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass, fields, replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import sqlalchemy as sa

from common import partitions, settings
from common.archive import (
    ARCHIVE_SCHEMA,
    Batch,
    archive_batches,
    create_manifest,
    list_batches,
    open_location,
    table_digest,
)
from common.schema import LABEL
from common.store import RequestStore, StoreUnavailable, describe, requests_table
from common.text import first_line
from monitoring.throttle import Governor

EXPERIMENT = "data-retention"
DAY = 86_400.0
ROW_GROUP_ROWS = 100_000
# A batch is read in time slices of about this many rows, each its own short read transaction: a
# SQLite reader that keeps one snapshot for the whole batch, as a job held to a share of a busy
# machine's time would, stops the WAL from starting over while the service writes
# (docs/decisions/035-archive-yields-to-a-busy-machine.md).
READ_SLICE_ROWS = 20_000
# Test hook: the run kills itself with SIGKILL when it reaches this step (tests/monitoring/test_archive.py).
KILL_AT_VARIABLE = "ARCHIVE_KILL_AT"
_IN_CHILD = False  # set in the child processes of _Child
STEPS = ("planned", "writing", "written", "read_back", "verified", "deleting", "deleted", "expiring")
# Where a run's time goes, reported by step: ArchiveResult.seconds_by_step, and the MLflow run's metrics.
# Each is the time of the process that did it; a batch is written while the one before is checked, so
# the steps can add up to more than the run.
TIMED_STEPS = ("plan", "read", "write", "verify", "delete", "drop", "reclaim", "pause")


class ArchiveError(RuntimeError):
    """The archive job cannot run, or a file did not read back as written (nothing was deleted)."""


@dataclass(frozen=True)
class RetentionConfig:
    archive_uri: str = "data/archive"
    archive_after_days: float = 90.0
    delete_archive_after_days: float | None = None
    batch_rows: int = 200_000
    delete_chunk_rows: int = 5_000
    partition_days_ahead: int = 7
    pause_fraction: float = 1.0
    reclaim_after_archive: bool = False
    # While other processes keep the machine busy (monitoring/throttle.py): the share of the time the
    # job's reading and writing may run, the share of the machine's CPU that counts as busy, and the
    # rows per delete transaction.
    busy_cpu_share: float = 0.1
    busy_above: float = 0.25
    busy_delete_chunk_rows: int = 1_000

    @classmethod
    def load(cls, path: Path) -> RetentionConfig:
        """Raises ArchiveError for a missing file, unknown keys or bad values."""
        try:
            raw = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise ArchiveError(f"retention config {path} cannot be read: {first_line(exc)}") from None
        unknown = set(raw) - {f.name for f in fields(cls)}
        if unknown:
            raise ArchiveError(f"retention config {path} has unknown keys {sorted(unknown)}")
        return cls(**raw).validated(str(path))

    def validated(self, where: str) -> RetentionConfig:
        if not self.archive_after_days > 0:
            raise ArchiveError(f"{where}: archive_after_days must be > 0, got {self.archive_after_days}")
        if self.delete_archive_after_days is not None and self.delete_archive_after_days < self.archive_after_days:
            raise ArchiveError(f"{where}: delete_archive_after_days ({self.delete_archive_after_days}) must be null "
                               f"or at least archive_after_days ({self.archive_after_days})")
        if not self.pause_fraction >= 0:
            raise ArchiveError(f"{where}: pause_fraction must be 0 or more, got {self.pause_fraction}")
        if not 0 < self.busy_cpu_share <= 1:
            raise ArchiveError(f"{where}: busy_cpu_share must be more than 0 and at most 1, got {self.busy_cpu_share}")
        if not 0 <= self.busy_above < 1:
            raise ArchiveError(f"{where}: busy_above must be at least 0 and less than 1, got {self.busy_above}")
        if not isinstance(self.reclaim_after_archive, bool):
            raise ArchiveError(f"{where}: reclaim_after_archive must be true or false, "
                               f"got {self.reclaim_after_archive!r}")
        for name in ("batch_rows", "delete_chunk_rows", "busy_delete_chunk_rows"):
            if getattr(self, name) < 1:
                raise ArchiveError(f"{where}: {name} must be at least 1, got {getattr(self, name)}")
        return self


@dataclass(frozen=True)
class ArchiveParams:
    request_log: str | None = None  # None: LATEST_DB
    archive_uri: str | None = None  # None: the config's
    after_days: float | None = None
    delete_after_days: float | None = None
    batch_rows: int | None = None
    maturity_days: float | None = None  # None: the performance config's
    as_of: float | None = None  # the clock (epoch seconds); None: now
    config: str | None = None
    reclaim: str = "config"  # "config": as reclaim_after_archive says; "only": reclaim, archive nothing
    priority: str = "normal"  # the CPU priority of the job's reading and writing (PRIORITIES)


@dataclass(frozen=True)
class ArchiveResult:
    batches: int
    rows_archived: int
    rows_deleted: int
    bytes_written: int
    files_expired: int
    rows_expired: int
    partitions_dropped: int
    pages_freed: int
    log_bytes_before: int
    log_bytes_after: int
    seconds: float
    archive_uri: str
    cutoff: float
    seconds_by_step: dict[str, float]
    seconds_busy: float = 0.0  # of the run's time, how much the machine counted as busy


def _kill_point(step: str) -> None:
    if os.environ.get(KILL_AT_VARIABLE) == step:
        if _IN_CHILD:  # the job itself dies, as a kill -9 of it would leave its child's work
            os.kill(os.getppid(), signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)


def _final(mature_before: float, before: float):
    """Rows logged before `before` whose labels are final: labelled, or logged before the maturity
    window began. When every such row is past it (the default config: the archive age is the
    maturity window), the condition is left out, so that the `ts` index alone answers a range."""
    if before <= mature_before:
        return sa.true()
    return sa.or_(requests_table.c[LABEL].is_not(None), requests_table.c.ts < mature_before)


def _batch_filter(batch: Batch):
    return sa.and_(requests_table.c.ts >= batch.ts_from, requests_table.c.ts < batch.ts_to,
                   _final(batch.mature_before, batch.ts_to))


class Archiver:
    """One run over one request log; `run()` does the work."""

    def __init__(self, store: RequestStore, config: RetentionConfig, archive_uri: str, cutoff: float,
                 mature_before: float, now: float, priority: str = "normal", governor: Governor | None = None):
        self.store = store
        self.priority = priority
        self.governor = governor or Governor(1.0, 1.0)
        self.config = config
        self.archive_uri = archive_uri.rstrip("/")
        self.cutoff = cutoff
        self.mature_before = mature_before
        self.now = now
        self.rows_archived = self.rows_deleted = self.bytes_written = 0
        self.files_expired = self.rows_expired = self.batches = 0
        self.partitions_dropped = 0
        self.partitioned = partitions.is_partitioned(store.engine)
        self.seconds = dict.fromkeys(TIMED_STEPS, 0.0)

    @contextlib.contextmanager
    def _timed(self, step: str):
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[step] += time.perf_counter() - started

    # --- planning --------------------------------------------------------------------------------

    def plan_next(self, scan_from: float | None) -> Batch | None:
        """The next batch: the oldest final rows before the cutoff, within one month, at most batch_rows."""
        ts = requests_table.c.ts
        where = [ts < self.cutoff, _final(self.mature_before, self.cutoff)]
        if scan_from is not None:
            where.append(ts >= scan_from)
        with self.store.engine.connect() as conn:
            first = conn.execute(sa.select(ts).where(*where).order_by(ts).limit(1)).scalar()
            if first is None:
                return None
            suffix, _, month_end = partitions.month_bounds(first)
            month = suffix.replace("_", "-")
            ts_to = min(month_end, self.cutoff)
            in_range = [ts >= first, ts < ts_to, _final(self.mature_before, ts_to)]
            # Rows with the (batch_rows + 1)-th time start the next batch; equal times stay together.
            after = conn.execute(sa.select(ts).where(*in_range).order_by(ts).limit(1)
                                 .offset(self.config.batch_rows)).scalar()
            if after is not None and after > first:
                ts_to = after
            low, high = conn.execute(sa.select(sa.func.min(requests_table.c.id), sa.func.max(requests_table.c.id))
                                     .where(ts >= first, ts < ts_to, _final(self.mature_before, ts_to))).one()
        name = f"{month}/{low:012d}-{high:012d}"
        uri = f"{self.archive_uri}/month={month}/part-{low:012d}-{high:012d}.parquet"
        return Batch(batch=name, month=month, first_id=int(low), last_id=int(high), ts_from=first, ts_to=ts_to,
                     mature_before=self.mature_before, uri=uri, state="planned", planned_at=time.time())

    def _record(self, batch: Batch) -> None:
        with self.store.engine.begin() as conn:
            conn.execute(archive_batches.insert().values(**asdict(batch)))

    def _update(self, batch: Batch, **values) -> Batch:
        with self.store.engine.begin() as conn:
            conn.execute(archive_batches.update().where(archive_batches.c.batch == batch.batch).values(**values))
        return replace(batch, **values)

    # --- the steps -------------------------------------------------------------------------------

    def batch_queries(self, batch: Batch) -> tuple[list[str], list[str]]:
        """The SQL statements that read the batch's rows from the live log in time order, one time
        slice each (READ_SLICE_ROWS), and the columns they read."""
        present = self.store.columns()
        names = [f.name for f in ARCHIVE_SCHEMA if f.name in present]
        slices = max(1, -(-self.config.batch_rows // READ_SLICE_ROWS))
        bounds = [batch.ts_from + (batch.ts_to - batch.ts_from) * i / slices for i in range(slices)] + [batch.ts_to]
        queries, ts = [], requests_table.c.ts
        for low, high in itertools.pairwise(bounds):
            # In `ts` order, the index's own: ordering by id would sort the slice in a temporary B-tree.
            stmt = (sa.select(*(requests_table.c[n] for n in names))
                    .where(_batch_filter(batch), ts >= low, ts < high).order_by(ts))
            # Numbers only (times and ids), rendered by SQLAlchemy's own quoting.
            queries.append(str(stmt.compile(dialect=self.store.engine.dialect,
                                            compile_kwargs={"literal_binds": True})))
        return queries, names

    # Reading, writing and reading back run in child processes at the job's CPU priority; this
    # process keeps its own for the deletes, which hold the writers' lock. A batch's file is written
    # while the batch before it is checked and deleted (docs/decisions/034-archive-work-in-low-priority-children.md).

    def start_write(self, batch: Batch) -> _Child:
        """Start writing a planned batch's file in a child process."""
        queries, names = self.batch_queries(batch)
        return _Child(self.governor, self.priority, _write_batch, self.store.dialect, self.store.url, queries, names,
                      batch.uri)

    def written(self, writing: _Child) -> WrittenFile:
        """Wait for a child started by start_write; what it wrote."""
        written = writing.result()
        self.seconds["read"] += written.read_seconds
        self.seconds["write"] += written.write_seconds
        _kill_point("written")
        return written

    def write(self, batch: Batch) -> Batch:
        """Write the batch's file and check it; the batch, verified."""
        return self.verify(batch, self.written(self.start_write(batch)))

    def verify(self, batch: Batch, written: WrittenFile) -> Batch:
        """Read the file back in another child; record the batch as verified when it holds what was written."""
        with self._timed("verify"):
            back_rows, back_digest = _Child(self.governor, self.priority, _file_digest, batch.uri).result()
        _kill_point("read_back")
        if back_rows != written.rows or back_digest != written.digest:
            raise ArchiveError(f"{batch.uri} read back {back_rows} rows (digest {back_digest[:12]}) for "
                               f"{written.rows} written (digest {written.digest[:12]}); no row was deleted")
        batch = self._update(batch, state="verified", rows=written.rows, sha256=written.digest, bytes=written.bytes,
                             labelled=written.labelled, min_ts=written.min_ts, max_ts=written.max_ts)
        self.rows_archived += written.rows
        self.bytes_written += written.bytes
        _kill_point("verified")
        return batch

    def delete(self, batch: Batch) -> Batch:
        fs, path = open_location(batch.uri)
        ids = np.sort(pq.read_table(path, filesystem=fs, columns=["id"]).column("id").to_numpy())
        done = batch.deleted_through
        if done is not None:
            ids = ids[ids > done]
        start = 0
        while start < len(ids):
            # Shorter transactions while the machine is busy: the service's writes wait less for the lock.
            chunk = self.config.busy_delete_chunk_rows if self.governor.busy else self.config.delete_chunk_rows
            part, start = ids[start:start + chunk], start + chunk
            last = int(part[-1])

            def progress(conn, last=last):
                conn.execute(archive_batches.update().where(archive_batches.c.batch == batch.batch)
                             .values(deleted_through=last))

            with self._taking_turns("delete"):
                self.rows_deleted += self.store.delete_ids(part.tolist(), also=progress)
            _kill_point("deleting")
        batch = self._update(batch, state="deleted", finished_at=time.time())
        _kill_point("deleted")
        return batch

    @contextlib.contextmanager
    def _taking_turns(self, step: str):
        """Around one write of the job: afterwards, wait `pause_fraction` of the time it took, so that
        the service's writes (and the WAL's checkpoints) get the log between the job's writes; while
        the machine is busy, long enough to keep the job to `busy_cpu_share` of the time."""
        with self.governor.turn():
            started = time.perf_counter()
            yield
            took = time.perf_counter() - started
        self.seconds[step] += took
        with self._timed("pause"):
            time.sleep(self.governor.wait_after(took, self.config.pause_fraction))

    def finish(self, batch: Batch, written: WrittenFile | None = None) -> None:
        """Take a batch to its end: its file written (unless `written` says what a child wrote) and
        verified, then its rows deleted (unless its month partition goes whole)."""
        if batch.state == "planned":
            batch = self.write(batch) if written is None else self.verify(batch, written)
        if batch.state == "verified" and not self._month_goes_whole(batch):
            self.delete(batch)
        self.batches += 1

    def _month_goes_whole(self, batch: Batch) -> bool:
        """Whether the batch's month partition will be dropped whole instead of its rows deleted."""
        return self.partitioned and partitions.month_bounds(batch.ts_from)[2] <= self.cutoff

    def drop_months(self) -> None:
        """Detach and drop each month partition whose rows are all in verified files; otherwise (rows
        that are not final yet, or a month without a partition) delete the batches' rows."""
        waiting: dict[str, list[Batch]] = {}
        for batch in list_batches(self.store.engine, ("verified",)):
            waiting.setdefault(partitions.month_bounds(batch.ts_from)[0], []).append(batch)
        existing = partitions.partitions(self.store.engine) if waiting else {}
        for suffix, batches in waiting.items():
            name = f"requests_{suffix}"
            whole = name in existing and all(b.deleted_through is None for b in batches)
            if whole:
                with self._timed("drop"), self.store.engine.begin() as conn:
                    conn.exec_driver_sql(f'LOCK TABLE "{name}" IN ACCESS EXCLUSIVE MODE')
                    live = conn.exec_driver_sql(f'SELECT count(*) FROM "{name}"').scalar()  # noqa: S608 - our name
                    whole = live == sum(b.rows or 0 for b in batches)
                    if whole:
                        partitions.drop_partition(conn, name)
                        conn.execute(archive_batches.update()
                                     .where(archive_batches.c.batch.in_([b.batch for b in batches]))
                                     .values(state="deleted", finished_at=time.time()))
                if whole:
                    self.rows_deleted += live
                    self.partitions_dropped += 1
                    _kill_point("deleted")
                    continue
            for batch in batches:
                self.delete(batch)

    def expire(self) -> None:
        """Delete the files of batches whose newest row is older than delete_archive_after_days."""
        days = self.config.delete_archive_after_days
        if days is None:
            return
        before = self.now - days * DAY
        for batch in list_batches(self.store.engine, ("deleted", "expiring")):
            if batch.max_ts is None or batch.max_ts >= before:
                continue
            # Readers skip the batch from here on, so a file deleted next is never looked for.
            batch = self._update(batch, state="expiring")
            _kill_point("expiring")
            fs, path = open_location(batch.uri)
            if fs.get_file_info(path).type != pafs.FileType.NotFound:
                fs.delete_file(path)
            self._update(batch, state="expired", finished_at=time.time())
            self.files_expired += 1
            self.rows_expired += batch.rows or 0

    def reclaim(self) -> int:
        """Give a SQLite file's free pages back to the filesystem; the pages freed."""
        with self._timed("reclaim"):
            return self.store.sqlite_vacuum()

    def run(self) -> None:
        create_manifest(self.store.engine)
        if self.partitioned:
            partitions.ensure_partitions(self.store.engine, self.now,
                                         self.now + self.config.partition_days_ahead * DAY)
        for batch in list_batches(self.store.engine, ("planned", "verified")):
            self.finish(batch)
        # A two-stage pipeline: the next batch's file is written in a child while this process
        # checks the batch before it (in another child) and deletes its rows.
        scan_from, pending = None, None  # pending: (a planned batch, the child writing its file)
        while True:
            with self._timed("plan"):
                batch = self.plan_next(scan_from)
            done = None if pending is None else (pending[0], self.written(pending[1]))
            pending = None
            if batch is not None:
                self._record(batch)
                _kill_point("planned")
                pending = (batch, self.start_write(batch))
                scan_from = batch.ts_to
            if done is not None:
                self.finish(*done)
            if pending is None:
                break
        if self.partitioned:
            self.drop_months()
        self.expire()


@dataclass(frozen=True)
class WrittenFile:
    """What a child process wrote: the facts the batch records, and the digest to check it against."""
    rows: int
    digest: str
    bytes: int
    labelled: int
    min_ts: float | None
    max_ts: float | None
    read_seconds: float
    write_seconds: float


def _write_batch(dialect: str, url: str, queries: list[str], names: list[str], uri: str) -> WrittenFile:
    """Read a batch's rows from the live log (ADBC, into Arrow) and write them to `uri`, durably."""
    started = time.perf_counter()
    if dialect == "sqlite":
        table = _sqlite_arrow(url.removeprefix("sqlite:///"), queries, names)
    else:
        table = _postgresql_arrow(url, queries, names)
    read_seconds = time.perf_counter() - started
    for field in ARCHIVE_SCHEMA:  # a log from before shadow scoring lacks the shadow columns
        if field.name not in table.column_names:
            table = table.append_column(field, pa.nulls(table.num_rows, field.type))
    table = table.select(ARCHIVE_SCHEMA.names).cast(ARCHIVE_SCHEMA)
    digest = table_digest(table)
    fs, path = open_location(uri)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    _write_parquet(fs, path, table)
    ts, rows = table.column("ts"), table.num_rows
    return WrittenFile(rows, digest, fs.get_file_info(path).size, rows - table.column(LABEL).null_count,
                       pc.min(ts).as_py() if rows else None, pc.max(ts).as_py() if rows else None, read_seconds,
                       time.perf_counter() - started - read_seconds)


def _file_digest(uri: str) -> tuple[int, str]:
    """(rows, digest) of a file as read back, in a process that did not write it."""
    fs, path = open_location(uri)
    back = pq.read_table(path, filesystem=fs, schema=ARCHIVE_SCHEMA)
    return back.num_rows, table_digest(back)


def _write_parquet(fs: pafs.FileSystem, path: str, table: pa.Table) -> None:
    """Write the file, and on a local disk fsync it and its folder before returning.

    An object store's upload is durable once its close returns; a local file only after fsync.
    """
    local = isinstance(fs, pafs.LocalFileSystem)
    sink = open(path, "wb") if local else fs.open_output_stream(path)
    try:
        with pq.ParquetWriter(sink, ARCHIVE_SCHEMA, compression="lz4") as writer:
            for start in range(0, max(table.num_rows, 1), ROW_GROUP_ROWS):
                writer.write_table(table.slice(start, ROW_GROUP_ROWS))
                _kill_point("writing")
        if local:
            sink.flush()
            os.fsync(sink.fileno())
    finally:
        sink.close()
    if local:
        folder = os.open(os.path.dirname(path), os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)


class _Child:
    """`function(*args)` in a forked process at CPU `priority`; `result()` waits for it.

    The job's heavy work runs there: at a lower priority than the process that takes the writers'
    lock, and, for the ADBC SQLite driver, apart from it: the driver carries its own SQLite library,
    and two libraries on one file in one process release each other's POSIX locks (the other's next
    statement fails with "disk I/O error"). The child dies with the job: one that outlived a killed
    job could go on writing a file that the next run writes too.
    """

    def __init__(self, governor: Governor, priority: str, function, *args):
        context = multiprocessing.get_context("fork")
        self._governor = governor
        self._receive, send = context.Pipe(duplex=False)
        parent = os.getpid()

        def run() -> None:
            global _IN_CHILD
            _IN_CHILD = True
            _die_with(parent)
            try:
                lower_priority(priority)
                send.send((True, function(*args)))
            except Exception as exc:  # as text: a driver's exception may not survive pickling
                send.send((False, f"{type(exc).__name__}: {first_line(exc)}"))

        self._process = context.Process(target=run, daemon=True)
        self._process.start()
        send.close()
        governor.watch(self._process.pid)

    def result(self):
        """The function's value. Raises ArchiveError when it raised, or the process died."""
        try:
            ok, value = self._receive.recv()
        except EOFError:
            raise ArchiveError(f"the archive's child process died (exit code {self._process.exitcode})") from None
        finally:
            self._receive.close()
            self._governor.forget(self._process.pid)  # before the join: a reaped id may be reused
            self._process.join()
        if not ok:
            raise ArchiveError(f"the archive's child process failed: {value}")
        return value


def _die_with(parent: int) -> None:
    """Have the kernel kill this process when its parent dies (Linux's PR_SET_PDEATHSIG)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the child ends with its call, as before
        return
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(1)


def _sqlite_arrow(path: str, queries: list[str], names: list[str]) -> pa.Table:
    """Run queries through the ADBC SQLite driver into one Arrow table, each in its own read
    transaction (autocommit: with it off, the driver would keep one snapshot for them all).

    The driver types each column from the first rows it sees, so a column that starts with NULLs
    and later holds numbers would fail: a first row of typed literals, dropped after, fixes the types.
    """
    import adbc_driver_sqlite.dbapi as adbc_sqlite

    literals = []
    for name in names:
        kind = ARCHIVE_SCHEMA.field(name).type
        literal = "''" if pa.types.is_string(kind) else ("0" if pa.types.is_integer(kind) else "0.0")
        literals.append(f'{literal} AS "{name}"')
    tables = []
    with adbc_sqlite.connect(path, autocommit=True) as conn, conn.cursor() as cursor:
        for sql in queries:
            cursor.execute(f"SELECT {', '.join(literals)} UNION ALL SELECT * FROM ({sql})")  # noqa: S608 - literals only
            tables.append(cursor.fetch_arrow_table().slice(1).rename_columns(names))
    return pa.concat_tables(tables)


def _postgresql_arrow(url: str, queries: list[str], names: list[str]) -> pa.Table:
    """Run queries through the ADBC PostgreSQL driver, which reads the rows by binary COPY into Arrow
    in C, each in its own transaction."""
    import adbc_driver_postgresql.dbapi as adbc_postgresql

    uri = sa.make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    tables = []
    with adbc_postgresql.connect(uri, autocommit=True) as conn, conn.cursor() as cursor:
        for sql in queries:
            cursor.execute(sql)
            tables.append(cursor.fetch_arrow_table().rename_columns(names))
    return pa.concat_tables(tables)


def _log_bytes(store: RequestStore, truncate: bool) -> int:
    """The live log's size on disk: the SQLite file and its WAL, or the PostgreSQL table with indexes.

    With `truncate`, the WAL is checkpointed and emptied first; that blocks the service's commits
    while it copies, so only a run that reclaims space (a quiet hour's) asks for it. Otherwise the
    WAL is copied back without blocking anyone, and counted at the size it has grown to.
    """
    if store.dialect == "sqlite":
        with store.engine.connect() as conn:
            conn.exec_driver_sql(f"PRAGMA wal_checkpoint({'TRUNCATE' if truncate else 'PASSIVE'})")
        path = Path(store.url.removeprefix("sqlite:///"))
        return sum(p.stat().st_size for p in (path, Path(f"{path}-wal")) if p.exists())
    with store.engine.connect() as conn:  # a partitioned table's own size is 0: its partitions hold the rows
        return int(conn.exec_driver_sql("SELECT sum(pg_total_relation_size(relid)) "
                                        "FROM pg_partition_tree('requests')").scalar() or 0)


def _maturity_days() -> float:
    from monitoring.performance import PerformanceConfig

    return PerformanceConfig.load(settings.performance_config_path()).maturity_days


def archive(params: ArchiveParams) -> ArchiveResult:
    """Archive the request log's old final rows, expire old archive files, and reclaim the space.

    Raises:
        ArchiveError: bad configuration, or a file that did not read back as written.
        StoreUnavailable: the request log cannot be reached.
    """
    started = time.perf_counter()
    config = RetentionConfig.load(Path(params.config) if params.config else settings.retention_config_path())
    overrides = {k: v for k, v in (("archive_after_days", params.after_days),
                                    ("delete_archive_after_days", params.delete_after_days),
                                    ("batch_rows", params.batch_rows)) if v is not None}
    config = replace(config, **overrides).validated("arguments") if overrides else config
    location = params.request_log or settings.request_log_url()
    if "://" not in location and not Path(location).is_file():
        raise ArchiveError(f"request log {location} does not exist (LATEST_DB): nothing to archive")
    uri = params.archive_uri or config.archive_uri
    if "://" not in uri:
        uri = str(Path(uri).expanduser().resolve())
    now = time.time() if params.as_of is None else params.as_of
    maturity = _maturity_days() if params.maturity_days is None else params.maturity_days
    store = RequestStore(location, create=False)
    try:
        if not store.has_table():
            raise ArchiveError(f"request log {describe(location)} has no requests table: nothing to archive")
        quiet = params.reclaim == "only" or config.reclaim_after_archive  # a run that reclaims stalls writes anyway
        before = _log_bytes(store, truncate=quiet)
        governor = Governor(config.busy_cpu_share, config.busy_above)
        archiver = Archiver(store, config, uri, now - config.archive_after_days * DAY, now - maturity * DAY, now,
                            params.priority, governor)
        if params.reclaim != "only":
            with governor:
                archiver.run()
        # Giving pages back rewrites the file under the writers' lock: a quiet hour's job
        # (docs/decisions/033-sqlite-reclaim-off-hours.md).
        freed = archiver.reclaim() if params.reclaim == "only" or config.reclaim_after_archive else 0
        after = _log_bytes(store, truncate=quiet)
    finally:
        store.dispose()
    return ArchiveResult(archiver.batches, archiver.rows_archived, archiver.rows_deleted, archiver.bytes_written,
                         archiver.files_expired, archiver.rows_expired, archiver.partitions_dropped, freed, before,
                         after, round(time.perf_counter() - started, 3), uri, archiver.cutoff,
                         {step: round(value, 3) for step, value in archiver.seconds.items()},
                         round(governor.busy_seconds, 3))


def log_run(result: ArchiveResult, location: str) -> str:
    """Record a run in experiment `data-retention`; returns its id."""
    from common import registry
    from monitoring.runs import log, start_run

    client = registry.client()
    run_id = start_run(client, EXPERIMENT, f"archive · {result.rows_archived:,} rows · {result.batches} batches")
    log(client, run_id,
        params={"request_log": describe(location), "archive_uri": result.archive_uri,
                "cutoff": datetime.fromtimestamp(result.cutoff, UTC).isoformat(timespec="seconds")},
        metrics={"rows_archived": result.rows_archived, "rows_deleted": result.rows_deleted,
                 "bytes_written": result.bytes_written, "files_expired": result.files_expired,
                 "rows_expired": result.rows_expired, "pages_freed": result.pages_freed,
                 "partitions_dropped": result.partitions_dropped,
                 "log_bytes_before": result.log_bytes_before, "log_bytes_after": result.log_bytes_after,
                 "bytes_reclaimed": result.log_bytes_before - result.log_bytes_after,
                 "seconds": result.seconds, "batches": result.batches, "seconds_busy": result.seconds_busy,
                 **{f"seconds_{step}": value for step, value in result.seconds_by_step.items()}})
    client.set_terminated(run_id, "FINISHED")
    return run_id


PRIORITIES = ("idle", "low", "normal")


def lower_priority(priority: str) -> str:
    """Make this process background work, so that a service on the same cores comes first
    (docs/decisions/034-archive-work-in-low-priority-children.md); returns what was applied."""
    if priority == "idle":
        try:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
            return "SCHED_IDLE"
        except (AttributeError, OSError):  # not Linux, or refused: the lowest nice instead
            os.nice(19)
            return "nice 19"
    if priority == "low":
        os.nice(10)
        return "nice 10"
    return "normal"


def build_parser() -> argparse.ArgumentParser:
    def optional(kind):
        def parse(text: str):
            return None if str(text).strip() == "" else kind(text)
        parse.__name__ = kind.__name__
        return parse

    parser = argparse.ArgumentParser(prog="python -m monitoring.archive", description=__doc__.splitlines()[0],
                                     epilog="exit codes: 0 done, 2 bad arguments or config, 1 the job could not run")
    add = parser.add_argument
    add("--request_log", "--request-log", default=None, help="the live log (default LATEST_DB)")
    add("--archive_uri", "--archive-uri", type=optional(str), default=None,
        help="where the Parquet files go: a path or any pyarrow filesystem URI (default: the config's)")
    add("--after_days", "--after-days", type=optional(float), default=None,
        help="archive rows older than this many days (default: the config's archive_after_days)")
    add("--delete_after_days", "--delete-after-days", type=optional(float), default=None,
        help="delete archived files whose rows are older than this (default: the config's; null is off)")
    add("--batch_rows", "--batch-rows", type=optional(int), default=None, help="rows per file at most")
    add("--maturity_days", "--maturity-days", type=optional(float), default=None,
        help="unlabelled rows older than this are final (default: the performance config's maturity_days)")
    add("--as_of", "--as-of", type=optional(str), default=None, help="the clock: epoch or ISO-8601 (default now)")
    add("--config", default=None, help="retention config (default RETENTION_CONFIG)")
    add("--reclaim", default="config", choices=("config", "only"),
        help="SQLite: give the free pages of deleted rows back to the filesystem; 'config': after the "
             "archive when the config's reclaim_after_archive is true (default false: new rows reuse them); "
             "'only': do that and nothing else, for a quiet hour (it stalls the service's writes)")
    add("--tracking", default="true", choices=("true", "false"), help="log an MLflow run (default true)")
    add("--priority", default="idle", choices=PRIORITIES,
        help="CPU priority of the job's reading, writing and reading back (child processes): 'idle' "
             "(default) runs only on a CPU the service leaves idle (SCHED_IDLE; nice 19 where that is "
             "unavailable), 'low' is nice 10, 'normal' leaves it. The deletes keep normal priority: "
             "they hold the writers' lock, which must not wait for a CPU")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from monitoring.window import parse_time


    try:
        as_of = None if args.as_of is None else parse_time(args.as_of, "--as-of")
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    params = ArchiveParams(args.request_log, args.archive_uri, args.after_days, args.delete_after_days,
                           args.batch_rows, args.maturity_days, as_of, args.config, args.reclaim, args.priority)
    try:
        result = archive(params)
    except ArchiveError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2 if "config" in str(exc) or "must be" in str(exc) else 1
    except StoreUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(asdict(result), indent=2))
    if args.tracking == "true":
        log_run(result, params.request_log or settings.request_log_url())
    return 0


if __name__ == "__main__":
    sys.exit(main())
