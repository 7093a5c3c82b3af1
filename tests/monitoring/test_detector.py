"""The KS detector: agreement with scipy, corrections, decisions and validation."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from monitoring.detector import (
    DRIFT,
    INCONCLUSIVE,
    NO_DRIFT,
    KSDrift,
    KSScores,
    corrected_threshold,
    decide,
    ks_pvalues,
)

# (n1, n2, shift, method): equal sizes (closed form), unequal (lattice walk), asymptotic, tiny and large.
CASES = [
    (10_000, 10_000, 0.0, "auto"),
    (10_000, 10_000, 0.04, "auto"),
    (10_000, 10_000, 0.3, "auto"),
    (500, 500, 0.1, "exact"),
    (300, 700, 0.1, "exact"),
    (1_000, 800, 0.0, "exact"),
    (40, 60, 0.6, "exact"),
    (20_000, 5_000, 0.03, "auto"),
    (3_000, 2_000, 0.05, "asymp"),
]


@pytest.mark.parametrize(("n1", "n2", "shift", "method"), CASES)
def test_statistics_and_pvalues_agree_with_scipy_ks_2samp(n1, n2, shift, method):
    rng = np.random.default_rng(n1 + n2)
    reference = rng.normal(size=(n1, 3))
    current = rng.normal(size=(n2, 3)) + shift
    # Ties within and across samples: rounded values.
    reference[:, 2] = np.round(reference[:, 2], 1)
    current[:, 2] = np.round(current[:, 2], 1)
    scores = KSDrift(reference, method=method).score(current)
    for k in range(3):
        expected = stats.ks_2samp(reference[:, k], current[:, k], method=method)
        assert scores.statistics[k] == pytest.approx(expected.statistic, abs=1e-12)
        assert scores.pvalues[k] == pytest.approx(expected.pvalue, rel=1e-8, abs=1e-13)


def test_auto_method_follows_scipy_rule_except_large_unequal_lattices():
    assert ks_pvalues([0], 10_000, 10_000, "auto")[1] == "exact"
    assert ks_pvalues([0], 10_001, 10_000, "auto")[1] == "asymp"
    assert ks_pvalues([0], 500, 300, "auto")[1] == "exact"
    # 9,000 x 8,000 cells would take seconds per feature; documented deviation.
    assert ks_pvalues([0], 9_000, 8_000, "auto")[1] == "asymp"


def test_identical_distributions_do_not_drift_and_shifted_ones_do():
    rng = np.random.default_rng(0)
    reference = rng.normal(size=(5_000, 4))
    detector = KSDrift(reference, features=["a", "b", "c", "d"], p_val=0.01)
    same = detector.predict(rng.normal(size=(5_000, 4)))
    assert same.status == NO_DRIFT and same.drift_detected is False and same.drifted == ()
    shifted_rows = rng.normal(size=(5_000, 4))
    shifted_rows[:, 1] += 0.2
    shifted = detector.predict(shifted_rows)
    assert shifted.status == DRIFT and shifted.drift_detected is True
    assert shifted.drifted == ("b",)
    assert shifted.tag == "true" and same.tag == "false"


def test_bonferroni_threshold_is_p_val_over_number_of_tests():
    pvalues = np.array([0.5, 0.001, 0.2, 0.0001])
    assert corrected_threshold(pvalues, 0.01, "bonferroni") == pytest.approx(0.0025)
    assert corrected_threshold(pvalues, 0.01, "none") == 0.01


def test_benjamini_hochberg_threshold_is_the_largest_step_up_cut():
    # Sorted: 0.001 <= 1/5*0.05, 0.008 <= 2/5*0.05, 0.035 > 3/5*0.05 but 0.039 <= 4/5*0.05, so the
    # step-up cut is 0.04 and keeps the first four (0.035 included), 0.9 stays out.
    pvalues = np.array([0.9, 0.039, 0.001, 0.035, 0.008])
    threshold = corrected_threshold(pvalues, 0.05, "fdr")
    assert threshold == pytest.approx(0.04)
    assert corrected_threshold(np.array([0.5, 0.6]), 0.05, "benjamini-hochberg") == pytest.approx(0.025)


def test_fdr_flags_more_tests_than_bonferroni_when_several_are_moderately_significant():
    scores = KSScores(tuple("abcd"), (0.1,) * 4, (0.002, 0.02, 0.03, 0.5), (100,) * 4, (100,) * 4, ("exact",) * 4,
                      (0.3,) * 4)
    bonferroni = decide(scores, p_val=0.05, correction="bonferroni")
    fdr = decide(scores, p_val=0.05, correction="fdr")
    assert bonferroni.drifted == ("a",)
    assert fdr.drifted == ("a", "b", "c")


def test_window_below_min_rows_is_inconclusive_with_reason_and_still_scored():
    rng = np.random.default_rng(1)
    detector = KSDrift(rng.normal(size=(2_000, 2)), min_window_rows=500)
    report = detector.predict(rng.normal(size=(100, 2)) + 5.0)
    assert report.status == INCONCLUSIVE and report.drift_detected is None and report.tag == "inconclusive"
    assert "100 rows" in report.reason and "min_window_rows=500" in report.reason
    assert all(np.isfinite(report.scores.pvalues))


def test_empty_window_is_inconclusive():
    detector = KSDrift(np.random.default_rng(2).normal(size=(100, 2)))
    report = detector.predict(np.empty((0, 2)))
    assert report.status == INCONCLUSIVE
    assert report.to_dict()["feature_pvalues"] == {"f0": None, "f1": None}


def test_min_ks_statistic_ignores_negligible_shift_in_a_huge_window():
    rng = np.random.default_rng(3)
    reference = rng.normal(size=(200_000, 1))
    current = rng.normal(size=(200_000, 1)) + 0.03  # significant at this size, but a KS statistic ~0.012
    plain = KSDrift(reference, dtype=np.float32).predict(current)
    damped = KSDrift(reference, min_ks_statistic=0.05, dtype=np.float32).predict(current)
    assert plain.status == DRIFT
    assert damped.status == NO_DRIFT and "min_ks_statistic" in damped.reason


def test_min_distance_ignores_a_shift_too_small_to_matter_and_keeps_a_large_one():
    rng = np.random.default_rng(13)
    reference = rng.normal(10.0, 2.0, size=(50_000, 2))
    # 0.05 sd on the first column is significant in 10,000 rows; 0.5 sd on the second is large.
    current = rng.normal(10.0, 2.0, size=(10_000, 2)) + np.array([0.1, 1.0])
    plain = KSDrift(reference, features=["small", "large"]).predict(current)
    floored = KSDrift(reference, features=["small", "large"], min_distance=0.1).predict(current)
    assert set(plain.drifted) == {"small", "large"}
    assert floored.drifted == ("large",) and floored.significant == ("small", "large")
    distances = floored.feature_distances
    assert distances["small"] == pytest.approx(0.05, abs=0.02) and distances["large"] == pytest.approx(0.5, abs=0.03)
    quiet = KSDrift(reference, features=["small", "large"], min_distance=0.1).predict(current - [0.0, 1.0])
    assert quiet.status == NO_DRIFT and "effect-size floor" in quiet.reason and "small" in quiet.reason


def test_distance_is_in_reference_standard_deviations_and_matches_scipy():
    rng = np.random.default_rng(14)
    reference, current = rng.lognormal(3, 1, 20_000), rng.lognormal(3.1, 1, 8_000)
    scores = KSDrift(reference[:, None], features=["amount"]).score(current[:, None])
    exact = stats.wasserstein_distance(reference, current) / reference.std()
    assert scores.distances[0] == pytest.approx(exact, rel=0.05)


def test_a_read_only_frame_from_pandas_is_scored_and_left_unsorted():
    # pandas 3 hands out read-only arrays from to_numpy(); the detector must not sort them in place.
    rng = np.random.default_rng(15)
    reference = pd.DataFrame(rng.normal(size=(2_000, 3)), columns=["a", "b", "c"])
    window = pd.DataFrame(rng.normal(size=(1_000, 3)) + 0.5, columns=["a", "b", "c"])
    rows = window.to_numpy()
    rows.flags.writeable = False
    before = rows.copy()
    detector = KSDrift(reference.to_numpy(), features=["a", "b", "c"])
    report = detector.predict(rows)
    assert report.status == DRIFT
    assert np.array_equal(rows, before)
    writable = np.asfortranarray(before)  # a column-major array whose transpose needs no copy
    detector.predict(writable)
    assert np.array_equal(writable, before)


def test_report_is_immutable_and_keeps_the_original_json_keys():
    rng = np.random.default_rng(4)
    report = KSDrift(rng.normal(size=(300, 2)), features=["x", "y"]).predict(rng.normal(size=(300, 2)))
    with pytest.raises(dataclasses.FrozenInstanceError):
        report.status = DRIFT
    body = report.to_dict()
    assert list(body)[:2] == ["drift_detected", "feature_pvalues"]
    assert set(body["feature_pvalues"]) == {"x", "y"}
    assert isinstance(report.threshold, float)


def test_score_does_not_change_the_detector():
    rng = np.random.default_rng(5)
    detector = KSDrift(rng.normal(size=(1_000, 2)))
    window = rng.normal(size=(1_000, 2)) + 0.5
    first = detector.score(window)
    detector.score(rng.normal(size=(1_000, 2)))
    assert detector.score(window) == first


def test_families_combine_and_are_corrected_together():
    rng = np.random.default_rng(6)
    features = KSDrift(rng.normal(size=(1_000, 2)), features=["a", "b"]).score(rng.normal(size=(1_000, 2)))
    score = KSDrift(rng.normal(size=1_000), features=["score"]).score(rng.normal(size=1_000) + 1.0)
    report = decide(features + score, p_val=0.01, correction="bonferroni")
    assert report.scores.features == ("a", "b", "score")
    assert report.threshold == pytest.approx(0.01 / 3)
    assert report.drifted == ("score",)
    with pytest.raises(ValueError, match="both families"):
        _ = features + features


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"p_val": 0.0}, "p_val"),
    ({"p_val": 1.5}, "p_val"),
    ({"correction": "holm"}, "correction"),
    ({"min_window_rows": 0}, "min_window_rows"),
    ({"min_ks_statistic": -0.1}, "min_ks_statistic"),
    ({"min_distance": -1.0}, "min_distance"),
    ({"method": "fast"}, "method"),
    ({"workers": 0}, "workers"),
    ({"features": ["a"]}, "expected rows of 1 features"),
])
def test_invalid_options_are_refused_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        KSDrift(np.zeros((10, 2)) + np.arange(10)[:, None], **kwargs)


def test_reference_and_window_with_nan_are_refused_naming_the_feature():
    reference = np.random.default_rng(7).normal(size=(50, 2))
    bad = reference.copy()
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match=r"reference holds NaN.*'b'"):
        KSDrift(bad, features=["a", "b"])
    with pytest.raises(ValueError, match=r"current window holds NaN.*'b'"):
        KSDrift(reference, features=["a", "b"]).score(bad)
    with pytest.raises(ValueError, match="no rows"):
        KSDrift(np.empty((0, 2)))


def test_the_statistic_is_exact_where_the_current_sample_holds_a_reference_value_and_nowhere_else():
    # Just before 5 the reference ECDF is 1/4 and the current one 0; at 5 both are 1: D = 1/4. Taking
    # the current count at 5 for "just before 5" too would give 3/4.
    assert KSDrift(np.array([[0.0], [5.0], [5.0], [5.0]])).score(np.array([[5.0]])).statistics[0] == 0.25
    rng = np.random.default_rng(3)
    for trial in range(300):
        n1, n2 = rng.integers(1, 60, size=2)
        reference = rng.normal(size=n1)
        current = rng.normal(size=n2) + rng.choice([0.0, 0.5])
        if trial % 3 == 0:  # many ties, within and across the samples
            reference, current = np.round(reference, 0), np.round(current, 0)
        elif trial % 3 == 1:  # some current values are reference values, the rest are not
            taken = rng.random(n2) < 0.5
            current[taken] = rng.choice(reference, size=int(taken.sum()))
        scores = KSDrift(reference[:, None], method="exact").score(current[:, None])
        expected = stats.ks_2samp(reference, current, method="exact")
        assert scores.statistics[0] == pytest.approx(expected.statistic, abs=1e-12), (trial, reference, current)
        assert scores.pvalues[0] == pytest.approx(expected.pvalue, rel=1e-8, abs=1e-13), (trial, reference, current)


@pytest.mark.parametrize("presorted", [False, True])
def test_features_scored_in_threads_give_the_scores_of_one_thread(presorted):
    rng = np.random.default_rng(11)
    reference = rng.normal(size=(2_000, 7))
    current = rng.normal(size=(7, 30_000)) + np.linspace(0, 0.2, 7)[:, None]
    current[3] = np.round(current[3], 1)  # ties
    if presorted:
        current.sort(axis=1)
    one, several = (KSDrift(reference, workers=w).score_columns(current.copy(), presorted=presorted) for w in (1, 3))
    assert several == one
    assert np.isfinite(one.statistics).all() and len(set(one.statistics)) == 7
