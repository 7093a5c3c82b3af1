"""Load against real gunicorn (2 workers, SQLite request log): plain, with a worker killed, and
with a promotion in the middle. Heavier versions run in `make reliability`."""

from __future__ import annotations

import pytest

from benchmarks.reliability import hot_swap, load_scenario

pytestmark = pytest.mark.slow


def test_concurrent_clients_get_only_200s_and_the_log_holds_exactly_the_scored_rows(world, tmp_path):
    result = load_scenario(world, tmp_path, clients=4, seconds=4)
    assert result.ok, result.explain()
    assert result.requests > 0 and result.errors == 0 and result.rows_lost == 0


def test_a_worker_killed_mid_load_is_replaced_and_only_requests_in_flight_fail(world, tmp_path):
    result = load_scenario(world, tmp_path, clients=4, seconds=6, kills=1)
    assert result.ok, result.explain()
    assert result.faults == 1 and result.rows_lost == 0


def test_a_promotion_under_load_moves_answers_to_the_new_version_without_a_failed_request(world, tmp_path):
    result = hot_swap(world, tmp_path, clients=4, seconds=6)
    assert result.ok, result.explain()
    assert result.errors == 0 and result.rows_lost == 0
