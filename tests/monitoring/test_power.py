"""The drift check's power table holds its shape: no false alarms without a change, tiny changes
ignored by the effect-size floor, changes that hurt recall flagged, and a new fraud pattern that the
input checks hardly see (monitoring.power, at a small size)."""

from __future__ import annotations

import pytest

from monitoring import power

CHANGES = (
    power.Change("none", 0, ""),
    power.Change("Amount", 1, "$", power._population(amount_shift=1)),
    power.Change("V14", 0.05, "sd", power._population(v_shift=0.05, v_features=("V14",))),
    power.Change("V14", 0.2, "sd", power._population(v_shift=0.2, v_features=("V14",))),
    power.Change("strongest", 2, "sd", power._population(v_shift=2, v_features=power.STRONGEST)),
    power.Change("new pattern", 0.8, "of frauds", {"pattern_month": 1, "pattern_share": 0.8, "pattern_max": 0.8}),
)
WINDOWS = 8


@pytest.fixture(scope="module")
def table() -> dict[str, power.Row]:
    result = power.measure(windows=WINDOWS, rows=10_000, reference_rows=50_000, train_rows=60_000, trees=20,
                           changes=CHANGES)
    assert result.config.min_distance > 0, "the shipped drift config has no effect-size floor"
    return {row.change.label: row for row in result.rows} | {"result": result}


@pytest.mark.slow
def test_no_change_raises_no_alarm(table):
    none = table["none"]
    assert none.flagged_floor <= 1 and none.flagged_p <= 1
    assert none.delta("recall") == 0


@pytest.mark.slow
def test_the_floor_ignores_changes_the_p_value_alone_would_flag_and_that_do_not_hurt(table):
    result = table["result"]
    for label in ("Amount 1 $", "V14 0.2 sd"):
        row = table[label]
        assert row.flagged_p >= WINDOWS - 1, label  # significant at these window sizes...
        assert row.flagged_floor == 0, label  # ...but too small to matter
        assert not result.hurts(row), label
    assert table["V14 0.05 sd"].flagged_floor == 0


@pytest.mark.slow
def test_a_change_that_hurts_recall_is_flagged_in_every_window(table):
    row = table["strongest 2 sd"]
    assert table["result"].hurts(row)
    assert row.flagged_floor == WINDOWS


@pytest.mark.slow
def test_a_new_fraud_pattern_hurts_recall_but_the_input_checks_hardly_see_it(table):
    row = table["new pattern 0.8 of frauds"]
    assert row.delta("recall") < -0.3
    assert row.flagged_floor <= 2


@pytest.mark.slow
def test_detection_grows_with_the_size_of_the_shift(table):
    sizes = [table[label].flagged_p for label in ("none", "V14 0.05 sd", "V14 0.2 sd")]
    assert sizes == sorted(sizes)


@pytest.fixture(scope="module")
def alarms() -> dict[str, power.AlarmRow]:
    traffic = (power.Change("stable", 0, ""),
               power.Change("new pattern", 0.8, "of frauds",
                            {"pattern_month": 1, "pattern_share": 0.8, "pattern_max": 0.8}))
    result = power.performance_alarms(windows=3, rows=25_000, train_rows=60_000, trees=20, traffic=traffic)
    return {row.traffic.label: row for row in result.rows}


@pytest.mark.slow
def test_the_performance_check_raises_no_alarm_on_stable_traffic(alarms):
    stable = alarms["stable"]
    assert stable.windows == 3 and stable.inconclusive == 0  # enough matured frauds to judge
    assert stable.degraded == 0


@pytest.mark.slow
def test_the_performance_check_sees_the_new_fraud_pattern_the_input_checks_miss(alarms):
    assert alarms["new pattern 0.8 of frauds"].degraded == 3
