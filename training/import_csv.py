"""Import a credit-card-format CSV (generated, or the real public file) into the reference database.

The file is parsed and validated in full before anything is written, and the rows go in one
transaction, so a bad file leaves the database as it was. Each row's key is a hash of its values
plus its occurrence number within the file: re-importing the same data (even re-quoted) adds
nothing, while rows that are genuinely repeated in the file (the public file has some) are kept.
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pa_csv

from common import settings
from common.features import AmountScaler, FeatureConfigError, load_feature_config, save_feature_config
from common.schema import CSV_COLUMNS, LABEL, V_COLUMNS
from common.store import RequestStore, StoreUnavailable, describe


class CsvImportError(ValueError):
    """The CSV cannot be imported; the message names the problem."""


@dataclass(frozen=True)
class ImportResult:
    rows_read: int
    rows_added: int
    frauds: int
    seconds: float
    scaler_fitted: bool


def read_transactions(path: Path) -> pd.DataFrame:
    """Read and validate a CSV with the columns `Time, V1..V28, Amount, Class`.

    Raises:
        CsvImportError: the file is missing, empty, not comma-separated, lacks columns, or holds
            values that are not finite numbers (or labels other than 0 and 1).
    """
    path = Path(path)
    if not path.is_file():
        raise CsvImportError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise CsvImportError(f"{path}: the file is empty; expected a header Time,V1..V28,Amount,Class and rows")
    with path.open(newline="") as fh:
        header_line = fh.readline()
    header = next(csv.reader([header_line]), [])
    if len(header) <= 1:
        delimiter = next((d for d in (";", "\t", "|") if d in header_line), None)
        hint = f" (it looks {delimiter!r}-delimited)" if delimiter else ""
        raise CsvImportError(f"{path}: the header has 1 column{hint}; expected comma-separated columns "
                           "Time,V1..V28,Amount,Class")
    header = [h.strip() for h in header]
    missing = [c for c in CSV_COLUMNS if c not in header]
    if missing:
        raise CsvImportError(f"{path}: missing column(s) {', '.join(missing)}; expected Time,V1..V28,Amount,Class")
    try:
        table = pa_csv.read_csv(path, convert_options=pa_csv.ConvertOptions(
            column_types=dict.fromkeys(CSV_COLUMNS, pa.float64()), include_columns=list(CSV_COLUMNS)))
    except pa.ArrowInvalid:
        _raise_first_bad_value(path)
        raise
    out = table.to_pandas()
    if out.empty:
        raise CsvImportError(f"{path}: the file has a header but no rows")
    bad = ~np.isfinite(out.to_numpy())
    if bad.any():
        line, col = (int(i) for i in np.argwhere(bad)[0])
        raise CsvImportError(f"{path}: line {line + 2}, column {CSV_COLUMNS[col]}: {out.iat[line, col]!r} "
                             "is not a finite number")
    labels = out[LABEL]
    if not labels.isin([0.0, 1.0]).all():
        first = int(np.flatnonzero(~labels.isin([0.0, 1.0]).to_numpy())[0])
        raise CsvImportError(f"{path}: line {first + 2}, column Class: {out[LABEL].iloc[first]!r}; expected 0 or 1")
    out[LABEL] = labels.astype(np.int64)
    return out


def _raise_first_bad_value(path: Path) -> None:
    """Slow path, only for a file Arrow refused: find the first value that is not a number."""
    frame = pd.read_csv(path, usecols=list(CSV_COLUMNS), dtype=str, keep_default_na=False)
    for column in CSV_COLUMNS:
        values = pd.to_numeric(frame[column].str.strip(), errors="coerce")
        if values.isna().any():
            first = int(np.flatnonzero(values.isna().to_numpy())[0])
            raise CsvImportError(f"{path}: line {first + 2}, column {column}: {frame[column].iloc[first]!r} "
                                 "is not a number")


def row_keys(frame: pd.DataFrame) -> np.ndarray:
    """Content keys: a hash of each row's values plus its occurrence number among equal rows."""
    hashes = pd.util.hash_pandas_object(frame[list(CSV_COLUMNS)], index=False).to_numpy()
    occurrence = pd.Series(hashes).groupby(hashes).cumcount().to_numpy()
    return np.array([f"ref-{h:016x}-{k}" for h, k in zip(hashes, occurrence, strict=True)], dtype=object)


def to_rows(frame: pd.DataFrame, scaler: AmountScaler) -> pd.DataFrame:
    """The `requests` rows for a validated frame: features, `Amount_scaled`, label, content key."""
    table = frame[["Time", *V_COLUMNS, "Amount"]].copy()
    table["Amount_scaled"] = scaler.transform(frame["Amount"].to_numpy())
    table[LABEL] = frame[LABEL].astype(int)
    table["ts"] = frame["Time"]  # the event time: seconds from the start of the file's period
    table["request_id"] = row_keys(frame)
    return table


def import_csv(csv_path: Path, db: str, feature_config: Path | None = None) -> ImportResult:
    """Validate `csv_path` and add its rows to the reference database `db` in one transaction.

    The Amount scaler comes from the feature config; when none exists yet it is fitted on this
    file and stored, once, after the rows are committed.

    Raises:
        CsvImportError: the file is invalid; nothing was written.
        StoreUnavailable: the database could not be written; nothing was written.
    """
    started = time.perf_counter()
    frame = read_transactions(csv_path)
    config_path = feature_config or settings.feature_config_path()
    try:
        scaler, fitted = load_feature_config(config_path), False
    except FeatureConfigError:
        if Path(config_path).exists():
            raise
        scaler, fitted = AmountScaler.fit(frame["Amount"].to_numpy(), fitted_on=Path(csv_path).name), True
    store = RequestStore(db)
    try:
        added = store.insert_frame(to_rows(frame, scaler), ignore_existing=True)
    finally:
        store.dispose()
    if fitted:
        save_feature_config(scaler, config_path)
    return ImportResult(len(frame), added, int(frame[LABEL].sum()), time.perf_counter() - started, fitted)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.import_csv", description=__doc__.splitlines()[0])
    parser.add_argument("--csv", type=Path, default=Path("data/creditcard.csv"), help="CSV file to import")
    parser.add_argument("--db", default=None, help="reference database path or URL (default: REFERENCE_DB)")
    parser.add_argument("--feature-config", "--feature_config", dest="feature_config", type=Path, default=None,
                        help="scaler config (default: FEATURE_CONFIG, data/feature_config.json)")
    args = parser.parse_args(argv)
    db = args.db or settings.reference_db_url()
    try:
        result = import_csv(args.csv, db, args.feature_config)
    except (CsvImportError, FeatureConfigError, StoreUnavailable) as exc:
        print(f"import_csv: {exc}; the database was left unchanged", file=sys.stderr)
        return 2
    note = " (fitted and stored the Amount scaler)" if result.scaler_fitted else ""
    print(f"read {result.rows_read} rows ({result.frauds} frauds) from {args.csv}; added {result.rows_added} "
          f"new rows to {describe(db)} in {result.seconds:.1f}s{note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
