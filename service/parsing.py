"""Request bodies to feature arrays, with a message for every way a body can be wrong.

Pure functions over already-decoded JSON (plus `parse_json` for the bytes): no Flask, no model, no
database. Rows and records are numbered from 0, as they are indexed in the body.

Accepted values are JSON numbers within ±FEATURE_LIMIT; booleans, strings, null, NaN and ±Infinity
are refused. Raw `Amount` (records and named columns only) is turned into `Amount_scaled` with the
stored feature config, exactly as training did.

/invocations also takes the tables MLflow's scoring server takes: CSV with a header row (`csv_batch`)
and Parquet (`parquet_batch`), under the same rules: named columns, finite numbers, MAX_ROWS.
"""

from __future__ import annotations

import csv
import gc
import io
import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import orjson

from common.features import AmountScaler
from common.schema import FEATURES, N_FEATURES
from common.text import first_line
from service.errors import ApiError, invalid

# Far beyond any real feature (PCA components and scaled amounts are within a few hundred) and
# well inside float32, which the ONNX model computes in.
FEATURE_LIMIT = 1e9
V_FEATURES = FEATURES[:-1]
SCALED = FEATURES[-1]
RAW_AMOUNT = "Amount"
NAMED_COLUMNS = (*FEATURES, RAW_AMOUNT)
INVOCATION_FORMATS = ("dataframe_split", "dataframe_records", "instances", "inputs")
# The media types of MLflow's scoring server (mlflow.pyfunc.scoring_server.CONTENT_TYPES).
JSON = "application/json"
CSV = "text/csv"
PARQUET = "application/vnd.apache.parquet"
INVOCATION_MEDIA_TYPES = (JSON, CSV, PARQUET)
MAX_REQUEST_ID_LENGTH = 64

_NUMBER_TYPES = frozenset({int, float})
_NON_FINITE_LITERALS = (b"NaN", b"Infinity", b"-Infinity", b"nan", b"inf", b"-inf")

ScalerSource = Callable[[], AmountScaler]


@dataclass(frozen=True)
class Batch:
    """Rows ready to score: X is (n, 29) float64 in FEATURES order; `amount` holds the raw Amount
    per row where the client gave it (NaN elsewhere), or is None when no row did."""

    X: np.ndarray
    amount: np.ndarray | None = None

    def __len__(self) -> int:
        return self.X.shape[0]


def parse_json(body: bytes) -> object:
    """Decode a request body.

    Raises:
        ApiError: malformed_json, saying where the body stops being JSON.
    """
    if not body:
        raise ApiError("malformed_json", "the request body is empty; expected a JSON object")
    try:
        return _loads_without_gc(body)
    except orjson.JSONDecodeError as exc:
        position = exc.pos if isinstance(exc.pos, int) else 0
        if body[position:position + 9].startswith(_NON_FINITE_LITERALS):
            raise ApiError("malformed_json", f"NaN and Infinity are not JSON numbers (at character {position}); "
                                             "every value must be a finite number") from None
        if "infinity" in str(exc):
            raise ApiError("malformed_json", f"a number is too large to be finite ({exc}); values must be within "
                                             f"±{FEATURE_LIMIT:g}") from None
        raise ApiError("malformed_json", f"the body is not valid JSON: {exc}") from None


def _loads_without_gc(body: bytes) -> object:
    """orjson.loads with the cycle collector paused.

    A body within MAX_BODY_BYTES can hold about a million small arrays (`[[],[],...]`). Each one
    counts as a new container for the collector, which would otherwise run many full collections
    over the worker's whole heap (MLflow, scikit-learn) while decoding
    (docs/decisions/012-gc-paused-while-decoding-json.md). Decoded JSON is a tree, never a cycle,
    so reference counting frees it and nothing is left for the collector to find.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        return orjson.loads(body)
    finally:
        if enabled:
            gc.enable()


# --- /predict -----------------------------------------------------------------------------------------


def predict_batch(payload: object, *, max_rows: int, scaler: ScalerSource) -> Batch:
    """The original body `{"data": [[29 numbers], ...]}` or `{"records": [{"V1": ..., ...}, ...]}`.

    Raises:
        ApiError: invalid_input, too_many_rows, or feature_config_unavailable (raw Amount given
            but no stored scaler).
    """
    if type(payload) is not dict:
        raise invalid(f"the body is {_kind(payload)}; expected a JSON object with 'data' (rows of {N_FEATURES} "
                      "numbers) or 'records' (objects keyed by feature name)")
    _no_unknown_keys(payload, ("data", "records"), "the body")
    if "data" in payload and "records" in payload:
        raise invalid("give either 'data' or 'records', not both")
    if "data" in payload:
        return Batch(rows_array(payload["data"], "data", max_rows=max_rows))
    if "records" in payload:
        return records_batch(payload["records"], "records", max_rows=max_rows, scaler=scaler)
    raise invalid(f"the body has no 'data' (rows of {N_FEATURES} numbers) and no 'records'")


# --- /invocations (MLflow's scoring protocol) ----------------------------------------------------------


def invocations_media_type(mimetype: str, params: Mapping[str, str]) -> str:
    """The media type of an /invocations body, checked as MLflow's scoring server checks it: one of
    INVOCATION_MEDIA_TYPES, with no parameter but an optional UTF-8 charset.

    Raises:
        ApiError: unsupported_media_type.
    """
    if mimetype not in INVOCATION_MEDIA_TYPES:
        accepted = ", ".join(INVOCATION_MEDIA_TYPES)
        raise ApiError("unsupported_media_type", f"Content-Type is {mimetype or 'none'}; send one of {accepted}")
    for name, value in params.items():
        if name != "charset":
            # MLflow 1.x clients sent `format=pandas-split`; that protocol is gone, as in MLflow 2+.
            raise ApiError("unsupported_media_type", f"the Content-Type parameter {_clip(name)!r} is not accepted; "
                                                     f"send {mimetype} with at most a UTF-8 charset")
        if value.lower().replace("-", "") != "utf8":
            raise ApiError("unsupported_media_type", f"charset {_clip(value)} is not accepted; the body must be UTF-8")
    return mimetype


def invocations_body(media_type: str, body: bytes, *, max_rows: int, scaler: ScalerSource) -> Batch:
    """An /invocations body of one of INVOCATION_MEDIA_TYPES (see `invocations_media_type`).

    Raises:
        ApiError: as `invocations_batch`, `csv_batch` or `parquet_batch`.
    """
    if media_type == CSV:
        return csv_batch(body, max_rows=max_rows, scaler=scaler)
    if media_type == PARQUET:
        return parquet_batch(body, max_rows=max_rows, scaler=scaler)
    return invocations_batch(parse_json(body), max_rows=max_rows, scaler=scaler)


def invocations_batch(payload: object, *, max_rows: int, scaler: ScalerSource) -> Batch:
    """MLflow's scoring-server JSON: exactly one of dataframe_split, dataframe_records, instances,
    inputs; an optional `params` object (or null) is accepted and ignored (the model takes no parameters).

    `instances` and `inputs` hold rows of 29 numbers, records, or columns by name
    (`{"V1": [...], ...}`, pandas' `to_dict(orient="list")`; one number per column is one row).

    Raises:
        ApiError: as `predict_batch`.
    """
    formats = ", ".join(repr(f) for f in INVOCATION_FORMATS)
    if type(payload) is not dict:
        raise invalid(f"the body is {_kind(payload)}; expected a JSON object with one of {formats}")
    _no_unknown_keys(payload, (*INVOCATION_FORMATS, "params"), "the body")
    given = [f for f in INVOCATION_FORMATS if f in payload]
    if len(given) != 1:
        found = f"got {', '.join(repr(g) for g in given)}" if given else "got none"
        raise invalid(f"give exactly one of {formats}; {found}")
    params = payload.get("params")
    if params is not None and type(params) is not dict:
        raise invalid(f"'params' is {_kind(params)}; expected an object or null")
    name = given[0]
    value = payload[name]
    if name == "dataframe_split":
        return _dataframe_split(value, max_rows, scaler)
    if name == "dataframe_records":
        return records_batch(value, name, max_rows=max_rows, scaler=scaler)
    if type(value) is dict:
        return _columns_batch(value, name, max_rows, scaler)
    if type(value) is list and value and type(value[0]) is dict:
        return records_batch(value, name, max_rows=max_rows, scaler=scaler)
    return Batch(rows_array(value, name, max_rows=max_rows))


def _columns_batch(columns: dict, field: str, max_rows: int, scaler: ScalerSource) -> Batch:
    """`{"V1": [...], ..., "Amount_scaled": [...]}`: one array per column, all of one length; or one
    number per column, which is one record."""
    arrays = [v for v in columns.values() if type(v) is list]
    if not arrays:
        return records_batch([columns], field, max_rows=max_rows, scaler=scaler)
    names = _column_names(list(columns), f"'{field}'")
    if len(arrays) != len(columns):
        scalar = next(c for c in names if type(columns[c]) is not list)
        raise invalid(f"'{field}' column {scalar!r} is {_kind(columns[scalar])} where the others are arrays; "
                      "give every column as an array of one number per row")
    first = names[0]
    _check_count(columns[first], f"{field}.{first}", max_rows, "numbers, one per row")
    n_rows = len(columns[first])
    for name in names:
        if len(columns[name]) != n_rows:
            raise invalid(f"'{field}' column {name!r} has {len(columns[name])} values and column {first!r} "
                          f"{n_rows}; every column needs one value per row")
    if not _numbers_only(arrays):
        for name in names:
            for i, v in enumerate(columns[name]):
                if type(v) not in _NUMBER_TYPES:
                    raise invalid(f"'{field}' column {name!r} value {i} is {_kind(v)}, expected a number")
    X = np.array([columns[name] for name in names], dtype=np.float64).T
    _check_range(X, lambda i, j: f"'{field}' column {names[j]!r} value {i}")
    return _reorder(X, names, scaler)


def _dataframe_split(value: object, max_rows: int, scaler: ScalerSource) -> Batch:
    if type(value) is not dict:
        raise invalid(f"'dataframe_split' is {_kind(value)}; expected an object with 'columns' and 'data'")
    _no_unknown_keys(value, ("columns", "data", "index"), "'dataframe_split'")
    if "data" not in value:
        raise invalid("'dataframe_split' has no 'data'")
    if "index" in value and type(value["index"]) is not list:
        raise invalid(f"'dataframe_split.index' is {_kind(value['index'])}; expected an array")
    if "columns" not in value:
        return Batch(rows_array(value["data"], "dataframe_split.data", max_rows=max_rows))
    columns = _column_names(value["columns"], "dataframe_split.columns")
    X = rows_array(value["data"], "dataframe_split.data", max_rows=max_rows, names=columns)
    return _reorder(X, columns, scaler)


def _column_names(columns: object, field: str) -> tuple[str, ...]:
    if type(columns) is not list or not all(type(c) is str for c in columns):
        raise invalid(f"{field} must be an array of column names")
    if len(set(columns)) != len(columns):
        duplicate = next(c for c in columns if columns.count(c) > 1)
        raise invalid(f"{field} names {duplicate!r} more than once")
    unknown = [c for c in columns if c not in NAMED_COLUMNS]
    if unknown:
        raise invalid(f"{field} has unknown column {unknown[0]!r}; expected V1..V28 and Amount_scaled or Amount")
    missing = [c for c in V_FEATURES if c not in columns]
    if missing:
        raise invalid(f"{field} is missing {_names(missing)}")
    if SCALED in columns and RAW_AMOUNT in columns:
        raise invalid(f"{field} gives both 'Amount' and 'Amount_scaled'; give one")
    if SCALED not in columns and RAW_AMOUNT not in columns:
        raise invalid(f"{field} is missing 'Amount_scaled' (or the raw 'Amount')")
    return tuple(columns)


def _reorder(X: np.ndarray, columns: tuple[str, ...], scaler: ScalerSource) -> Batch:
    amount_column = SCALED if SCALED in columns else RAW_AMOUNT
    order = [columns.index(c) for c in (*V_FEATURES, amount_column)]
    X = X[:, order]
    if amount_column == SCALED:
        return Batch(X)
    amount = X[:, -1].copy()
    X[:, -1] = scaler().transform(amount)
    return Batch(X, amount)


# --- /invocations: CSV and Parquet tables -------------------------------------------------------------


def csv_batch(body: bytes, *, max_rows: int, scaler: ScalerSource) -> Batch:
    """A CSV table: a header row naming the columns (V1..V28 and Amount_scaled or the raw Amount, in
    any order), then one row per transaction, read with pandas as MLflow's scoring server reads it.
    Rows are numbered from 0, the first row after the header.

    Raises:
        ApiError: invalid_input (not UTF-8, no header, a column or value that is not accepted),
            too_many_rows, or feature_config_unavailable.
    """
    import pandas as pd

    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise invalid(f"the CSV body is not UTF-8 ({exc})") from None
    names = _csv_header(text)
    columns = _column_names(names, "the CSV header")
    try:
        # header=None: the header was read above, and pandas would take a row one value longer than
        # the header as an index (shifting every value by a column) instead of refusing it.
        frame = pd.read_csv(io.StringIO(text), header=None, skiprows=1, nrows=max_rows + 1)
    except pd.errors.EmptyDataError:
        raise invalid("the CSV body has a header row but no rows; send at least one row") from None
    except (ValueError, csv.Error) as exc:  # pandas' ParserError is a ValueError
        raise invalid(f"the body is not a CSV table: {first_line(exc)}") from None
    if len(frame) > max_rows:
        raise ApiError("too_many_rows", f"the CSV body has more than {max_rows} rows; at most {max_rows} (MAX_ROWS) "
                                        "are accepted per request")
    if frame.shape[1] != len(columns):
        raise invalid(f"the CSV rows have {frame.shape[1]} values and the header names {len(columns)} columns; "
                      "every row needs one value per column")
    for j, name in enumerate(columns):
        values = frame[j]
        if values.dtype.kind not in "iuf":
            raise _not_numbers(values.tolist(), lambda i, name=name: f"row {i} column {name!r}")
    X = frame.to_numpy(dtype=np.float64)
    _check_range(X, lambda i, j: f"row {i} column {columns[j]!r}")
    return _reorder(X, columns, scaler)


def _csv_header(text: str) -> list[str]:
    # Counted before the csv module makes a string of every name: a 4 MB header could hold a million.
    if text.partition("\n")[0].count(",") >= len(NAMED_COLUMNS):
        raise invalid(f"the CSV header has more than {len(NAMED_COLUMNS)} columns; expected {N_FEATURES}: V1..V28 and "
                      "Amount_scaled or Amount")
    try:
        names = next(csv.reader(io.StringIO(text)), None)
    except csv.Error as exc:
        raise invalid(f"the CSV header row cannot be read: {first_line(exc)}") from None
    if not names:
        raise invalid("the CSV body is empty; send a header row of column names (V1..V28 and Amount_scaled or "
                      "Amount), then one row per transaction")
    if names[0] == "":
        raise invalid("the first CSV column has no name: it looks like a DataFrame index; write the table with "
                      "to_csv(index=False)")
    if all(_is_number(name) for name in names):
        raise invalid("the first CSV row holds numbers, not column names; a CSV body starts with a header row "
                      "(V1..V28 and Amount_scaled or Amount)")
    return names


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def parquet_batch(body: bytes, *, max_rows: int, scaler: ScalerSource) -> Batch:
    """A Parquet table (pandas' `to_parquet`): columns V1..V28 and Amount_scaled or the raw Amount,
    of integer or floating-point type, without nulls. A pandas index stored with it is ignored.

    The row count and the column types are checked in the file's footer before any column is read,
    so a small file cannot make the worker decode more than MAX_ROWS rows of 29 numbers.

    Raises:
        ApiError: invalid_input (not Parquet, a column or value that is not accepted), too_many_rows,
            or feature_config_unavailable.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not body:
        raise invalid("the Parquet body is empty; send a table written by DataFrame.to_parquet()")
    try:
        parquet = pq.ParquetFile(pa.BufferReader(body))
        schema = parquet.schema_arrow
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise invalid(f"the body is not a Parquet file: {first_line(exc)}") from None
    n_rows = parquet.metadata.num_rows
    if n_rows > max_rows:
        raise ApiError("too_many_rows", f"the Parquet table has {n_rows} rows; at most {max_rows} (MAX_ROWS) are "
                                        "accepted per request")
    if n_rows < 1:
        raise invalid("the Parquet table has no rows; send at least one row")
    index = _pandas_index_columns(schema)
    columns = _column_names([name for name in schema.names if name not in index], "the Parquet table")
    for name in columns:
        kind = schema.field(name).type
        if not (pa.types.is_integer(kind) or pa.types.is_floating(kind)):
            raise invalid(f"the Parquet column {name!r} is of type {kind}, expected integers or floating-point numbers")
    try:
        table = parquet.read(columns=list(columns), use_pandas_metadata=False)
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise invalid(f"the Parquet table cannot be read: {first_line(exc)}") from None
    arrays = []
    for name in columns:
        column = table.column(name)
        if column.null_count:
            first = next(i for i, v in enumerate(column.is_null().to_pylist()) if v)
            raise invalid(f"row {first} column {name!r} is null, expected a finite number")
        arrays.append(column.to_numpy())
    X = np.column_stack(arrays).astype(np.float64, copy=False)
    if X.shape[0] > max_rows:  # the footer said otherwise; pyarrow read what the pages hold
        raise ApiError("too_many_rows", f"the Parquet table has {X.shape[0]} rows; at most {max_rows} (MAX_ROWS) "
                                        "are accepted per request")
    _check_range(X, lambda i, j: f"row {i} column {columns[j]!r}")
    return _reorder(X, columns, scaler)


def _pandas_index_columns(schema) -> set[str]:
    """The columns pandas' `to_parquet` stored the DataFrame's index in, from the note it leaves in the
    schema; none when the note is missing or malformed (an index column then counts as unknown)."""
    try:
        note = schema.pandas_metadata
    except ValueError:  # the note is not JSON
        return set()
    index = note.get("index_columns") if isinstance(note, dict) else None
    return {c for c in index if isinstance(c, str)} if isinstance(index, list) else set()


def _not_numbers(values: Sequence, where: Callable[[int], str]) -> ApiError:
    """The error for a table column that did not read as numbers, naming its first value that is no
    number (a string pandas left as text, like '1_000', when Python's float() would take every one)."""
    culprits = [i for i, v in enumerate(values) if type(v) is bool or (type(v) is str and not _is_number(v))]
    i = (culprits or [i for i, v in enumerate(values) if type(v) is str] or [0])[0]
    return invalid(f"{where(i)} is {_clip(str(values[i]))!r}, expected a number")


# --- shared: rows and records -------------------------------------------------------------------------


def rows_array(rows: object, field: str, *, max_rows: int, names: tuple[str, ...] = FEATURES) -> np.ndarray:
    """Validate an array of rows of len(names) numbers and return it as float64 (n, len(names)).

    Raises:
        ApiError: invalid_input naming the first bad row and value, or too_many_rows.
    """
    _check_count(rows, field, max_rows, f"rows of {len(names)} numbers")
    width = len(names)
    # Fast path: row lengths, then one pass over the types, one conversion (np.array for one row,
    # np.fromiter for a batch: docs/decisions/011-batch-parsing.md). Anything odd falls through to
    # _explain_rows, which names the first problem; a row of a million values (a 4 MB body) is
    # refused there on its length, without touching its values.
    if all(type(row) is list and len(row) == width for row in rows) and _numbers_only(rows):
        try:
            X = (np.array(rows, dtype=np.float64) if len(rows) == 1 else
                 np.fromiter(itertools.chain.from_iterable(rows), np.float64, len(rows) * width).reshape(-1, width))
        except (ValueError, OverflowError):
            X = None
        if X is not None and X.ndim == 2 and X.shape[1] == width:
            _check_range(X, lambda i, j: f"row {i}, value {j} ({names[j]})")
            return X
    raise _explain_rows(rows, field, names)


def records_batch(records: object, field: str, *, max_rows: int, scaler: ScalerSource) -> Batch:
    """Validate records keyed by feature name (V1..V28 and Amount_scaled or raw Amount).

    Raises:
        ApiError: invalid_input naming the first bad record and field, too_many_rows, or
            feature_config_unavailable.
    """
    _check_count(records, field, max_rows, "objects keyed by feature name")
    rows: list[list] = []
    raw_rows: list[int] = []
    for i, record in enumerate(records):
        if type(record) is not dict or len(record) != N_FEATURES:
            raise _explain_record(record, i)
        try:
            row = [record[name] for name in V_FEATURES]
        except KeyError:
            raise _explain_record(record, i) from None
        if SCALED in record:
            row.append(record[SCALED])
        elif RAW_AMOUNT in record:
            row.append(record[RAW_AMOUNT])
            raw_rows.append(i)
        else:
            raise _explain_record(record, i)
        rows.append(row)
    raw = set(raw_rows)

    def field_name(i: int, j: int) -> str:
        return V_FEATURES[j] if j < len(V_FEATURES) else (RAW_AMOUNT if i in raw else SCALED)

    if not _numbers_only(rows):
        for i, row in enumerate(rows):
            for j, v in enumerate(row):
                if type(v) not in _NUMBER_TYPES:
                    raise invalid(f"record {i} field {field_name(i, j)!r} is {_kind(v)}, expected a number")
    X = np.array(rows, dtype=np.float64)
    _check_range(X, lambda i, j: f"record {i} field {field_name(i, j)!r}")
    if not raw_rows:
        return Batch(X)
    amount = np.full(len(rows), np.nan)
    amount[raw_rows] = X[raw_rows, -1]
    X[raw_rows, -1] = scaler().transform(amount[raw_rows])
    return Batch(X, amount)


def _numbers_only(rows: list[list]) -> bool:
    """Whether every value in the rows is an int or a float (not a bool, str, None, list ...).

    Counting types in a list runs in C, with identity comparisons for the usual all-float rows,
    faster than collecting them in a set (docs/decisions/011-batch-parsing.md).
    """
    types = list(map(type, itertools.chain.from_iterable(rows)))
    floats = types.count(float)
    return floats == len(types) or floats + types.count(int) == len(types)


def _check_count(items: object, field: str, max_rows: int, what: str) -> None:
    if type(items) is not list:
        raise invalid(f"'{field}' is {_kind(items)}; expected an array of {what}")
    if not items:
        raise invalid(f"'{field}' is empty; send at least one row")
    if len(items) > max_rows:
        raise ApiError("too_many_rows", f"'{field}' has {len(items)} rows; at most {max_rows} (MAX_ROWS) are "
                                        "accepted per request")


def _check_range(X: np.ndarray, where: Callable[[int, int], str]) -> None:
    # Comparisons are False for NaN, so NaN and ±inf fail both checks. Small inputs (the common
    # single row) are checked faster in plain Python than through numpy's per-call overhead
    # (docs/decisions/007-single-row-fast-path.md).
    if X.size <= 128:
        if all(-FEATURE_LIMIT <= v <= FEATURE_LIMIT for v in X.ravel().tolist()):
            return
    elif (np.abs(X) <= FEATURE_LIMIT).all():
        return
    ok = np.abs(X) <= FEATURE_LIMIT
    i, j = (int(k) for k in np.argwhere(~ok)[0])
    value = X[i, j]
    if not np.isfinite(value):
        raise invalid(f"{where(i, j)} is {value}, expected a finite number")
    raise invalid(f"{where(i, j)} is {value:g}, outside the accepted range [-{FEATURE_LIMIT:g}, {FEATURE_LIMIT:g}]")


def _explain_rows(rows: list, field: str, names: tuple[str, ...]) -> ApiError:
    width = len(names)
    for i, row in enumerate(rows):
        if type(row) is not list:
            return invalid(f"row {i} of '{field}' is {_kind(row)}, expected an array of {width} numbers")
        if len(row) != width:
            return invalid(f"row {i} has {len(row)} values, expected {width}")
        for j, value in enumerate(row):
            if type(value) not in _NUMBER_TYPES:
                return invalid(f"row {i}, value {j} ({names[j]}) is {_kind(value)}, expected a number")
    return invalid(f"'{field}' must be an array of rows of {width} numbers")  # pragma: no cover - defensive


def _explain_record(record: object, i: int) -> ApiError:
    if type(record) is not dict:
        return invalid(f"record {i} is {_kind(record)}, expected an object keyed by feature name")
    unknown = [k for k in record if k not in NAMED_COLUMNS]
    if unknown:
        return invalid(f"record {i} has unknown field {unknown[0]!r}; expected V1..V28 and Amount_scaled or Amount")
    missing = [k for k in V_FEATURES if k not in record]
    if missing:
        return invalid(f"record {i} is missing {_names(missing)}")
    if SCALED in record and RAW_AMOUNT in record:
        return invalid(f"record {i} gives both 'Amount' and 'Amount_scaled'; give one")
    return invalid(f"record {i} is missing 'Amount_scaled' (or the raw 'Amount')")


# --- /feedback -----------------------------------------------------------------------------------------


def feedback_labels(payload: object, *, max_items: int) -> dict[str, int]:
    """`{"labels": [{"request_id": "...", "is_fraud": true}, ...]}` -> {request_id: 0/1}.

    is_fraud is a boolean or 0/1. When an id appears more than once, its last label counts.

    Raises:
        ApiError: invalid_input naming the first bad item, or too_many_rows.
    """
    if type(payload) is not dict:
        raise invalid(f"the body is {_kind(payload)}; expected a JSON object with 'labels'")
    _no_unknown_keys(payload, ("labels",), "the body")
    if "labels" not in payload:
        raise invalid("the body has no 'labels' (an array of {\"request_id\", \"is_fraud\"} objects)")
    items = payload["labels"]
    _check_count(items, "labels", max_items, "{\"request_id\", \"is_fraud\"} objects")
    labels: dict[str, int] = {}
    for i, item in enumerate(items):
        if type(item) is not dict:
            raise invalid(f"label {i} is {_kind(item)}, expected an object with 'request_id' and 'is_fraud'")
        _no_unknown_keys(item, ("request_id", "is_fraud"), f"label {i}")
        request_id, is_fraud = item.get("request_id"), item.get("is_fraud")
        if type(request_id) is not str or not 1 <= len(request_id) <= MAX_REQUEST_ID_LENGTH:
            raise invalid(f"label {i} 'request_id' is {_kind(request_id)}; expected a string of 1 to "
                          f"{MAX_REQUEST_ID_LENGTH} characters, as /predict returned it")
        if type(is_fraud) is bool:
            labels[request_id] = int(is_fraud)
        elif type(is_fraud) in _NUMBER_TYPES and is_fraud in (0, 1):
            labels[request_id] = int(is_fraud)
        else:
            raise invalid(f"label {i} 'is_fraud' is {_kind(is_fraud)}; expected true, false, 0 or 1")
    return labels


# --- helpers -------------------------------------------------------------------------------------------


def _no_unknown_keys(obj: dict, allowed: tuple[str, ...], where: str) -> None:
    for key in obj:
        if key not in allowed:
            expected = ", ".join(repr(a) for a in allowed)
            raise invalid(f"{where} has unknown field {_clip(key)!r}; expected {expected}")


def _kind(value: object) -> str:
    """How a JSON value reads in a message: 'a string', 'null', 'true', 'an array', ..."""
    if value is None:
        return "null"
    if value is True or value is False:
        return f"{str(value).lower()} (a boolean)"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, int | float):
        return f"the number {value!r}"
    return type(value).__name__  # pragma: no cover - JSON has no other types


def _clip(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def _names(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")
