"""A request log of 60 days to archive, and the checks that an archive lost and duplicated nothing."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.dataset as ds
import sqlalchemy as sa

from benchmarks.storage import fill
from common.archive import ARCHIVE_SCHEMA
from common.store import RequestStore

NOW = 1_700_000_000.0  # the clock of these tests (2023-11-14)
DAY = 86_400.0
ROWS = 2_000
AFTER_DAYS, MATURITY_DAYS = 20.0, 30.0


def build_log(location: str, rows: int = ROWS) -> None:
    """`rows` rows evenly over the 60 days before NOW, a quarter of them labelled."""
    store = RequestStore(location)
    try:
        fill(store, rows, NOW - 60 * DAY, NOW, chunk=1000)
    finally:
        store.dispose()


def copy_sqlite(source: Path, target: Path) -> Path:
    shutil.copyfile(source, target)
    return target


def live_frame(location: str) -> pd.DataFrame:
    """Every column of every live row, by id."""
    store = RequestStore(location, create=False)
    try:
        with store.engine.connect() as conn:
            frame = pd.read_sql(sa.text("SELECT * FROM requests ORDER BY id"), conn)
    finally:
        store.dispose()
    return frame[[c for c in ARCHIVE_SCHEMA.names if c in frame]]


def archive_frame(folder: Path) -> pd.DataFrame:
    """Every row of every Parquet file under the folder, whether or not the manifest lists it."""
    files = sorted(str(p) for p in folder.rglob("*.parquet"))
    if not files:
        return pd.DataFrame(columns=ARCHIVE_SCHEMA.names)
    return ds.dataset(files, format="parquet", schema=ARCHIVE_SCHEMA).to_table().to_pandas()


def assert_nothing_lost_or_doubled(original: pd.DataFrame, location: str, folder: Path) -> pd.DataFrame:
    """Live rows and archived rows together are the original rows, each exactly once, value for value.

    Returns the archived rows.
    """
    live, archived = live_frame(location), archive_frame(folder)
    both = pd.concat([live, archived[live.columns]], ignore_index=True)
    assert not both["id"].duplicated().any(), "a row is both live and archived, or archived twice"
    assert sorted(both["id"]) == sorted(original["id"]), "rows were lost"
    both = both.set_index("id").sort_index()
    expected = original.set_index("id").sort_index()[both.columns]
    for column in both.columns:
        a, b = both[column].to_numpy(), expected[column].to_numpy()
        if column in ("request_id", "model_name", "model_version", "shadow_version"):
            assert [None if pd.isna(v) else v for v in a] == [None if pd.isna(v) else v for v in b], column
        else:
            np.testing.assert_array_equal(a.astype(np.float64), b.astype(np.float64), err_msg=column)
    return archived
