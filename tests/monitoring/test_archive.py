"""The archive job moves old rows with final labels to Parquet, loses none, doubles none, even when killed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from benchmarks.storage import fill
from common import partitions
from common.archive import list_batches, read_log
from common.paths import REPO_ROOT
from common.store import RequestStore
from monitoring.archive import STEPS, ArchiveParams, archive
from monitoring.throttle import proc_stat
from tests.helpers.archive import (
    AFTER_DAYS,
    DAY,
    MATURITY_DAYS,
    NOW,
    archive_frame,
    assert_nothing_lost_or_doubled,
    build_log,
    copy_sqlite,
    live_frame,
)

BATCH_ROWS = 150
# The shipped config, without the pauses that let a service take turns: the suite keeps the machine
# busy, and the governor (monitoring/throttle.py) would hold the job to a tenth of the time.
FAST_CONFIG = REPO_ROOT / "tests" / "helpers" / "retention_config_no_pause.json"


@pytest.fixture(scope="module")
def sqlite_log(tmp_path_factory) -> tuple[Path, object]:
    folder = tmp_path_factory.mktemp("archive-log")
    path = folder / "requests.db"
    build_log(str(path))
    return path, live_frame(str(path))


def _params(location: str, folder: Path, **overrides) -> ArchiveParams:
    values = {"request_log": location, "archive_uri": str(folder), "after_days": AFTER_DAYS,
              "maturity_days": MATURITY_DAYS, "batch_rows": BATCH_ROWS, "as_of": NOW, "config": str(FAST_CONFIG),
              **overrides}
    return ArchiveParams(**values)


def _expected_archived(original) -> np.ndarray:
    final = original["Class"].notna() | (original["ts"] < NOW - MATURITY_DAYS * DAY)
    return np.sort(original.loc[(original["ts"] < NOW - AFTER_DAYS * DAY) & final, "id"].to_numpy())


def _archive_and_check(location: str, folder: Path, original, **overrides):
    result = archive(_params(location, folder, **overrides))
    archived = assert_nothing_lost_or_doubled(original, location, folder)
    expected = _expected_archived(original)
    assert np.array_equal(np.sort(archived["id"].to_numpy()), expected)
    # Files by month, each in the folder of the month its rows were logged in.
    for path in folder.rglob("*.parquet"):
        ts = pq.read_table(path, columns=["ts"]).column("ts").to_numpy()
        months = {np.datetime64(int(t), "s").astype("datetime64[M]").astype(str) for t in ts}
        assert months == {path.parent.name.removeprefix("month=")}
    store = RequestStore(location, create=False)
    try:
        assert {b.state for b in list_batches(store.engine)} == {"deleted"}
    finally:
        store.dispose()
    return result


def test_round_trip_archives_every_old_final_row_once_with_its_labels(sqlite_log, tmp_path):
    source, original = sqlite_log
    location = str(copy_sqlite(source, tmp_path / "requests.db"))
    folder = tmp_path / "archive"
    result = _archive_and_check(location, folder, original)
    assert result.rows_archived == result.rows_deleted == len(_expected_archived(original))
    unlabelled_young = original[(original["ts"] >= NOW - MATURITY_DAYS * DAY) & original["Class"].isna()
                                & (original["ts"] < NOW - AFTER_DAYS * DAY)]
    assert len(unlabelled_young) > 0 and set(unlabelled_young["id"]) <= set(live_frame(location)["id"])
    files = sorted(folder.rglob("*.parquet"))
    assert len(files) > 3  # several months and several batches per month
    again = archive(_params(location, folder))
    assert (again.rows_archived, again.rows_deleted) == (0, 0)
    assert sorted(folder.rglob("*.parquet")) == files
    # Readers see every labelled row once: from the archive and the live log.
    read = read_log(location, ["Class", "ts"], labelled=True, dtype=np.float64)
    assert read.sources["archive"] > 0 and read.sources["live"] > 0
    assert read.values.shape[1] == original["Class"].notna().sum()


def test_a_batch_read_in_many_time_slices_on_a_busy_machine_loses_and_doubles_nothing(sqlite_log, tmp_path,
                                                                                    monkeypatch):
    # Slices of a few rows each, every one its own read transaction, by children that the governor
    # stops and continues all along (a busy_above of 0: any other work makes the machine busy).
    import json

    import monitoring.archive as archive_module

    monkeypatch.setattr(archive_module, "READ_SLICE_ROWS", 7)
    source, original = sqlite_log
    location = str(copy_sqlite(source, tmp_path / "requests.db"))
    config = tmp_path / "retention.json"
    config.write_text(json.dumps({**json.loads(FAST_CONFIG.read_text()), "busy_cpu_share": 0.5, "busy_above": 0.0,
                                  "busy_delete_chunk_rows": 10}))
    result = _archive_and_check(location, tmp_path / "archive", original, config=str(config))
    assert result.rows_archived == result.rows_deleted == len(_expected_archived(original))


def test_the_monthly_run_leaves_the_pages_and_the_reclaim_run_gives_them_back_on_sqlite(sqlite_log, tmp_path):
    source, _ = sqlite_log
    location = str(copy_sqlite(source, tmp_path / "requests.db"))
    archived = archive(_params(location, tmp_path / "archive"))
    assert archived.rows_deleted > 0 and archived.pages_freed == 0
    assert archived.log_bytes_after >= archived.log_bytes_before  # the pages wait for new rows (the manifest grew)
    assert archived.seconds_by_step["delete"] > 0 and archived.seconds_by_step["reclaim"] == 0
    reclaimed = archive(_params(location, tmp_path / "archive", reclaim="only"))
    assert (reclaimed.rows_archived, reclaimed.rows_deleted) == (0, 0)
    assert reclaimed.pages_freed > 0 and reclaimed.seconds_by_step["reclaim"] > 0
    assert reclaimed.log_bytes_after < reclaimed.log_bytes_before


def test_a_config_that_asks_for_it_reclaims_after_the_archive_on_sqlite(sqlite_log, tmp_path):
    source, _ = sqlite_log
    location = str(copy_sqlite(source, tmp_path / "requests.db"))
    config = tmp_path / "retention.json"
    config.write_text(FAST_CONFIG.read_text().replace('"pause_fraction": 0.0', '"pause_fraction": 0.0,\n'
                                                                              '  "reclaim_after_archive": true'))
    result = archive(_params(location, tmp_path / "archive", config=str(config)))
    assert result.rows_deleted > 0 and result.pages_freed > 0
    assert result.log_bytes_after < result.log_bytes_before


@pytest.mark.parametrize("step", STEPS)
def test_a_run_killed_at_any_step_then_run_again_loses_and_doubles_nothing(sqlite_log, tmp_path, step):
    source, original = sqlite_log
    location = str(copy_sqlite(source, tmp_path / "requests.db"))
    folder = tmp_path / "archive"
    extra = []
    if step == "expiring":  # a first run archives; the killed one expires the oldest month's files
        archive(_params(location, folder))
        extra = ["--delete_after_days", "50"]
    command = [sys.executable, "-m", "monitoring.archive", "--request_log", location, "--archive_uri", str(folder),
               "--after_days", str(AFTER_DAYS), "--maturity_days", str(MATURITY_DAYS),
               "--batch_rows", str(BATCH_ROWS), "--as_of", str(NOW), "--tracking", "false", "--priority", "normal",
               "--config", str(FAST_CONFIG), *extra]
    killed = subprocess.run(command, cwd=REPO_ROOT, env={**os.environ, "ARCHIVE_KILL_AT": step},
                            capture_output=True, text=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    if step == "expiring":
        archive(_params(location, folder, delete_after_days=50.0))
        store = RequestStore(location, create=False)
        try:
            expired = [b for b in list_batches(store.engine) if b.state == "expired"]
        finally:
            store.dispose()
        assert expired and all(b.max_ts < NOW - 50 * DAY for b in expired)
        assert not any(Path(b.uri).exists() for b in expired)
        kept = archive_frame(folder)
        assert len(kept) + sum(b.rows for b in expired) == len(_expected_archived(original))
        return
    _archive_and_check(location, folder, original)


def test_round_trip_on_postgresql(postgres_url, tmp_path):
    build_log(postgres_url, rows=600)
    original = live_frame(postgres_url)
    _archive_and_check(postgres_url, tmp_path / "archive", original)


def test_a_partitioned_log_drops_whole_months_and_deletes_the_rest_by_row(postgres_url, tmp_path):
    store = RequestStore(postgres_url, partitioned=True)
    try:
        assert partitions.is_partitioned(store.engine)
        assert partitions.partitions(store.engine)[partitions.DEFAULT] is None
        build_log(postgres_url, rows=600)  # 60 days before NOW: no month partition yet, all in the default
        created = partitions.ensure_partitions(store.engine, NOW - 60 * DAY, NOW)
        assert created == ["requests_2023_09", "requests_2023_10", "requests_2023_11"]
        with store.engine.connect() as conn:
            assert conn.exec_driver_sql("SELECT count(*) FROM requests_default").scalar() == 0
        original = live_frame(postgres_url)
        result = _archive_and_check(postgres_url, tmp_path / "archive", original)
        # September ends before the cutoff (Oct 25): dropped whole; October's old rows deleted one by one.
        assert result.partitions_dropped == 1
        left = partitions.partitions(store.engine)
        assert "requests_2023_09" not in left and "requests_2023_10" in left
    finally:
        store.dispose()


def test_an_unpartitioned_postgresql_log_is_migrated_with_every_row(postgres_url):
    build_log(postgres_url, rows=300)
    before = live_frame(postgres_url)
    assert partitions.main(["migrate", postgres_url]) == 0
    store = RequestStore(postgres_url, partitioned=True)
    try:
        assert partitions.is_partitioned(store.engine)
        after = live_frame(postgres_url)
        assert after.equals(before)
        fill(store, 10, NOW, NOW + DAY)  # new rows take ids after the moved ones
        assert live_frame(postgres_url)["id"].min() == before["id"].min()
        assert live_frame(postgres_url)["id"].max() == before["id"].max() + 10
    finally:
        store.dispose()
    assert partitions.main(["migrate", postgres_url]) == 2  # already partitioned


@pytest.fixture
def archived_log(sqlite_log, tmp_path) -> tuple[str, object]:
    source, original = sqlite_log
    location = str(copy_sqlite(source, tmp_path / "requests.db"))
    archive(_params(location, tmp_path / "archive"))
    return location, original


def test_training_reads_every_labelled_row_from_the_live_log_and_the_archive(archived_log, reference_data):
    from training.data import load_labelled

    location, original = archived_log
    data = load_labelled(str(reference_data.db), location)
    labelled = original[original["Class"].notna()].sort_values("ts", kind="stable")
    assert data.request_labelled == len(labelled)
    assert 0 < data.request_archived < data.request_labelled
    assert data.request_unlabelled == original["Class"].isna().sum()
    rows = data.frame[data.frame["source"] == "requests"]
    np.testing.assert_array_equal(rows["ts"].to_numpy(), labelled["ts"].to_numpy())
    np.testing.assert_array_equal(rows["V1"].to_numpy(), labelled["V1"].to_numpy())


def test_a_window_wholly_in_the_archive_reads_only_the_archive(archived_log):
    location, original = archived_log
    since, until = NOW - 55 * DAY, NOW - 40 * DAY
    read = read_log(location, ["ts", "V3"], since_ts=since, until_ts=until, dtype=np.float64)
    assert read.sources == {"live": 0, "archive": read.values.shape[1]}
    expected = original[(original["ts"] >= since) & (original["ts"] < until)]
    np.testing.assert_array_equal(read.values[1], expected["V3"].to_numpy())


def test_drift_and_performance_windows_span_the_live_log_and_the_archive(archived_log):
    from monitoring.performance import _read
    from monitoring.window import Window, start_reading

    location, _ = archived_log
    live_rows = len(live_frame(location))
    pending = start_reading(location, ["V1", "score"], Window(last_n=live_rows + 100, since_ts=None, description=""))
    values = pending.result()
    assert values.shape == (2, live_rows + 100)
    assert pending.sources == {"live": live_rows, "archive": 100}
    frame, sources = _read(location, live_rows + 50, None)
    assert len(frame) == live_rows + 50 and sources == {"live": live_rows, "archive": 50}
    assert frame["model_version"].tolist() == ["3"] * len(frame)
    # A window the live log fills alone reads nothing from the archive.
    pending = start_reading(location, ["V1"], Window(last_n=10, since_ts=None, description=""))
    assert pending.result().shape == (1, 10) and pending.sources == {"live": 10, "archive": 0}


def test_a_role_that_cannot_create_partitions_still_opens_and_writes_the_partitioned_log(postgres_url, caplog):
    """The service's role (docker/postgres/roles.sql) may not create tables. A month whose partition
    nobody created yet must not keep it from opening the log: the default partition takes the rows."""
    import uuid

    import psycopg

    owner = RequestStore(postgres_url, partitioned=True)
    role = f"t_service_{uuid.uuid4().hex[:8]}"
    try:
        month_ahead = [name for name in partitions.partitions(owner.engine) if name != partitions.DEFAULT][-1]
        with psycopg.connect(postgres_url, autocommit=True) as conn:
            conn.execute(f'DROP TABLE "{month_ahead}"')  # the coming month: nobody created it yet
            conn.execute(f'CREATE ROLE "{role}" LOGIN')
            conn.execute(f'REVOKE CREATE ON SCHEMA public FROM PUBLIC, "{role}"')
            conn.execute(f'GRANT USAGE ON SCHEMA public TO "{role}"')
            conn.execute(f'GRANT SELECT, INSERT ON requests TO "{role}"')
            conn.execute(f'GRANT USAGE ON SEQUENCE requests_id_seq TO "{role}"')
        as_role = postgres_url.replace("://postgres@", f"://{role}@", 1)
        assert as_role != postgres_url
        store = RequestStore(as_role, partitioned=True)
        try:
            assert "cannot create the coming months' partitions" in caplog.text
            fill(store, 5, NOW, NOW + DAY)
            assert len(live_frame(postgres_url)) == 5
        finally:
            store.dispose()
        assert month_ahead not in partitions.partitions(owner.engine)  # the role created nothing
    finally:
        owner.dispose()
        with psycopg.connect(postgres_url, autocommit=True) as conn:
            conn.execute(f'DROP OWNED BY "{role}"')
            conn.execute(f'DROP ROLE IF EXISTS "{role}"')


def _running(pid: int) -> bool:
    """Whether a process exists and is not a zombie waiting to be reaped."""
    fields = proc_stat(pid)
    return fields is not None and fields[0] not in ("Z", "X")


def test_a_child_of_a_killed_job_dies_with_it():
    # A child that outlived a job killed with SIGKILL could go on writing a file that the next run
    # writes too, after that run has read it back.
    script = ("import sys, time\nfrom monitoring.archive import _Child\nfrom monitoring.throttle import Governor\n"
              "child = _Child(Governor(1.0, 1.0), 'normal', time.sleep, 60)\n"
              "print(child._process.pid, flush=True)\nchild.result()\n")
    job = subprocess.Popen([sys.executable, "-c", script], cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True)
    try:
        child = int(job.stdout.readline())
        assert _running(child)
        job.send_signal(signal.SIGKILL)
        job.wait(10)
        deadline = time.monotonic() + 10
        while _running(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _running(child), "the child outlived the killed job"
    finally:
        job.kill()
        job.stdout.close()
