"""The request store's writes under trouble, on real SQLite and PostgreSQL: retried like every store
operation (common.retries), a table that another process creates at the same moment, and a commit
whose acknowledgement is lost on the way back."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable

import numpy as np
import pytest
import sqlalchemy as sa
from sqlalchemy.schema import CreateIndex, CreateTable

import common.sqlite_writer
from common.schema import FEATURES
from common.store import RequestStore, StoreUnavailable, describe, requests_table
from tests.helpers.pg_proxy import CommitAckCutter

COLUMNS = ("request_id", "ts", *FEATURES)
ROW = (0.0, *[0.5] * len(FEATURES))


@pytest.fixture
def short_busy_timeout(monkeypatch):
    """SQLite connections give up on a file another program holds after 50 ms, not 5 s."""
    monkeypatch.setattr(common.sqlite_writer, "SQLITE_BUSY_TIMEOUT_MS", 50)


def _hold_write_lock(path) -> sqlite3.Connection:
    """Another program's connection in the middle of a write transaction on the file."""
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    return holder


def _count_events(engine: sa.Engine, name: str) -> list[int]:
    seen = [0]

    def count(*_args) -> None:
        seen[0] += 1

    sa.event.listen(engine, name, count)
    return seen


@pytest.mark.usefixtures("short_busy_timeout")
def test_a_locked_file_fails_the_raw_writer_like_any_write_retried_on_fresh_connections(tmp_path):
    path = tmp_path / "requests.db"
    store = RequestStore(str(path))
    checkouts = _count_events(store.engine, "checkout")  # each attempt after a failure takes a new writer
    holder = _hold_write_lock(path)
    try:
        with pytest.raises(StoreUnavailable) as failed:
            store.insert_values(COLUMNS, [("a-0", *ROW)], retries=2, backoff=0.01)
        assert str(failed.value) == f"request store {describe(str(path))} unavailable: database is locked"
        assert checkouts[0] == 3
    finally:
        holder.rollback()
        holder.close()
    assert store.insert_values(COLUMNS, [("a-0", *ROW)]) == 1
    assert store.count() == 1
    store.dispose()


def test_a_writer_that_cannot_connect_is_retried_then_unavailable_not_a_driver_error():
    # Nothing listens on port 1: the server is down, and the pool raises the driver's own error.
    location = "postgresql://postgres@127.0.0.1:1/requests"
    store = RequestStore(location, create=False)
    with pytest.raises(StoreUnavailable, match=r"^request store postgresql\+psycopg://postgres@127\.0\.0\.1:1/requests "
                                               r"unavailable: connection failed"):
        store.insert_values(COLUMNS, [("a-0", *ROW)], retries=2, backoff=0.01)
    store.dispose()


@pytest.mark.usefixtures("short_busy_timeout")
@pytest.mark.parametrize("write", [
    lambda store: store.insert_rows([dict(zip(COLUMNS, ("b-0", *ROW), strict=True))], retries=2, backoff=0.01),
    lambda store: store.record_feedback({"a-0": 1}, retries=2),
], ids=["insert_rows", "record_feedback"])
def test_pooled_writes_retry_a_locked_file_then_are_unavailable(tmp_path, write: Callable[[RequestStore], object]):
    path = tmp_path / "requests.db"
    store = RequestStore(str(path))
    store.insert_values(COLUMNS, [("a-0", *ROW)])
    transactions = _count_events(store.engine, "begin")
    holder = _hold_write_lock(path)
    try:
        with pytest.raises(StoreUnavailable, match=r"^request store .* unavailable: database is locked$"):
            write(store)
        assert transactions[0] == 3
    finally:
        holder.rollback()
        holder.close()
    write(store)
    store.dispose()


def _create_while_another_process_creates(url: str, hold: Callable[[list[str]], Callable[[], None]]) -> None:
    """Open a RequestStore on `url` while another connection has created the table in a transaction
    it has not committed yet; that one commits once this store's CREATE TABLE is on its way."""
    statements: list[str] = []

    def seen(_conn, _cursor, statement, *_args) -> None:
        statements.append(statement)

    commit = hold(statements)
    outcome: list[BaseException | RequestStore] = []

    def open_store() -> None:
        try:
            outcome.append(RequestStore(url))
        except BaseException as exc:
            outcome.append(exc)

    sa.event.listen(sa.Engine, "before_cursor_execute", seen)
    try:
        opener = threading.Thread(target=open_store)
        opener.start()
        deadline = time.monotonic() + 10
        while not any("CREATE TABLE requests" in s for s in statements) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert any("CREATE TABLE requests" in s for s in statements), "the store never tried to create the table"
        time.sleep(0.2)  # the CREATE reaches the database and waits for the other transaction
        commit()
        opener.join(15)
    finally:
        sa.event.remove(sa.Engine, "before_cursor_execute", seen)
    assert len(outcome) == 1
    store = outcome[0]
    assert isinstance(store, RequestStore), f"{type(store).__name__}: {store}"
    assert store.has_table() and store.count() == 0
    store.dispose()


def _schema_ddl(dialect: sa.Dialect) -> list[str]:
    return [str(CreateTable(requests_table).compile(dialect=dialect)),
            *(str(CreateIndex(index).compile(dialect=dialect)) for index in requests_table.indexes)]


def test_a_sqlite_table_created_meanwhile_by_another_process_is_taken_as_created(tmp_path):
    path = tmp_path / "requests.db"
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("PRAGMA journal_mode=WAL")

    def hold(_statements: list[str]) -> Callable[[], None]:
        holder.execute("BEGIN IMMEDIATE")
        for ddl in _schema_ddl(sa.dialects.sqlite.dialect()):
            holder.execute(ddl)
        return lambda: holder.execute("COMMIT")

    try:
        _create_while_another_process_creates(str(path), hold)
    finally:
        holder.close()


@pytest.mark.postgres
def test_a_postgresql_table_created_meanwhile_by_another_process_is_taken_as_created(postgres_url):
    import psycopg

    holder = psycopg.connect(postgres_url)

    def hold(_statements: list[str]) -> Callable[[], None]:
        for ddl in _schema_ddl(sa.dialects.postgresql.dialect()):
            holder.execute(ddl)
        return holder.commit

    try:
        _create_while_another_process_creates(postgres_url, hold)
    finally:
        holder.close()


# --- a commit whose acknowledgement is lost -------------------------------------------------------


def _stored(url: str) -> list[tuple]:
    import psycopg

    with psycopg.connect(url) as conn:
        return conn.execute('SELECT request_id, ts, "V1", score FROM requests ORDER BY id').fetchall()


@pytest.mark.postgres
@pytest.mark.parametrize("rows", [1, 300], ids=["one row", "a batch"])
def test_a_retry_that_finds_its_own_committed_rows_counts_as_written_once(postgres_url, rows):
    with CommitAckCutter() as proxy:
        store = RequestStore(proxy.url(postgres_url))
        values = [(f"r-{i}", 1.5, *[0.25 * i] * len(FEATURES)) for i in range(rows)]
        proxy.lose_next_commit_ack()
        try:
            assert store.insert_values(COLUMNS, values, retries=2, backoff=0.01) == rows
        finally:
            store.dispose()
        assert proxy.cut.is_set()  # the first attempt's COMMIT was answered, and the answer lost
    stored = _stored(postgres_url)
    assert [row[0] for row in stored] == [f"r-{i}" for i in range(rows)]


@pytest.mark.postgres
def test_a_retry_that_finds_other_values_under_its_request_id_is_still_a_constraint_violation(postgres_url):
    import psycopg

    def change_the_committed_row() -> None:
        with psycopg.connect(postgres_url) as conn:
            conn.execute("UPDATE requests SET \"V1\" = 9.0 WHERE request_id = 'r-0'")

    with CommitAckCutter() as proxy:
        store = RequestStore(proxy.url(postgres_url))
        proxy.lose_next_commit_ack(after_cut=change_the_committed_row)
        try:
            with pytest.raises(sa.exc.IntegrityError, match="duplicate key"):
                store.insert_values(COLUMNS, [("r-0", *ROW)], retries=2, backoff=0.01)
        finally:
            store.dispose()
        assert proxy.cut.is_set()
    assert _stored(postgres_url) == [("r-0", 0.0, 9.0, None)]


@pytest.mark.postgres
def test_a_first_attempt_that_meets_its_request_id_taken_is_a_constraint_violation_at_once(postgres_url):
    store = RequestStore(postgres_url)
    try:
        store.insert_values(COLUMNS, [("r-0", *ROW)])
        # The same values: on a first attempt that is a second write of the id, not a retry.
        with pytest.raises(sa.exc.IntegrityError, match="duplicate key"):
            store.insert_values(COLUMNS, [("r-0", *ROW)], retries=2, backoff=0.01)
    finally:
        store.dispose()


# --- PostgreSQL writes -------------------------------------------------------------------------------


def _request_log_rows(n: int, seed: int = 7) -> list[tuple]:
    """Rows of service.request_log.COLUMNS with every kind of value: NULLs, integers, text, floats."""
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(n, len(FEATURES)))
    return [(f"r-{i}", 1.5 + i, *features[i], None if i % 2 else 10.0 * i, i / n, i % 2, 0.5, "fraud-detector", "3",
             None if i % 3 else i / (2 * n), None if i % 3 else 1, None if i % 3 else "4") for i in range(n)]


@pytest.mark.postgres
@pytest.mark.parametrize("as_array", [False, True], ids=["tuples", "an object array"])
def test_a_postgresql_batch_lands_value_for_value_in_one_statement(postgres_url, as_array):
    from service.request_log import COLUMNS as LOG_COLUMNS

    store = RequestStore(postgres_url)
    statements = _count_events(store.engine, "before_cursor_execute")  # none through the pool: the writer's own
    try:
        rows = _request_log_rows(1000)
        assert store.insert_values(LOG_COLUMNS, np.array(rows, dtype=object) if as_array else rows) == 1000
        assert store.insert_values(LOG_COLUMNS, [("one-0", *rows[0][1:])]) == 1
        assert statements[0] == 0
        frame = store.read_frame(LOG_COLUMNS)
    finally:
        store.dispose()
    stored = [tuple(None if isinstance(v, float) and np.isnan(v) else v for v in row)
              for row in frame.astype(object).itertuples(index=False, name=None)]
    assert stored == [*rows, ("one-0", *rows[0][1:])]


@pytest.mark.postgres
def test_a_postgresql_batch_with_a_taken_request_id_stores_none_of_its_rows(postgres_url):
    from service.request_log import COLUMNS as LOG_COLUMNS

    store = RequestStore(postgres_url)
    try:
        rows = _request_log_rows(600)
        assert store.insert_values(LOG_COLUMNS, rows[300:301]) == 1
        with pytest.raises(sa.exc.IntegrityError, match="duplicate key"):
            store.insert_values(LOG_COLUMNS, rows, retries=2, backoff=0.01)
        assert store.count() == 1
        assert store.insert_values(LOG_COLUMNS, rows[:300] + rows[301:]) == 599  # and the writer goes on
        assert store.count() == 600
    finally:
        store.dispose()


@pytest.mark.postgres
def test_session_options_in_a_postgresql_url_reach_the_writer_and_the_pool(postgres_url):
    # How docker/compose.yaml turns synchronous_commit off for the request log alone.
    url = sa.make_url(postgres_url).update_query_dict({"options": "-c synchronous_commit=off"})
    store = RequestStore(url.render_as_string(hide_password=False))
    try:
        assert store.insert_values(COLUMNS, [("a-0", *ROW)]) == 1
        writer = store._writers.get()
        assert writer.execute("SHOW synchronous_commit").fetchone()[0] == "off"
        with store.engine.connect() as conn:
            assert conn.exec_driver_sql("SHOW synchronous_commit").scalar_one() == "off"
    finally:
        store.dispose()
    plain = RequestStore(postgres_url)
    try:
        assert plain._writers.get().execute("SHOW synchronous_commit").fetchone()[0] == "on"
    finally:
        plain.dispose()


def test_deletes_and_feedback_leave_their_checkpoints_to_the_thread_not_to_their_commit(tmp_path):
    # SQLite's own checkpoint runs inside the commit that takes the WAL past 1,000 pages, while it
    # holds the writers' lock (decision 003): the archive job's deletes write thousands of pages.
    store = RequestStore(str(tmp_path / "requests.db"))
    checkpointer = store._checkpointer

    def checkpoints_after(write) -> int:
        settled = checkpointer.checkpoints
        while True:  # the thread's checkpoints of earlier writes are over: none for a few intervals
            time.sleep(4 * checkpointer.interval)
            if checkpointer.checkpoints == settled:
                break
            settled = checkpointer.checkpoints
        write()
        deadline = time.monotonic() + 10
        while checkpointer.checkpoints == settled and time.monotonic() < deadline:
            time.sleep(0.05)
        return checkpointer.checkpoints - settled

    try:
        store.insert_values(COLUMNS, [(f"r{i}", *ROW) for i in range(20_000)])
        with store.engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA wal_autocheckpoint").scalar() == 0
        assert checkpoints_after(lambda: store.delete_ids(range(1, 10_001))) > 0
        assert checkpoints_after(lambda: store.record_feedback({"r19999": 1})) > 0
        assert store.count() == 10_000
    finally:
        store.dispose()
