"""The sizing benchmark measures what a logged row really takes, in both stores."""

from __future__ import annotations

from benchmarks.storage import measure, table
from common.schema import FEATURES


def test_a_row_takes_at_least_its_values_and_the_indexes_take_space_in_both_stores(postgres_url):
    sizes = measure(3000, postgres_url)
    assert [s.store for s in sizes] == ["SQLite", "PostgreSQL"]
    floats = 8 * (len(FEATURES) + 4)  # features, ts, Amount, score, threshold
    for size in sizes:
        assert size.rows == 3000
        assert size.table_bytes / size.rows > floats
        assert 0 < size.index_bytes < size.table_bytes
    printed = table(sizes)
    sqlite_per_day = 200 * 86_400 * sizes[0].per_row() / 1e9
    assert f"{sqlite_per_day:.1f}" in printed.splitlines()[7]
