"""The generator writes files shaped like the public credit-card dataset, and drifts on demand."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from common.features import AmountScaler
from common.schema import CSV_COLUMNS, FEATURES, V_COLUMNS
from training import generate as gen


@pytest.fixture(scope="module")
def rich_frame() -> pd.DataFrame:
    # Many frauds so that class-conditional statistics are measurable.
    return gen.generate_frame(rows=120_000, fraud_rate=0.05, seed=11)


def test_csv_has_the_public_header_and_time_range(tmp_path):
    out = tmp_path / "cc.csv"
    result = gen.generate(rows=5_000, seed=3, out=out)
    assert out.read_text().splitlines()[0] == ",".join(CSV_COLUMNS)
    frame = pd.read_csv(out)
    assert list(frame.columns) == list(CSV_COLUMNS)
    assert len(frame) == result.rows == 5_000
    assert frame["Time"].min() == 0
    assert frame["Time"].max() <= gen.TWO_DAYS
    assert frame["Time"].is_monotonic_increasing
    assert set(frame["Class"].unique()) <= {0, 1}


def test_default_fraud_rate_matches_the_public_file():
    frame = gen.generate_frame(rows=gen.FULL_ROWS, seed=0)
    assert frame["Class"].mean() == pytest.approx(0.00172, rel=0.02)


@pytest.mark.parametrize("rate", [0.0, 0.01, 0.3])
def test_fraud_rate_is_configurable(rate):
    frame = gen.generate_frame(rows=10_000, fraud_rate=rate, seed=1)
    assert frame["Class"].mean() == pytest.approx(rate, abs=1e-4)


def test_same_seed_gives_the_same_file_and_another_seed_does_not(tmp_path):
    a, b, c = tmp_path / "a.csv", tmp_path / "b.csv", tmp_path / "c.csv"
    gen.generate(rows=3_000, seed=5, out=a)
    gen.generate(rows=3_000, seed=5, out=b)
    gen.generate(rows=3_000, seed=6, out=c)
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()


def test_legitimate_v_columns_are_centred_with_the_public_spread(rich_frame):
    legit = rich_frame[rich_frame["Class"] == 0]
    means, stds = legit[list(V_COLUMNS)].mean().to_numpy(), legit[list(V_COLUMNS)].std().to_numpy()
    assert np.all(np.abs(means - gen.LEGIT_MOMENTS[:, 0]) < 0.05)
    assert np.allclose(stds, gen.LEGIT_MOMENTS[:, 1], rtol=0.08)
    # Spread decreases from the first components to the last, as PCA components do.
    assert stds[:5].mean() > stds[10:15].mean() > stds[-5:].mean()


def test_fraud_v_columns_follow_the_class_conditional_figures(rich_frame):
    fraud = rich_frame[rich_frame["Class"] == 1][list(V_COLUMNS)]
    expected_mean, expected_std = gen.FRAUD_MOMENTS[:, 0], gen.FRAUD_MOMENTS[:, 1]
    # Within a fifth of a standard deviation in mean, and 20% in spread.
    assert np.all(np.abs(fraud.mean().to_numpy() - expected_mean) < 0.2 * expected_std)
    assert np.allclose(fraud.std().to_numpy(), expected_std, rtol=0.2)
    # Long skewed tails, not a plain Gaussian: V14 and V17 reach -19 and beyond.
    assert fraud["V14"].min() < -19 and fraud["V17"].min() < -19
    assert stats.skew(fraud["V14"]) < -0.5


def test_classes_are_separable_but_not_trivially(rich_frame):
    from sklearn.metrics import average_precision_score

    y = rich_frame["Class"].to_numpy()
    # One strong feature alone ranks frauds well above their base rate...
    single = average_precision_score(y, -rich_frame["V14"].to_numpy())
    assert single > 0.5
    # ...but some frauds overlap with legitimate traffic, as on real data.
    fraud_v14 = rich_frame.loc[rich_frame["Class"] == 1, "V14"]
    assert (fraud_v14 > -2).mean() > 0.02
    assert single < 0.99


def test_amounts_are_heavy_tailed_like_the_public_file(rich_frame):
    legit = rich_frame.loc[rich_frame["Class"] == 0, "Amount"]
    fraud = rich_frame.loc[rich_frame["Class"] == 1, "Amount"]
    assert legit.median() == pytest.approx(22, rel=0.15)
    assert legit.quantile(0.90) == pytest.approx(200, rel=0.15)
    assert legit.quantile(0.99) == pytest.approx(1000, rel=0.2)
    assert fraud.median() == pytest.approx(9, rel=0.25)
    assert fraud.quantile(0.90) == pytest.approx(350, rel=0.2)
    assert (rich_frame["Amount"] >= 0).all()
    assert np.allclose(rich_frame["Amount"], rich_frame["Amount"].round(2))


def test_generate_rejects_impossible_arguments():
    with pytest.raises(ValueError, match="rows"):
        gen.generate_frame(rows=0)
    with pytest.raises(ValueError, match="fraud_rate"):
        gen.generate_frame(rows=10, fraud_rate=1.5)


def test_cli_reports_bad_arguments_with_exit_code_2(tmp_path, capsys):
    assert gen.main(["--rows", "0", "--out", str(tmp_path / "x.csv")]) == 2
    assert "rows must be at least 1" in capsys.readouterr().err
    assert not (tmp_path / "x.csv").exists()


SCALER = AmountScaler(mean=88.35, std=250.12)


def test_month_zero_is_the_reference_distribution():
    reference = gen.drift_batch(20_000, month=0, seed=1, amount_scaler=SCALER)
    control = gen.drift_batch(20_000, month=0, seed=2, amount_scaler=SCALER)
    assert list(reference.columns) == [*FEATURES, "Class"]
    pvalues = [stats.ks_2samp(reference[f], control[f]).pvalue for f in FEATURES]
    # 29 independent tests at the Bonferroni level: an alarm here would be a bug, not chance.
    assert min(pvalues) > 0.01 / len(FEATURES)


@pytest.mark.parametrize("month", [1, 3])
def test_month_m_shifts_amount_and_adds_noise(month):
    base = gen.drift_batch(20_000, month=0, seed=4, amount_scaler=SCALER)
    drifted = gen.drift_batch(20_000, month=month, seed=4, amount_scaler=SCALER)
    # Same seed, same underlying transactions: the difference is exactly the drift.
    assert np.allclose(drifted["Amount_scaled"] - base["Amount_scaled"], 0.1 * month)
    noise = (drifted[list(V_COLUMNS)] - base[list(V_COLUMNS)]).to_numpy()
    assert noise.mean() == pytest.approx(0.0, abs=0.01 * month * 0.05)
    assert noise.std() == pytest.approx(0.01 * month, rel=0.05)
