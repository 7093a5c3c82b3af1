"""The retry policy of store operations, on real SQLite failures: what is retried, how often, how
long apart, and what the caller gets in the end."""

from __future__ import annotations

import itertools
import sqlite3
import time

import pytest
import sqlalchemy as sa
import tenacity

from common.retries import StoreUnavailable, call_with_retries


@pytest.fixture
def database(tmp_path):
    """A SQLite file with one table, an engine on it that gives up on a locked file at once, and a
    second connection that can hold the file's write lock."""
    path = tmp_path / "retries.db"
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("CREATE TABLE t (k TEXT PRIMARY KEY)")
    engine = sa.create_engine(f"sqlite:///{path}", connect_args={"timeout": 0})
    yield engine, holder
    holder.close()
    engine.dispose()


def _insert(engine: sa.Engine, key: str) -> None:
    with engine.begin() as conn:
        conn.exec_driver_sql("INSERT INTO t VALUES (?)", (key,))


def test_a_locked_database_is_tried_again_with_doubling_waits_then_is_unavailable(database):
    engine, holder = database
    holder.execute("BEGIN IMMEDIATE")  # another writer holds the file throughout
    starts: list[float] = []

    def attempt(number: int) -> None:
        starts.append(time.monotonic())
        _insert(engine, f"k{number}")

    with pytest.raises(StoreUnavailable, match=r"^request store x unavailable: database is locked$"):
        call_with_retries(attempt, retries=3, wait=tenacity.wait_exponential(multiplier=0.02),
                          failure="request store x unavailable")
    assert len(starts) == 4
    gaps = [later - earlier for earlier, later in itertools.pairwise(starts)]
    assert [gap >= wait for gap, wait in zip(gaps, (0.02, 0.04, 0.08), strict=True)] == [True] * 3, gaps


def test_an_attempt_after_a_failure_knows_its_number_and_its_result_is_returned(database):
    engine, holder = database
    holder.execute("BEGIN IMMEDIATE")
    numbers: list[int] = []

    def attempt(number: int) -> str:
        numbers.append(number)
        if number == 2:
            holder.execute("COMMIT")  # the other writer is done before this attempt
        _insert(engine, "k")
        return "written"

    assert call_with_retries(attempt, retries=3, wait=tenacity.wait_fixed(0.01), failure="x") == "written"
    assert numbers == [1, 2]


def test_a_constraint_violation_is_not_retried_and_passes_through(database):
    engine, _holder = database
    _insert(engine, "k")
    numbers: list[int] = []

    def attempt(number: int) -> None:
        numbers.append(number)
        _insert(engine, "k")

    with pytest.raises(sa.exc.IntegrityError):
        call_with_retries(attempt, retries=3, wait=tenacity.wait_fixed(0.01), failure="x")
    assert numbers == [1]


def test_a_database_error_no_retry_cures_is_unavailable_at_once(tmp_path):
    path = tmp_path / "garbage.db"
    path.write_bytes(b"not a database, but long enough to have a header " * 100)
    engine = sa.create_engine(f"sqlite:///{path}")
    numbers: list[int] = []

    def attempt(number: int) -> None:
        numbers.append(number)
        with engine.connect() as conn:
            conn.exec_driver_sql("SELECT * FROM sqlite_master").fetchall()

    with pytest.raises(StoreUnavailable, match=r"^store y unavailable: file is not a database$"):
        call_with_retries(attempt, retries=3, wait=tenacity.wait_fixed(0.01), failure="store y unavailable")
    assert numbers == [1]
    engine.dispose()


def test_an_error_that_is_not_the_stores_passes_through_at_once():
    numbers: list[int] = []

    def attempt(number: int) -> None:
        numbers.append(number)
        raise ValueError("row 3 has 2 values for 3 columns")

    with pytest.raises(ValueError, match="row 3"):
        call_with_retries(attempt, retries=3, wait=tenacity.wait_fixed(0.01), failure="x")
    assert numbers == [1]


def test_a_file_the_writer_cannot_open_is_retried_like_a_busy_database(tmp_path):
    numbers: list[int] = []

    def attempt(number: int) -> None:
        numbers.append(number)
        (tmp_path / "gone" / "requests.db-lock").open("r")

    with pytest.raises(StoreUnavailable, match=r"^x: \[Errno 2\] No such file or directory"):
        call_with_retries(attempt, retries=2, wait=tenacity.wait_fixed(0.01), failure="x")
    assert numbers == [1, 2, 3]


def test_without_retries_one_failed_attempt_is_unavailable(database):
    engine, holder = database
    holder.execute("BEGIN IMMEDIATE")
    numbers: list[int] = []

    def attempt(number: int) -> None:
        numbers.append(number)
        _insert(engine, "k")

    with pytest.raises(StoreUnavailable, match="database is locked"):
        call_with_retries(attempt, retries=0, wait=tenacity.wait_fixed(1), failure="x")
    assert numbers == [1]
