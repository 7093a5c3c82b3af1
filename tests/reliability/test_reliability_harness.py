"""The harness's own bookkeeping: a lost or unexplained row must be caught, or the scenarios prove nothing."""

from __future__ import annotations

from benchmarks.reliability import Outcome, Result, account, table


def answered(request_id: str, rows: int, status: int = 200) -> Outcome:
    ids = tuple(f"{request_id}-{i}" for i in range(rows)) if status == 200 else ()
    return Outcome(0, 0.0, 1.0, status, None if status == 200 else "request_log_unavailable", ids, "1", request_id)


def unanswered() -> Outcome:
    return Outcome(0, 0.0, 1.0, None, "RemoteDisconnected")


def test_a_row_reported_as_scored_but_missing_from_the_log_is_a_lost_row():
    result = Result("x")
    account(result, [answered("a", 2), answered("b", 1)], {"a-0", "a-1"}, exact=True)
    assert result.rows_lost == 1 and not result.ok
    assert "missing from the request log" in result.problems[0]


def test_an_exact_log_may_hold_no_row_nobody_was_told_about():
    result = Result("x")
    account(result, [answered("a", 1)], {"a-0", "z-0"}, exact=True)
    assert result.rows_lost == 0 and not result.ok


def test_extra_rows_must_belong_to_failed_requests_and_no_more_than_failed_without_an_answer():
    outcomes = [answered("a", 1), answered("b", 1, status=503), unanswered()]
    explained = Result("x")
    # b's commit went through although its answer was a 503; one unanswered request may have left c.
    account(explained, outcomes, {"a-0", "b-0", "c-0"}, exact=False)
    assert explained.ok, explained.problems
    too_many = Result("x")
    account(too_many, outcomes, {"a-0", "c-0", "d-0"}, exact=False)
    assert not too_many.ok and "no answer accounts for" in too_many.problems[0]


def test_the_table_has_one_row_per_scenario_and_a_total_that_fails_when_any_does():
    good = Result("load", load="4 × 4", requests=100, rows_lost=0)
    bad = Result("crash", requests=50, errors=2, faults=1, rows_lost=1, problems=["lost"])
    skipped = Result("postgres", skipped="no binaries")
    lines = table([good, bad, skipped]).splitlines()
    assert len(lines) == 2 + 3 + 2
    assert lines[0].split()[:2] == ["scenario", "load"]
    assert "FAILED (1)" in lines[3] and "skipped: no binaries" in lines[4]
    total = lines[-1].split()
    assert total[0] == "total" and total[1] == "150" and total[-1] == "FAILED"
