"""The request log's archive: Parquet files of old rows, and the manifest that says which are whole.

The archive job (monitoring/archive.py) moves old rows with final labels out of the live `requests`
table into Parquet files, one folder per month (`month=YYYY-MM/part-<first id>-<last id>.parquet`,
under any location pyarrow's filesystems accept). Each file is one *batch*, recorded in the
`archive_batches` table of the live log's own database, so that the record and the rows it
describes change in the same database:

- `planned`: the batch is chosen (an id range within one month, and the row filter it was chosen
  with); its file may be missing or partial, and every row is still live.
- `verified`: the file is complete, read back and checked; its rows are being deleted from the live
  log (`deleted_through` is the last id whose delete has committed).
- `deleted`: the rows live only in the file.
- `expired`: the file was deleted by the retention age (the rows are gone everywhere).

Readers (training, the drift and performance checks) read through `read_log`, which combines the
live log and the files of `verified` and `deleted` batches, and never reads a row twice: the rows of
a `verified` batch are taken from its file and left out of the live read.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import sqlalchemy as sa

from common.schema import LABEL
from common.store import RequestStore, StoreUnavailable, describe, requests_table
from common.text import first_line

READABLE = ("verified", "deleted")  # batch states whose files hold rows readers must see

manifest_metadata = sa.MetaData()
archive_batches = sa.Table(
    "archive_batches",
    manifest_metadata,
    sa.Column("batch", sa.String(80), primary_key=True),  # "YYYY-MM/<first id>-<last id>"
    sa.Column("month", sa.String(7), nullable=False),
    sa.Column("first_id", sa.BigInteger, nullable=False),
    sa.Column("last_id", sa.BigInteger, nullable=False),
    # The row filter the batch was chosen with: ts_from <= ts < ts_to, and labelled or ts < mature_before.
    sa.Column("ts_from", sa.Float, nullable=False),
    sa.Column("ts_to", sa.Float, nullable=False),
    sa.Column("mature_before", sa.Float, nullable=False),
    sa.Column("uri", sa.Text, nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("rows", sa.BigInteger),
    sa.Column("labelled", sa.BigInteger),
    sa.Column("bytes", sa.BigInteger),
    sa.Column("sha256", sa.String(64)),
    sa.Column("min_ts", sa.Float),
    sa.Column("max_ts", sa.Float),
    sa.Column("deleted_through", sa.BigInteger),
    sa.Column("planned_at", sa.Float, nullable=False),
    sa.Column("finished_at", sa.Float),
)


def _arrow_type(column: sa.Column) -> pa.DataType:
    kind = column.type
    if isinstance(kind, sa.SmallInteger):
        return pa.int16()
    if isinstance(kind, sa.Integer):  # BigInteger and Integer
        return pa.int64()
    if isinstance(kind, sa.Float):
        return pa.float64()
    return pa.string()


# Every column of the `requests` table, typed as the archive stores it.
ARCHIVE_SCHEMA = pa.schema([pa.field(c.name, _arrow_type(c)) for c in requests_table.columns])


@dataclass(frozen=True)
class Batch:
    batch: str
    month: str
    first_id: int
    last_id: int
    ts_from: float
    ts_to: float
    mature_before: float
    uri: str
    state: str
    rows: int | None = None
    labelled: int | None = None
    bytes: int | None = None
    sha256: str | None = None
    min_ts: float | None = None
    max_ts: float | None = None
    deleted_through: int | None = None
    planned_at: float = 0.0
    finished_at: float | None = None


def create_manifest(engine: sa.Engine) -> None:
    """Create `archive_batches` unless it exists (several processes may race; the loser finds it)."""
    try:
        manifest_metadata.create_all(engine, checkfirst=True)
    except sa.exc.DBAPIError:
        if not sa.inspect(engine).has_table(archive_batches.name):
            raise


def list_batches(engine: sa.Engine, states: Sequence[str] | None = None) -> list[Batch]:
    """The manifest's batches in the order they were planned (none when there is no manifest)."""
    if not sa.inspect(engine).has_table(archive_batches.name):
        return []
    stmt = sa.select(archive_batches).order_by(archive_batches.c.planned_at, archive_batches.c.first_id)
    if states is not None:
        stmt = stmt.where(archive_batches.c.state.in_(list(states)))
    with engine.connect() as conn:
        return [Batch(**row._mapping) for row in conn.execute(stmt)]


def table_digest(table: pa.Table) -> str:
    """SHA-256 of a table's values, column by column in schema order, nulls marked apart from values.

    Two tables with the same rows in the same order and the same ARCHIVE_SCHEMA types have the same
    digest, whatever their chunking or the file they came from.
    """
    digest = hashlib.sha256()
    for name in table.column_names:
        column = table.column(name).combine_chunks()
        digest.update(name.encode())
        valid = pc.is_valid(column).to_numpy(zero_copy_only=False)
        digest.update(np.packbits(valid).tobytes())
        if pa.types.is_string(column.type):
            # Each value's length, then the characters: the offsets and data buffers, rebased.
            if len(column):
                offsets = np.frombuffer(column.buffers()[1], dtype=np.int32)[column.offset:
                                                                            column.offset + len(column) + 1]
                digest.update(np.diff(offsets).tobytes())
                digest.update(memoryview(column.buffers()[2])[offsets[0]:offsets[-1]])
        else:
            filled = pc.fill_null(column, 0) if column.null_count else column
            digest.update(np.ascontiguousarray(filled.to_numpy(zero_copy_only=False)).tobytes())
    return digest.hexdigest()


def open_location(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path) of a local path or any URI pyarrow's filesystems accept (s3://, gs://, …)."""
    if "://" not in uri:
        from pathlib import Path

        return pafs.LocalFileSystem(), str(Path(uri).expanduser().resolve())
    return pafs.FileSystem.from_uri(uri)


@dataclass
class LogRead:
    """The rows of a window, as a (len(columns), rows) array, and how many came from each source."""

    values: np.ndarray
    sources: dict[str, int] = field(default_factory=dict)


def _window_filter(since_ts: float | None, until_ts: float | None, labelled: bool | None,
                   not_null: Sequence[str], equals: dict[str, str]) -> ds.Expression | None:
    parts = []
    if since_ts is not None:
        parts.append(ds.field("ts") >= since_ts)
    if until_ts is not None:
        parts.append(ds.field("ts") < until_ts)
    if labelled is True:
        parts.append(ds.field(LABEL).is_valid())
    for name in not_null:
        parts.append(ds.field(name).is_valid())
    for name, value in equals.items():
        parts.append(ds.field(name) == value)
    if not parts:
        return None
    expression = parts[0]
    for part in parts[1:]:
        expression = expression & part
    return expression


def read_archive(batches: Sequence[Batch], columns: Sequence[str], *, since_ts: float | None = None,
                 until_ts: float | None = None, labelled: bool | None = None, not_null: Sequence[str] = (),
                 equals: dict[str, str] | None = None) -> pa.Table:
    """The rows of these batches' files in the window, with `columns` plus `id` and `ts`, sorted by id.

    Files whose rows all lie outside [since_ts, until_ts) are not opened.
    """
    wanted = [b for b in batches
              if (since_ts is None or b.max_ts is None or b.max_ts >= since_ts)
              and (until_ts is None or b.min_ts is None or b.min_ts < until_ts)]
    names = list(dict.fromkeys([*columns, "id", "ts"]))
    schema = pa.schema([ARCHIVE_SCHEMA.field(n) for n in names])
    if not wanted:
        return schema.empty_table()
    by_filesystem: dict[int, tuple[pafs.FileSystem, list[str]]] = {}
    for batch in wanted:
        fs, path = open_location(batch.uri)
        by_filesystem.setdefault(id(type(fs)), (fs, []))[1].append(path)
    parts = []
    expression = _window_filter(since_ts, until_ts, labelled, not_null, equals or {})
    for fs, paths in by_filesystem.values():
        dataset = ds.dataset(paths, format="parquet", filesystem=fs, schema=ARCHIVE_SCHEMA)
        parts.append(dataset.to_table(columns=names, filter=expression))
    table = pa.concat_tables(parts) if len(parts) > 1 else parts[0]
    return table.take(pc.sort_indices(table, [("id", "ascending")]))


def read_log(location: str, columns: Sequence[str], *, dtype: type = np.float32, labelled: bool | None = None,
             last_n: int | None = None, since_ts: float | None = None, until_ts: float | None = None,
             model_version: str | None = None, not_null: Sequence[str] = ()) -> LogRead:
    """Read a window of numeric columns from the live log and its archive, oldest first (by id).

    The window is the newest `last_n` rows (None: all) of those logged in [since_ts, until_ts) that
    match the filters. A window with no live row is read from the archive alone; a `last_n` window
    that the live log fills alone is read from the live log alone.

    Raises:
        StoreUnavailable: the live log cannot be read.
    """
    store = RequestStore(location, create=False)
    try:
        batches = list_batches(store.engine, READABLE) if store.has_table() else []
        equals = {} if model_version is None else {"model_version": str(model_version)}
        pending = [b for b in batches if b.state == "verified"]
        live_columns = list(columns) + (["id"] if pending else [])
        live = np.empty((len(live_columns), 0), dtype=np.float64)
        if store.has_table() and _live_has_rows(store, since_ts, until_ts):
            live = store.read_columns(live_columns, dtype=np.float64, labelled=labelled, last_n=last_n,
                                      since_ts=since_ts, until_ts=until_ts, model_version=model_version,
                                      not_null=not_null)
            # Rows of a batch whose deletes are under way: the file has them all, the live log some.
            if pending and live.shape[1]:
                archived = np.concatenate([_file_ids(b) for b in pending])
                live = live[:, ~np.isin(live[-1].astype(np.int64), archived)]
            live = live[:len(columns)]
        if last_n is not None and live.shape[1] >= last_n:
            return LogRead(live[:, live.shape[1] - last_n:].astype(dtype, copy=False), {"live": last_n, "archive": 0})
        archive = read_archive(batches, columns, since_ts=since_ts, until_ts=until_ts, labelled=labelled,
                               not_null=not_null, equals=equals)
        if last_n is not None:
            archive = archive.slice(max(0, archive.num_rows - (last_n - live.shape[1])))
        old = np.empty((len(columns), archive.num_rows), dtype=dtype)
        for i, name in enumerate(columns):
            old[i] = pc.cast(archive.column(name), pa.float64()).to_numpy(zero_copy_only=False)
        values = np.concatenate([old, live.astype(dtype, copy=False)], axis=1)
        return LogRead(values, {"live": int(live.shape[1]), "archive": int(archive.num_rows)})
    except sa.exc.DBAPIError as exc:
        raise StoreUnavailable(f"request store {describe(location)} cannot be read: {first_line(exc)}") from None
    finally:
        store.dispose()


def read_log_frame(location: str, columns: Sequence[str], *, last_n: int | None = None,
                   since_ts: float | None = None) -> tuple[pd.DataFrame, dict[str, int]]:
    """`read_log` for columns of any type (model versions, ids): a DataFrame, oldest first, and the
    rows from each source. `columns` must be columns of the live table.

    Raises:
        StoreUnavailable: the live log cannot be read.
    """
    store = RequestStore(location, create=False)
    try:
        batches = list_batches(store.engine, READABLE) if store.has_table() else []
        pending = [b for b in batches if b.state == "verified"]
        live = store.read_frame(list(dict.fromkeys([*columns, "id"])), last_n=last_n, since_ts=since_ts)
        if pending and len(live):
            live = live[~live["id"].isin(np.concatenate([_file_ids(b) for b in pending]))]
        live = live[list(columns)]
        if not batches or (last_n is not None and len(live) >= last_n):
            return live.reset_index(drop=True), {"live": len(live), "archive": 0}
        archive = read_archive(batches, columns, since_ts=since_ts)
        if last_n is not None:
            archive = archive.slice(max(0, archive.num_rows - (last_n - len(live))))
        old = archive.select(list(columns)).to_pandas()
        frame = pd.concat([old, live], ignore_index=True) if len(old) else live.reset_index(drop=True)
        return frame, {"live": len(live), "archive": archive.num_rows}
    except sa.exc.DBAPIError as exc:
        raise StoreUnavailable(f"request store {describe(location)} cannot be read: {first_line(exc)}") from None
    finally:
        store.dispose()


def count_unlabelled(location: str) -> dict[str, int]:
    """Rows without a label: {"live": n, "archive": m} (the archive's from its manifest)."""
    store = RequestStore(location, create=False)
    try:
        live = store.count(labelled=False)
        archived = sum((b.rows or 0) - (b.labelled or 0)
                       for b in (list_batches(store.engine, ("deleted",)) if store.has_table() else []))
    finally:
        store.dispose()
    return {"live": live, "archive": archived}


def _live_has_rows(store: RequestStore, since_ts: float | None, until_ts: float | None) -> bool:
    """Whether any live row lies in [since_ts, until_ts): one step of the `ts` index."""
    stmt = sa.select(requests_table.c.id).limit(1)
    if since_ts is not None:
        stmt = stmt.where(requests_table.c.ts >= since_ts)
    if until_ts is not None:
        stmt = stmt.where(requests_table.c.ts < until_ts)
    with store.engine.connect() as conn:
        return conn.execute(stmt).first() is not None


def _file_ids(batch: Batch) -> np.ndarray:
    fs, path = open_location(batch.uri)
    return ds.dataset(path, format="parquet", filesystem=fs).to_table(columns=["id"]).column("id").to_numpy()
