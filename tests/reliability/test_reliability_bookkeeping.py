"""The scenarios' own bookkeeping: a lost or unexplained row must be caught, and the table must say
when a scenario failed, or the scenarios prove nothing."""

from __future__ import annotations

import pytest

from tests.helpers.load import Outcome, reconcile
from tests.helpers.scenario import FAILED, OK, ScenarioRecord, table


def answered(request_id: str, rows: int, status: int = 200) -> Outcome:
    ids = tuple(f"{request_id}-{i}" for i in range(rows)) if status == 200 else ()
    return Outcome(0, 0.0, 1.0, status, None if status == 200 else "request_log_unavailable", ids, "1", request_id)


def unanswered() -> Outcome:
    return Outcome(0, 0.0, 1.0, None, "RemoteDisconnected")


def test_a_row_reported_as_scored_but_missing_from_the_log_is_a_lost_row():
    ledger = reconcile([answered("a", 2), answered("b", 1)], {"a-0", "a-1"})
    assert ledger.lost == {"b-0"}
    for exact in (True, False):
        with pytest.raises(AssertionError, match="missing from the request log"):
            ledger.check(exact=exact)


def test_an_exact_log_may_hold_no_row_nobody_was_told_about():
    ledger = reconcile([answered("a", 1)], {"a-0", "z-0"})
    assert not ledger.lost
    with pytest.raises(AssertionError, match="never reported as scored"):
        ledger.check(exact=True)
    reconcile([answered("a", 1)], {"a-0"}).check(exact=True)


def test_extra_rows_must_belong_to_failed_requests_and_no_more_than_failed_without_an_answer():
    outcomes = [answered("a", 1), answered("b", 1, status=503), unanswered()]
    # b's commit went through although its answer was a 503; one unanswered request may have left c.
    reconcile(outcomes, {"a-0", "b-0", "c-0"}).check(exact=False)
    with pytest.raises(AssertionError, match="no answer accounts for"):
        reconcile(outcomes, {"a-0", "c-0", "d-0"}).check(exact=False)


def test_the_table_has_one_row_per_scenario_and_a_total_that_fails_when_any_does():
    good = ScenarioRecord("load", load="4 × 4", requests=100, rows_lost=0)
    bad = ScenarioRecord("crash", requests=50, errors=2, faults=1, rows_lost=1, result=FAILED)
    skipped = ScenarioRecord("postgres", requests=7, result="skipped: no binaries")
    lines = table([good, bad, skipped]).splitlines()
    assert len(lines) == 2 + 3 + 2
    assert lines[0].split()[:2] == ["scenario", "load"]
    assert lines[3].endswith(FAILED) and lines[4].endswith("skipped: no binaries")
    total = lines[-1].split()
    assert total[0] == "total" and total[1] == "150" and total[-1] == FAILED
    assert table([good, skipped]).splitlines()[-1].split()[-1] == OK
    assert table([good, ScenarioRecord("lost", rows_lost=1)]).splitlines()[-1].split()[-1] == FAILED
    assert table([good, ScenarioRecord("twice", duplicates=1)]).splitlines()[-1].split()[-1] == FAILED


def test_the_table_counts_rows_logged_twice_and_repairs_where_a_scenario_counted_them():
    acked = ScenarioRecord("lost ack", requests=10, rows_lost=0, duplicates=0)
    killed = ScenarioRecord("killed gate", faults=3, repairs=5)
    lines = table([acked, killed]).splitlines()
    header, first, second, total = lines[0], lines[2].split(), lines[3].split(), lines[-1].split()
    assert header.index("rows twice") < header.index("repairs") < header.index("result")
    assert first[-4:] == ["0", "0", "-", OK]  # rows lost, rows twice, repairs, result
    assert second[-4:] == ["-", "-", "5", OK]
    assert total[-4:] == ["0", "0", "5", OK]
