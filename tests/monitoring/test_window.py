"""Reading drift windows: the Arrow fast path, the DB-API path, shards and parallel readers agree."""

from __future__ import annotations

import numpy as np
import pytest

import common.store as store_module
from common.schema import FEATURES
from common.store import RequestStore
from monitoring import window as window_module
from monitoring.window import Window, read_window
from tests.helpers.request_log import write_requests

COLUMNS = [*FEATURES, "score"]


@pytest.fixture
def log(tmp_path, drift_world) -> str:
    location = str(tmp_path / "requests.db")
    write_requests(location, drift_world.batch(3_000, 1, seed=31))
    return location


def test_arrow_and_dbapi_paths_read_the_same_window(log, monkeypatch):
    store = RequestStore(log, create=False)
    fast = store.read_columns(COLUMNS, last_n=2_500)
    monkeypatch.setattr(store_module, "_read_sqlite_arrow", lambda *args, **kwargs: None)
    slow = store.read_columns(COLUMNS, last_n=2_500)
    store.dispose()
    assert fast.shape == (len(COLUMNS), 2_500) and fast.dtype == np.float32
    np.testing.assert_array_equal(fast, slow)


def test_shards_partition_the_window(log):
    store = RequestStore(log, create=False)
    whole = store.read_columns(COLUMNS, last_n=2_000)
    parts = [store.read_columns(COLUMNS, last_n=2_000, shard=(k, 3)) for k in range(3)]
    store.dispose()
    assert sum(p.shape[1] for p in parts) == 2_000
    np.testing.assert_array_equal(np.sort(np.concatenate(parts, axis=1), axis=1), np.sort(whole, axis=1))


def test_a_column_that_starts_null_is_read_with_nan(tmp_path, drift_world):
    location = str(tmp_path / "nulls.db")
    frame = drift_world.batch(3_000, 0, seed=32)
    scores = np.full(3_000, np.nan)
    scores[2_500:] = 0.25  # the driver types columns from the first rows, which are all NULL here
    write_requests(location, frame, scores=scores)
    store = RequestStore(location, create=False)
    values = store.read_columns(["score"])[0]
    assert np.isnan(values[:2_500]).all() and (values[2_500:] == 0.25).all()
    assert store.read_columns(["score"], not_null=["score"]).shape == (1, 500)
    store.dispose()


def test_parallel_readers_return_the_same_rows_as_one_reader(log, monkeypatch):
    serial = read_window(log, COLUMNS, Window(2_000, None, "last 2000 rows"))
    monkeypatch.setattr(window_module, "PARALLEL_MIN_ROWS", 1)
    parallel = read_window(log, COLUMNS, Window(2_000, None, "last 2000 rows"))
    np.testing.assert_array_equal(np.sort(parallel, axis=1), np.sort(serial, axis=1))


def test_unreadable_request_log_is_a_window_read_error(tmp_path):
    broken = tmp_path / "broken.db"
    broken.write_bytes(b"this is not a database" * 100)
    with pytest.raises(window_module.WindowReadError):
        read_window(str(broken), COLUMNS, Window(10, None, "last 10 rows"))


@pytest.mark.postgres
def test_postgresql_window_reads_through_a_server_side_cursor(postgres_url, drift_world):
    frame = drift_world.batch(1_200, 0, seed=33)
    write_requests(postgres_url, frame, model_version=np.where(np.arange(1_200) < 200, "1", "2"))
    store = RequestStore(postgres_url, create=False)
    try:
        values = store.read_columns(COLUMNS, last_n=1_000, chunk_rows=128)
        assert values.shape == (len(COLUMNS), 1_000)
        np.testing.assert_allclose(values[0], frame["V1"].to_numpy()[200:], rtol=1e-6)
        assert store.read_columns(["score"], model_version="1").shape == (1, 200)
        assert store.window_versions(last_n=1_000) == {"2": (1_000, 1_000)}
    finally:
        store.dispose()


def test_unreadable_request_log_is_a_window_read_error_with_parallel_readers_too(tmp_path, monkeypatch):
    broken = tmp_path / "broken.db"
    broken.write_bytes(b"this is not a database" * 100)
    monkeypatch.setattr(window_module, "PARALLEL_MIN_ROWS", 1)
    with pytest.raises(window_module.WindowReadError):
        read_window(str(broken), COLUMNS, Window(10, None, "last 10 rows"))
