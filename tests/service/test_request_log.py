"""The request log on real databases: SQLite (WAL, busy timeout) and PostgreSQL; failure means 503."""

from __future__ import annotations

import threading
import time
import uuid

import numpy as np
import pytest

from common.schema import FEATURES
from common.store import RequestStore
from service.app import service_of
from service.request_log import new_request_id
from tests.helpers.pg_proxy import CommitAckCutter
from tests.helpers.service import AUTH, parse_metrics


@pytest.mark.postgres
def test_postgresql_request_log_keeps_every_row_and_feedback(make_app, postgres_url, sample_rows):
    app = make_app(request_log=postgres_url)
    client = app.test_client()
    body = client.post("/predict", json={"data": sample_rows[:4]}, headers=AUTH).get_json()
    assert client.post("/feedback", json={"labels": [{"request_id": body["request_id"][1], "is_fraud": True}]},
                       headers=AUTH).get_json() == {"updated": 1, "unknown": []}
    store = RequestStore(postgres_url, create=False)
    try:
        frame = store.read_frame(("request_id", *FEATURES, "score", "decision", "model_version", "Class"))
    finally:
        store.dispose()
    assert frame["request_id"].tolist() == body["request_id"]
    np.testing.assert_allclose(frame[list(FEATURES)].to_numpy(), np.array(sample_rows[:4]))
    assert frame["score"].tolist() == body["fraud_probability"]
    assert frame["Class"].tolist()[1] == 1 and frame["Class"].isna().sum() == 3



@pytest.mark.postgres
@pytest.mark.parametrize("rows", [1, 5], ids=["one row", "a batch"])
def test_a_lost_commit_acknowledgement_still_answers_200_with_the_scores_and_logs_each_row_once(
        make_app, postgres_url, sample_rows, rows):
    with CommitAckCutter() as proxy:
        app = make_app(request_log=proxy.url(postgres_url))
        client = app.test_client()
        assert client.post("/predict", json={"data": sample_rows[:1]}, headers=AUTH).status_code == 200
        proxy.lose_next_commit_ack()
        response = client.post("/predict", json={"data": sample_rows[:rows]}, headers=AUTH)
        assert proxy.cut.is_set()
        assert response.status_code == 200, response.get_data(as_text=True)
        body = response.get_json()
        assert len(body["fraud_probability"]) == rows
    store = RequestStore(postgres_url, create=False)
    try:
        frame = store.read_frame(("request_id", "score"))
    finally:
        store.dispose()
    logged = frame[frame["request_id"].isin(body["request_id"])]
    assert logged["request_id"].tolist() == body["request_id"]  # each row once, in order
    assert logged["score"].tolist() == body["fraud_probability"]
    assert len(frame) == 1 + rows

def test_request_ids_are_uuid7_that_start_with_the_time_and_sort_by_it(client, sample_rows):
    def request_id() -> str:
        return client.post("/predict", json={"data": sample_rows[:1]}, headers=AUTH).headers["X-Request-ID"]

    before = time.time_ns() // 1_000_000
    first = request_id()
    time.sleep(0.002)
    second = request_id()
    after = time.time_ns() // 1_000_000
    for rid in (first, second):
        parsed = uuid.UUID(rid)
        assert (parsed.hex, parsed.version, parsed.variant) == (rid, 7, uuid.RFC_4122)
        assert before <= int(rid[:12], 16) <= after  # unix_ts_ms
    # A later request gets a later id, so the log's request_id index grows at its end.
    assert first < second
    ids = [new_request_id() for _ in range(50_000)]  # most share their millisecond with others
    assert len(set(ids)) == len(ids)
    assert len({rid[13:16] for rid in ids}) > 3000  # rand_a: 12 random bits, 4,096 values


def test_concurrent_requests_all_commit_to_sqlite(app, sample_rows):
    def send(n):
        client = app.test_client()
        for _ in range(n):
            assert client.post("/predict", json={"data": sample_rows[:2]}, headers=AUTH).status_code == 200

    threads = [threading.Thread(target=send, args=(15,)) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert RequestStore(service_of(app).config.request_log).count() == 4 * 15 * 2


def test_sqlite_request_log_uses_wal_a_busy_timeout_and_normal_sync_by_default(app, client, sample_rows,
                                                                              monkeypatch):
    client.post("/predict", json={"data": sample_rows[:1]}, headers=AUTH)
    engine = service_of(app).request_log.store().engine
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 5000
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 1  # NORMAL
    monkeypatch.setenv("SQLITE_SYNCHRONOUS", "full")
    store = RequestStore(service_of(app).config.request_log)
    with store.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
    store.dispose()


def test_an_unwritable_request_log_means_503_no_scores_and_a_counted_failure(make_app, sample_rows, caplog):
    # Nothing listens on port 1: the database is down.
    app = make_app(request_log="postgresql://postgres@127.0.0.1:1/requests")
    client = app.test_client()
    response = client.post("/predict", json={"data": sample_rows[:2]}, headers=AUTH)
    assert response.status_code == 503
    body = response.get_json()
    assert body == {"error": {"code": "request_log_unavailable", "message": body["error"]["message"]}}
    assert "no score is returned" in body["error"]["message"]
    assert "fraud_probability" not in response.get_data(as_text=True)
    feedback = client.post("/feedback", json={"labels": [{"request_id": "a-0", "is_fraud": True}]}, headers=AUTH)
    assert feedback.status_code == 503 and feedback.get_json()["error"]["code"] == "request_log_unavailable"
    samples = parse_metrics(client.get("/metrics", headers=AUTH).get_data(as_text=True))
    assert samples[("fraud_request_log_failures_total", ())] == 2
    assert samples[("fraud_errors_total", (("kind", "request_log_unavailable"),))] == 2
    assert samples[("fraud_predictions_total", (("decision", "legit"),))] == 0
    ready = client.get("/ready").get_json()
    assert "cannot be opened" in ready["request_log"]["last_error"]
    assert "127.0.0.1:1" in ready["request_log"]["location"]
    assert "request log write failed" in caplog.text


def test_the_sqlite_synchronous_setting_is_checked_at_start(monkeypatch, tmp_path):
    from common.settings import SettingsError
    from service.app import create_app

    monkeypatch.setenv("SQLITE_SYNCHRONOUS", "OFF")
    with pytest.raises(SettingsError, match="SQLITE_SYNCHRONOUS='OFF' is neither NORMAL nor FULL"):
        create_app({"tokens": ("request-log-test-token",), "request_log": str(tmp_path / "r.db"), "watch_model": False})


def _insert_many(path: str, prefix: str, n: int) -> None:
    from service.request_log import COLUMNS

    store = RequestStore(path)
    row = (1.0, *[0.25] * 29, None, 0.5, 0, 0.5, "fraud-detector", "1", None, None, None)
    for i in range(n):
        store.insert_values(COLUMNS, [(f"{prefix}-{i}", *row)])
    store.dispose()


def test_processes_writing_one_sqlite_log_at_once_lose_nothing(tmp_path):
    import multiprocessing

    path = str(tmp_path / "requests.db")
    RequestStore(path).dispose()
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_insert_many, args=(path, f"p{k}", 300)) for k in range(3)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
        assert worker.exitcode == 0
    assert RequestStore(path).count() == 900


def test_insert_values_refuses_a_duplicate_request_id_and_unknown_columns(tmp_path):
    import sqlalchemy as sa

    from service.request_log import COLUMNS

    store = RequestStore(str(tmp_path / "requests.db"))
    row = ("same-0", 1.0, *[0.25] * 29, None, 0.5, 0, 0.5, "fraud-detector", "1", 0.25, 0, "2")
    assert store.insert_values(COLUMNS, [row]) == 1
    with pytest.raises(sa.exc.IntegrityError):
        store.insert_values(COLUMNS, [row])
    with pytest.raises(ValueError, match="not columns of the requests table"):
        store.insert_values(("request_id", "nope"), [("a", 1)])
    assert store.count() == 1
    assert store.insert_values(COLUMNS, [("other-0", *row[1:])]) == 1  # the writer recovered
    store.dispose()


@pytest.mark.parametrize(("rows_per_statement", "as_array"), [(256, False), (3, False), (256, True), (3, True)])
def test_a_large_batch_lands_row_for_row_through_multi_row_statements(tmp_path, monkeypatch, rows_per_statement,
                                                                      as_array):
    import common.store
    from service.request_log import COLUMNS

    monkeypatch.setattr(common.store, "ROWS_PER_STATEMENT", rows_per_statement)
    store = RequestStore(str(tmp_path / "requests.db"))
    rng = np.random.default_rng(7)
    for n in (1000, 301, 1):  # full chunks, then 256+32+8+4+1 (or 3s and 2+1), then one row
        features = rng.normal(size=(n, 29)).round(6)
        rows = [(f"batch{n}-{i}", float(i), *features[i], None if i % 2 else 10.0 * i, i / n, i % 2, 0.5,
                 "fraud-detector", str(n), None if i % 3 else i / (2 * n), None if i % 3 else 1, None if i % 3 else "9")
                for i in range(n)]
        assert store.insert_values(COLUMNS, np.array(rows, dtype=object) if as_array else rows) == n
        frame = store.read_frame(("request_id", "ts", *FEATURES, "Amount", "score", "decision", "model_version"))
        frame = frame[frame["model_version"] == str(n)]
        assert frame["request_id"].tolist() == [r[0] for r in rows]
        np.testing.assert_array_equal(frame[list(FEATURES)].to_numpy(), features)
        assert frame["ts"].tolist() == [float(i) for i in range(n)]
        assert frame["score"].tolist() == [i / n for i in range(n)]
        assert frame["decision"].tolist() == [i % 2 for i in range(n)]
        assert [None if np.isnan(a) else a for a in frame["Amount"]] == [r[31] for r in rows]
        shadow = store.read_frame(("model_version", "shadow_score", "shadow_version"))
        shadow = shadow[shadow["model_version"] == str(n)]
        assert [None if np.isnan(v) else v for v in shadow["shadow_score"]] == [r[-3] for r in rows]
        assert [v if isinstance(v, str) else None for v in shadow["shadow_version"]] == [r[-1] for r in rows]
    assert store.count() == 1302
    store.dispose()


def test_a_batch_is_one_transaction_across_statements_and_a_ragged_row_is_refused(tmp_path, monkeypatch):
    import sqlalchemy as sa

    import common.store
    from service.request_log import COLUMNS

    monkeypatch.setattr(common.store, "ROWS_PER_STATEMENT", 4)
    store = RequestStore(str(tmp_path / "requests.db"))
    row = (1.0, *[0.25] * 29, None, 0.5, 0, 0.5, "fraud-detector", "1", None, None, None)
    assert store.insert_values(COLUMNS, [("taken-0", *row)]) == 1
    # The duplicate is in the third statement: the two before it must not stay behind.
    batch = [(f"new-{i}", *row) for i in range(9)] + [("taken-0", *row)]
    with pytest.raises(sa.exc.IntegrityError):
        store.insert_values(COLUMNS, batch)
    assert store.count() == 1
    ragged = [(f"r-{i}", *row) for i in range(5)]
    ragged[3] = ragged[3][:-1]
    with pytest.raises(ValueError, match=f"row 3 has {len(COLUMNS) - 1} values for {len(COLUMNS)} columns"):
        store.insert_values(COLUMNS, ragged)
    with pytest.raises(ValueError, match=rf"must have shape \(n, {len(COLUMNS)}\), not \(5, {len(COLUMNS) - 1}\)"):
        store.insert_values(COLUMNS, np.array([r[:len(COLUMNS) - 1] for r in ragged], dtype=object))
    assert store.count() == 1
    assert store.insert_values(COLUMNS, batch[:9]) == 9  # and the writer goes on
    assert store.count() == 10
    store.dispose()


def test_the_wal_is_checkpointed_by_a_background_thread_and_stays_bounded(tmp_path, monkeypatch):
    import common.sqlite_writer
    from service.request_log import COLUMNS

    monkeypatch.setattr(common.sqlite_writer, "CHECKPOINT_INTERVAL_SECONDS", 0.01)
    monkeypatch.setattr(common.sqlite_writer, "WAL_RESET_BYTES", 256 * 1024)
    path = tmp_path / "requests.db"
    store = RequestStore(str(path))
    wal = tmp_path / "requests.db-wal"
    row = (1.0, *[0.25] * 29, None, 0.5, 0, 0.5, "fraud-detector", "1", None, None, None)
    largest, commits = 0, 6000
    for i in range(commits):
        store.insert_values(COLUMNS, [(f"r-{i}", *row)])
        if i % 50 == 0:
            largest = max(largest, wal.stat().st_size)
        if i % 200 == 0:
            # Requests come with gaps; a loop without any may starve the thread of the GIL for long
            # enough to add 20 MB (seen once in a full run on a fast machine).
            time.sleep(0.001)
    # The commits themselves never checkpoint, so without the thread these 6,000 single-row commits
    # (about three 4 KiB pages each) would leave a WAL of about 75 MB. With it, the file restarts
    # after each locked checkpoint; what it reaches in between depends on how many commits this
    # loop makes between two wake-ups of the thread (up to 10-20 MB seen here).
    assert store._writers.get().execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 0
    assert largest < 25 * 1024**2, largest
    checkpointer = store._checkpointer
    assert checkpointer.checkpoints > 0 and checkpointer.resets > 0
    assert store.count() == commits
    thread = checkpointer._thread
    store.dispose()
    assert thread is not None and not thread.is_alive()
    reopened = RequestStore(str(path), create=False)
    assert reopened.count() == commits
    reopened.dispose()
