"""Scenarios: each kind of change is present in the months it should be and absent elsewhere, and
labels arrive as the label-delay model says."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from common.features import AmountScaler
from common.schema import FEATURES, LABEL, V_COLUMNS
from training import generate as gen
from training import scenarios as sc

ROWS = 40_000
DAY = sc.DAY


def legit(frame: pd.DataFrame) -> pd.DataFrame:
    return frame[frame[LABEL] == 0]


def test_stable_months_keep_the_reference_distribution_rate_and_kinds():
    scenario = sc.named("stable", rows=ROWS)
    reference = sc.month_frame(scenario, 0)
    for month in (1, 4):
        frame = sc.month_frame(scenario, month)
        pvalues = [stats.ks_2samp(reference[c], frame[c]).pvalue for c in (*V_COLUMNS, "Amount")]
        assert min(pvalues) > 0.01 / len(pvalues)  # Bonferroni: an alarm here would be a bug
        assert frame[LABEL].sum() == round(ROWS * gen.DEFAULT_FRAUD_RATE)
        assert sc.NEW_PATTERN_FRAUD not in set(frame["kind"])


def test_months_are_timestamped_inside_their_month_in_time_order():
    scenario = sc.named("stable", rows=5_000)
    for month in (0, 1, 3):
        ts = sc.month_frame(scenario, month)["ts"].to_numpy()
        assert (np.diff(ts) >= 0).all()
        assert scenario.month_start(month) <= ts.min() and ts.max() < scenario.month_end(month)
    assert scenario.month_end(1) - scenario.month_start(1) == sc.MONTH_DAYS * DAY


def test_the_same_scenario_gives_the_same_month_and_another_seed_does_not():
    a = sc.month_frame(sc.named("mixed", rows=3_000), 4)
    b = sc.month_frame(sc.named("mixed", rows=3_000), 4)
    c = sc.month_frame(sc.named("mixed", rows=3_000, seed=1), 4)
    pd.testing.assert_frame_equal(a, b)
    assert not a[list(V_COLUMNS)].equals(c[list(V_COLUMNS)])


def test_covariate_drift_moves_legitimate_rows_by_its_size_in_dollars_and_standard_deviations():
    scenario = sc.named("covariate", rows=ROWS, covariate_month=2, covariate_ramp=2, amount_shift=25.0,
                        v_shift=0.5, v_features=("V2", "V7"))
    base = legit(sc.month_frame(scenario, 1))
    sds = gen.LEGIT_MOMENTS[:, 1]
    for month, size in ((1, 0.0), (2, 0.5), (3, 1.0), (5, 1.0)):
        frame = legit(sc.month_frame(scenario, month))
        assert scenario.covariate_size(month) == size
        assert frame["Amount"].mean() - base["Amount"].mean() == pytest.approx(25.0 * size, abs=6.0)
        for column in ("V2", "V7"):
            shift = (frame[column].mean() - base[column].mean()) / sds[V_COLUMNS.index(column)]
            assert shift == pytest.approx(0.5 * size, abs=0.03)
        untouched = (frame["V3"].mean() - base["V3"].mean()) / sds[2]
        assert abs(untouched) < 0.03
    frauds = sc.month_frame(scenario, 3)
    assert frauds.loc[frauds[LABEL] == 1, "V2"].mean() == pytest.approx(gen.FRAUD_MOMENTS[1, 0], abs=1.5)


def test_a_population_wide_covariate_drift_moves_frauds_too():
    every = sc.named("stable", rows=ROWS, fraud_rate=5.0, covariate_month=1, covariate_scope="all", v_shift=2.0,
                     v_features=("V13",))
    still = sc.month_frame(every.with_options(v_shift=0.0), 1)
    fraud = still[LABEL] == 1
    sd = gen.LEGIT_MOMENTS[12, 1]
    for scope, fraud_shift in (("all", 2.0 * sd), ("legit", 0.0)):
        moved = sc.month_frame(every.with_options(covariate_scope=scope), 1)
        assert (moved.loc[fraud, "V13"] - still.loc[fraud, "V13"]).mean() == pytest.approx(fraud_shift)
        assert (moved.loc[~fraud, "V13"] - still.loc[~fraud, "V13"]).mean() == pytest.approx(2.0 * sd)


def test_prevalence_shift_changes_the_fraud_rate_from_its_month():
    scenario = sc.named("stable", rows=ROWS, prevalence_month=3, prevalence_rate=0.5)
    assert sc.month_frame(scenario, 2)[LABEL].mean() == pytest.approx(gen.DEFAULT_FRAUD_RATE, abs=1e-4)
    assert sc.month_frame(scenario, 3)[LABEL].mean() == pytest.approx(0.005, abs=1e-4)
    assert sc.month_frame(scenario, 6)[LABEL].mean() == pytest.approx(0.005, abs=1e-4)


def test_the_new_pattern_appears_in_its_month_grows_and_keeps_the_fraud_rate():
    scenario = sc.named("new-pattern", rows=ROWS, fraud_rate=2.0)
    assert scenario.pattern_month == 3
    shares = []
    for month in range(1, 7):
        frame = sc.month_frame(scenario, month)
        frauds = frame[frame[LABEL] == 1]
        assert len(frauds) == round(ROWS * 0.02)
        shares.append((frauds["kind"] == sc.NEW_PATTERN_FRAUD).mean())
        assert (frame.loc[frame["kind"] == sc.NEW_PATTERN_FRAUD, LABEL] == 1).all()
    assert shares[:2] == [0.0, 0.0]
    for month, share in zip(range(3, 7), shares[2:], strict=True):
        assert share == pytest.approx(scenario.pattern_fraction(month), abs=0.06)
    assert shares[2] < shares[3] < shares[5]
    # Legitimate traffic does not move: concept drift only.
    before, after = legit(sc.month_frame(scenario, 2)), legit(sc.month_frame(scenario, 5))
    pvalues = [stats.ks_2samp(before[c], after[c]).pvalue for c in V_COLUMNS]
    assert min(pvalues) > 0.01 / len(pvalues)


def test_the_new_pattern_lies_where_a_model_of_earlier_months_scores_low():
    from sklearn.ensemble import RandomForestClassifier

    scenario = sc.named("new-pattern", rows=60_000, fraud_rate=1.0, pattern_share=0.5, pattern_max=0.5)
    scaler = AmountScaler(86.2, 290.8)
    train = sc.inputs(scenario, 1, scaler)
    model = RandomForestClassifier(n_estimators=30, max_samples=0.5, random_state=0, n_jobs=1)
    model.fit(train[list(FEATURES)], train[LABEL])
    frame = sc.month_frame(scenario, 4)
    p = model.predict_proba(sc.model_inputs(frame, scaler)[list(FEATURES)])[:, 1]
    new = p[(frame["kind"] == sc.NEW_PATTERN_FRAUD).to_numpy()]
    old = p[(frame["kind"] == gen.FRAUD).to_numpy()]
    assert len(new) > 100 and len(old) > 50
    assert (new >= 0.5).mean() < 0.1 < 0.7 < (old >= 0.5).mean()


def test_shipped_scenarios_are_valid_and_mixed_composes_all_three_changes():
    assert {"stable", "covariate", "new-pattern", "mixed"} <= set(sc.SCENARIOS)
    for name in sc.SCENARIOS:
        assert sc.named(name).validate()
    mixed = sc.named("mixed")
    assert mixed.covariate_size(5) > 0 and mixed.pattern_fraction(3) > 0 and mixed.fraud_percent(4) > mixed.fraud_rate
    assert [mixed.covariate_size(1), mixed.pattern_fraction(2), mixed.fraud_percent(3)] == [0.0, 0.0, mixed.fraud_rate]


@pytest.mark.parametrize(("options", "message"), [
    ({"months": 0}, "months"),
    ({"fraud_rate": 120.0}, "fraud_rate"),
    ({"pattern_share": 1.5}, "pattern_share"),
    ({"v_features": ("V1", "Amount")}, "v_features"),
    ({"covariate_scope": "frauds"}, "covariate_scope"),
    ({"maturity_days": 60.0}, "maturity_days"),
    ({"distribution": "lognormal"}, "distribution"),
    ({"unreported": -0.1}, "unreported"),
])
def test_out_of_range_parameters_are_refused_by_name(options, message):
    with pytest.raises(sc.ScenarioError, match=message):
        sc.named("stable", **options)


def test_an_unknown_scenario_or_option_is_refused():
    with pytest.raises(sc.ScenarioError, match="expected one of"):
        sc.named("sunny")
    with pytest.raises(sc.ScenarioError, match="unknown scenario option"):
        sc.named("stable", wind=3)
    with pytest.raises(sc.ScenarioError, match="month must be within"):
        sc.month_frame(sc.named("stable", months=2), 3)


def test_fraud_labels_arrive_within_the_delay_and_legitimate_ones_at_maturity():
    scenario = sc.named("stable", rows=ROWS, fraud_rate=5.0)
    frame = sc.month_frame(scenario, 2)
    feed = sc.labels(scenario, frame, 2)
    waited = (feed["known_at"] - frame["ts"]) / DAY
    fraud = frame[LABEL].to_numpy() == 1
    reported = feed["label"].to_numpy() == 1
    assert not (reported & ~fraud).any()  # the feed never calls a legitimate row fraud
    assert waited[reported].between(30, 90).all()
    assert waited[reported].mean() == pytest.approx(60, abs=2)
    assert (waited[~reported] == 90).all()  # legitimate, or never reported: known once mature
    assert 1 - reported[fraud].mean() == pytest.approx(0.10, abs=0.03)


def test_the_delay_distribution_and_unreported_share_are_configurable():
    scenario = sc.named("stable", rows=ROWS, fraud_rate=5.0, distribution="triangular", delay_min_days=10,
                        delay_mode_days=15, delay_max_days=60, unreported=0.0, maturity_days=120)
    frame = sc.month_frame(scenario, 1)
    feed = sc.labels(scenario, frame, 1)
    waited = ((feed["known_at"] - frame["ts"]) / DAY).to_numpy()
    fraud = frame[LABEL].to_numpy() == 1
    assert (feed["label"].to_numpy() == fraud).all()
    assert waited[fraud].min() >= 10 and waited[fraud].max() <= 60
    assert np.median(waited[fraud]) == pytest.approx(stats.triang(c=5 / 50, loc=10, scale=50).median(), abs=2)
    assert (waited[~fraud] == 120).all()


def test_cli_sets_every_parameter_and_writes_one_csv_per_month(tmp_path, capsys):
    code = sc.main(["--scenario", "new-pattern", "--months", "2", "--rows", "2000", "--pattern-month", "2",
                    "--pattern_share", "0.9", "--amount-shift", "5", "--covariate-month", "1", "--v-features", "V3,V4",
                    "--unreported", "0", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "new fraud pattern from month 2: 90% of frauds" in out and "V3, V4" in out
    months = sorted(p.name for p in tmp_path.glob("month_*.csv"))
    assert months == ["month_00.csv", "month_01.csv", "month_02.csv"]
    frame = pd.read_csv(tmp_path / "month_02.csv")
    assert {"ts", "Amount", LABEL, "kind", "known_at", "label"} <= set(frame.columns)
    assert (frame["kind"] == sc.NEW_PATTERN_FRAUD).sum() > 0


def test_cli_reports_a_bad_parameter_with_exit_code_2(capsys):
    assert sc.main(["--scenario", "stable", "--maturity-days", "10"]) == 2
    assert "maturity_days" in capsys.readouterr().err
