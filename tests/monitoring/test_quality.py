"""Statistical quality of the drift check on deterministic simulations (monitoring.quality)."""

from __future__ import annotations

import pytest
from scipy import stats

from monitoring.quality import simulate

WINDOWS = 200
P_VAL = 0.01


@pytest.fixture(scope="module")
def quality():
    return simulate(windows=WINDOWS, rows=10_000, reference_rows=10_000, months=(0, 1), p_val=P_VAL, seed=0)


@pytest.mark.slow
def test_bonferroni_false_alarm_rate_stays_at_the_configured_level(quality):
    # With no drift each window alarms with probability at most p_val (Bonferroni bounds the
    # family-wise rate); more alarms than the binomial's 99.9% quantile would disprove that.
    limit = stats.binom.ppf(0.999, WINDOWS, P_VAL)
    assert quality.alarms["bonferroni"][0] <= limit
    assert quality.alarms["fdr"][0] <= limit


@pytest.mark.slow
def test_month_one_drift_is_caught_in_at_least_95_percent_of_windows(quality):
    assert quality.rate("bonferroni", 1) >= 0.95
    assert quality.rate("fdr", 1) >= 0.95


@pytest.mark.slow
def test_original_uncorrected_rule_alarms_far_more_often_without_drift(quality):
    # "any of 29 p-values < 0.01" alarms in about 1 - 0.99**29 = 25% of drift-free windows.
    assert quality.rate("original", 0) >= 0.10
    assert quality.alarms["original"][0] > 5 * max(quality.alarms["bonferroni"][0], 1)
