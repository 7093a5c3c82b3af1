"""Two-sample Kolmogorov–Smirnov drift detection over many features, shaped like alibi-detect's `KSDrift`.

`KSDrift` is built once from the reference (validated, sorted once); `score(current)` returns each
feature's KS statistic, p-value and effect size; `predict(current)` returns an immutable `DriftReport`
with the decision, the corrected threshold (one number) and the drifted features. Nothing is mutated
by a check, and the caller's arrays are never sorted in place.

A test drifts when its p-value is at or below the corrected threshold *and* the change is large
enough to matter: its KS statistic reaches `min_ks_statistic` and its Wasserstein distance, in
standard deviations of the reference (`distance`), reaches `min_distance`. At the window sizes the
check runs on, the p-value alone flags changes far too small to matter to the model (see
docs/decisions/015-drift-effect-size-floor.md).

The statistic is computed from integer ECDF counts, so it equals `scipy.stats.ks_2samp`'s. P-values
follow scipy's definitions: exact (the lattice-path distribution of the two-sample statistic) when both
samples have at most `MAX_EXACT_N` rows, otherwise Smirnov's asymptotic distribution (`scipy.stats.kstwo`
at n = n1*n2/(n1+n2)). One deviation, for speed: unequal sample sizes whose lattice has more than
`MAX_EXACT_CELLS` cells use the asymptotic distribution (scipy would still walk the lattice).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

# scipy is imported where it is used, so that a drift check imports it while its window is read
# rather than before the read starts (docs/decisions/020-drift-check-start-up-and-ks.md).

# The Wasserstein distance is computed between this many evenly spaced quantiles of each sample, so
# a million-row window costs what a small one does; the quantiles come from the sorted samples.
DISTANCE_QUANTILES = 1000

MAX_EXACT_N = 10_000
MAX_EXACT_CELLS = 10_000_000
METHODS = ("auto", "exact", "asymp")

# Canonical correction names, and the spellings accepted for them.
CORRECTIONS = {
    "bonferroni": "bonferroni",
    "fdr": "fdr",
    "bh": "fdr",
    "benjamini-hochberg": "fdr",
    "none": "none",
}

DRIFT = "drift"
NO_DRIFT = "no_drift"
INCONCLUSIVE = "inconclusive"


def normalise_correction(name: str) -> str:
    """The canonical name of a multiple-testing correction.

    Raises:
        ValueError: the name is not one of `CORRECTIONS`.
    """
    canonical = CORRECTIONS.get(str(name).strip().lower())
    if canonical is None:
        raise ValueError(f"correction {name!r} is unknown; expected one of {sorted(set(CORRECTIONS))}")
    return canonical


# --- the statistic -------------------------------------------------------------------------------


def distinct_counts(sorted_values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(distinct values, how many values are <= each) of a sorted sample: its ECDF's jump points."""
    last = np.empty(sorted_values.size, dtype=bool)
    np.not_equal(sorted_values[1:], sorted_values[:-1], out=last[:-1])
    last[-1:] = True
    ends = np.flatnonzero(last)
    return sorted_values[ends], (ends + 1).astype(np.int64)


def ecdf_gap(reference_values: np.ndarray, reference_counts: np.ndarray, n1: int, current_sorted: np.ndarray) -> int:
    """The KS statistic of two samples, in units of 1/(n1*n2), as an exact integer.

    Args:
        reference_values, reference_counts: the reference ECDF's jump points, from `distinct_counts`.
        n1: the reference's size.
        current_sorted: the current sample, sorted.

    Between two consecutive reference jump points the reference ECDF is constant and the current
    ECDF only grows, so |F_ref - F_cur| peaks at an end of the interval: at a jump point (current
    count `<=` it) or just before it (current count `<` it). A binary search of the reference's
    jump points in the current sample gives the counts `<=`; the counts `<` differ from them only
    at a jump point the current sample also holds (a tie), so a second search runs for those
    points alone (docs/decisions/020-drift-check-start-up-and-ks.md). O(n1 log n2), ties included.
    """
    n2 = current_sorted.size
    right = np.searchsorted(current_sorted, reference_values, side="right")
    # A tie at a jump point: the largest current value <= it is the point itself.
    tied = (np.flatnonzero(current_sorted[np.maximum(right - 1, 0)] == reference_values) if n2
            else np.empty(0, dtype=np.intp))
    left = right.copy()
    if tied.size:
        left[tied] = np.searchsorted(current_sorted, reference_values[tied], side="left")
    right, left = right.astype(np.int64), left.astype(np.int64)
    before = np.concatenate(([0], reference_counts[:-1]))
    at_points = np.abs(reference_counts * n2 - right * n1).max()
    before_points = np.abs(before * n2 - left * n1).max()
    return int(max(at_points, before_points))


# --- p-values ------------------------------------------------------------------------------------


def resolve_method(method: str, n1: int, n2: int) -> str:
    """Which p-value method `method` means for these sample sizes ('exact' or 'asymp')."""
    if method not in METHODS:
        raise ValueError(f"method {method!r} is unknown; expected one of {METHODS}")
    if method == "asymp":
        return "asymp"
    if n1 != n2 and n1 * n2 > MAX_EXACT_CELLS:
        return "asymp"
    if method == "auto" and max(n1, n2) > MAX_EXACT_N:
        return "asymp"
    return "exact"


def ks_pvalues(gaps: Sequence[int] | np.ndarray, n1: int, n2: int, method: str = "auto") -> tuple[np.ndarray, str]:
    """Two-sided p-values P(D >= d) for statistics given as integer gaps (d = gap / (n1*n2)).

    Args:
        gaps: KS statistics in units of 1/(n1*n2), from `ecdf_gap`.
        n1, n2: the sample sizes, both at least 1.
        method: 'auto' (exact for small samples, as scipy), 'exact' or 'asymp'.

    Returns:
        The p-values, and the method used.
    """
    from scipy import stats

    if n1 < 1 or n2 < 1:
        raise ValueError(f"both samples need at least one row, got {n1} and {n2}")
    gaps = np.asarray(gaps, dtype=np.int64)
    used = resolve_method(method, n1, n2)
    if used == "asymp":
        big, small = max(n1, n2), min(n1, n2)
        effective_n = round(big * small / (big + small))
        pvalues = stats.kstwo.sf(gaps / (n1 * n2), max(effective_n, 1))
    elif n1 == n2:
        pvalues = np.array([_exact_equal_sizes(int(g) // n1, n1) for g in gaps])
    else:
        pvalues = _exact_unequal_sizes(gaps, n1, n2)
    return np.clip(np.asarray(pvalues, dtype=np.float64), 0.0, 1.0), used


def _exact_equal_sizes(h: int, n: int) -> float:
    """P(D_{n,n} >= h/n) = 2 * sum_k (-1)^(k-1) C(2n, n-kh) / C(2n, n)  (Gnedenko–Korolyuk)."""
    from scipy import special

    if h <= 0:
        return 1.0
    k = np.arange(1, n // h + 1, dtype=np.float64)
    log_terms = 2 * special.gammaln(n + 1) - special.gammaln(n - k * h + 1) - special.gammaln(n + k * h + 1)
    terms = np.exp(log_terms) * np.where(k % 2 == 1, 1.0, -1.0)
    # Smallest terms first: the alternating tail then cancels before it meets the large leading terms.
    return float(min(1.0, max(0.0, 2.0 * terms[::-1].sum())))


def _exact_unequal_sizes(gaps: np.ndarray, n1: int, n2: int) -> np.ndarray:
    """P(D >= d) by counting the lattice paths from (0,0) to (a,b) that stay strictly inside the band.

    A path's point (i, j) has ECDF difference (i*b - j*a)/(a*b); the statistic is below `gap`
    exactly when every point satisfies |i*b - j*a| < gap. In each row the allowed j form one interval,
    so a row's counts are the cumulative sum of the previous row's counts over that interval. Rows are
    rescaled to keep the counts finite; all features advance together.
    """
    from scipy import special

    a, b = min(n1, n2), max(n1, n2)
    gaps = np.asarray(gaps, dtype=np.int64)
    j = np.arange(b + 1, dtype=np.int64)
    counts = (j[None, :] * a < gaps[:, None]).astype(np.float64)
    log_scale = np.zeros(gaps.size)
    for i in range(1, a + 1):
        low = np.maximum((i * b - gaps) // a + 1, 0)
        high = np.minimum((i * b + gaps - 1) // a, b)
        start, stop = int(low.min()), int(high.max()) + 1
        if start >= stop:
            counts[:] = 0.0
            break
        span = j[start:stop]
        inside = (span[None, :] >= low[:, None]) & (span[None, :] <= high[:, None])
        row = np.cumsum(np.where(inside, counts[:, start:stop], 0.0), axis=1)
        row[~inside] = 0.0
        counts[:] = 0.0
        counts[:, start:stop] = row
        peak = row.max(axis=1)
        scale = np.where(peak > 0, peak, 1.0)
        counts /= scale[:, None]
        log_scale += np.log(scale)
    log_total = special.gammaln(a + b + 1) - special.gammaln(a + 1) - special.gammaln(b + 1)
    with np.errstate(divide="ignore"):
        log_inside = np.log(counts[:, b]) + log_scale - log_total
    return -np.expm1(np.minimum(log_inside, 0.0))


# --- multiple-testing correction -----------------------------------------------------------------


def corrected_threshold(pvalues: np.ndarray, p_val: float, correction: str) -> float:
    """The single p-value threshold that a family of tests is judged against.

    Bonferroni: p_val / m. Benjamini–Hochberg ('fdr'): the step-up cut k*/m * p_val for the largest
    k with p_(k) <= k/m * p_val, or p_val / m when there is none (no p-value reaches it). 'none': p_val.
    A test rejects when its p-value is at or below the threshold.
    """
    correction = normalise_correction(correction)
    m = int(np.asarray(pvalues).size)
    if m == 0 or correction == "none":
        return float(p_val)
    if correction == "bonferroni":
        return float(p_val) / m
    ordered = np.sort(np.nan_to_num(np.asarray(pvalues, dtype=np.float64), nan=1.0))
    passing = np.flatnonzero(ordered <= np.arange(1, m + 1) / m * p_val)
    k = int(passing[-1]) + 1 if passing.size else 1
    return float(p_val) * k / m


# --- results -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KSScores:
    """Raw per-test results: one KS statistic, p-value and distance per feature (NaN when not computed).

    `distances` are Wasserstein-1 distances between the two samples, in standard deviations of the
    reference: 0.1 means the current values sit, on average, a tenth of the reference's spread away.
    """

    features: tuple[str, ...]
    statistics: tuple[float, ...]
    pvalues: tuple[float, ...]
    n_reference: tuple[int, ...]
    n_current: tuple[int, ...]
    methods: tuple[str, ...]
    distances: tuple[float, ...]

    def __add__(self, other: KSScores) -> KSScores:
        """The union of two families (e.g. the features and the model's score), judged together."""
        clash = set(self.features) & set(other.features)
        if clash:
            raise ValueError(f"tests {sorted(clash)} appear in both families")
        return KSScores(*(a + b for a, b in zip(self._fields(), other._fields(), strict=True)))

    def _fields(self) -> tuple[tuple, ...]:
        return (self.features, self.statistics, self.pvalues, self.n_reference, self.n_current, self.methods,
                self.distances)


def _finite_or_none(value: float) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


@dataclass(frozen=True)
class DriftReport:
    """An immutable drift decision.

    `status` is 'drift', 'no_drift' or 'inconclusive'; `threshold` is the corrected p-value threshold
    every test was judged against; `drifted` lists the tests whose p-value is at or below it and whose
    statistic reaches `min_ks_statistic` and distance `min_distance`; `significant` lists the tests
    whose p-value alone is at or below it (a change too small to count still shows there).
    """

    status: str
    reason: str
    threshold: float
    p_val: float
    correction: str
    min_ks_statistic: float
    min_distance: float
    min_window_rows: int
    scores: KSScores
    drifted: tuple[str, ...] = field(default=())
    significant: tuple[str, ...] = field(default=())

    @property
    def drift_detected(self) -> bool | None:
        """True or False, or None when the check was inconclusive."""
        return None if self.status == INCONCLUSIVE else self.status == DRIFT

    @property
    def tag(self) -> str:
        """The `drift_detected` tag value: 'true', 'false' or 'inconclusive'."""
        return {DRIFT: "true", NO_DRIFT: "false"}.get(self.status, INCONCLUSIVE)

    @property
    def feature_pvalues(self) -> dict[str, float | None]:
        return {f: _finite_or_none(p) for f, p in zip(self.scores.features, self.scores.pvalues, strict=True)}

    @property
    def feature_statistics(self) -> dict[str, float | None]:
        return {f: _finite_or_none(s) for f, s in zip(self.scores.features, self.scores.statistics, strict=True)}

    @property
    def feature_distances(self) -> dict[str, float | None]:
        return {f: _finite_or_none(d) for f, d in zip(self.scores.features, self.scores.distances, strict=True)}

    @property
    def drifted_share(self) -> float:
        return len(self.drifted) / len(self.scores.features) if self.scores.features else 0.0

    def most_drifted(self, k: int) -> list[str]:
        """The k tests with the largest KS statistics (NaN last)."""
        stats_ = np.nan_to_num(np.asarray(self.scores.statistics, dtype=np.float64), nan=-1.0)
        order = np.argsort(-stats_, kind="stable")[:k]
        return [self.scores.features[i] for i in order if stats_[i] >= 0]

    def to_dict(self) -> dict:
        """JSON-ready content; the original keys `drift_detected` and `feature_pvalues` come first."""
        return {
            "drift_detected": self.drift_detected,
            "feature_pvalues": self.feature_pvalues,
            "status": self.status,
            "reason": self.reason,
            "threshold": self.threshold,
            "p_val": self.p_val,
            "correction": self.correction,
            "min_ks_statistic": self.min_ks_statistic,
            "min_distance": self.min_distance,
            "min_window_rows": self.min_window_rows,
            "drifted_features": list(self.drifted),
            "drifted_count": len(self.drifted),
            "drifted_share": self.drifted_share,
            "significant_features": list(self.significant),
            "feature_statistics": self.feature_statistics,
            "feature_distances": self.feature_distances,
            "n_reference": dict(zip(self.scores.features, self.scores.n_reference, strict=True)),
            "n_current": dict(zip(self.scores.features, self.scores.n_current, strict=True)),
            "pvalue_method": dict(zip(self.scores.features, self.scores.methods, strict=True)),
        }


def decide(scores: KSScores, *, p_val: float, correction: str, min_ks_statistic: float = 0.0,
           min_distance: float = 0.0, min_window_rows: int = 1) -> DriftReport:
    """Judge a family of KS tests together.

    Inconclusive when any test's current sample is smaller than `min_window_rows`; otherwise drift
    when at least one test's p-value is at or below the corrected threshold, its statistic is at
    least `min_ks_statistic` and its distance at least `min_distance`.
    """
    correction = normalise_correction(correction)
    pvalues = np.asarray(scores.pvalues, dtype=np.float64)
    statistics = np.asarray(scores.statistics, dtype=np.float64)
    distances = np.asarray(scores.distances, dtype=np.float64)
    threshold = corrected_threshold(pvalues, p_val, correction)
    common = dict(threshold=threshold, p_val=float(p_val), correction=correction,
                  min_ks_statistic=float(min_ks_statistic), min_distance=float(min_distance),
                  min_window_rows=int(min_window_rows), scores=scores)
    smallest = min(scores.n_current, default=0)
    if smallest < min_window_rows:
        short = [f for f, n in zip(scores.features, scores.n_current, strict=True) if n < min_window_rows]
        which = "the window" if len(short) == len(scores.features) else f"test(s) {', '.join(short)}"
        return DriftReport(INCONCLUSIVE, f"{which} has {smallest} rows, fewer than min_window_rows={min_window_rows}",
                           **common)
    significant = np.nan_to_num(pvalues, nan=1.0) <= threshold
    large = (np.nan_to_num(statistics, nan=0.0) >= min_ks_statistic) & (np.nan_to_num(distances, nan=0.0)
                                                                         >= min_distance)
    named = tuple(f for f, s in zip(scores.features, significant, strict=True) if s)
    drifted = tuple(f for f, s, big in zip(scores.features, significant, large, strict=True) if s and big)
    rule = f"p <= {threshold:.3g} after {correction} correction of p_val={p_val:g} over {len(pvalues)} tests"
    if drifted:
        reason = f"{len(drifted)} of {len(pvalues)} tests drifted ({rule}): {', '.join(drifted)}"
        return DriftReport(DRIFT, reason, drifted=drifted, significant=named, **common)
    small_effects = int((significant & ~large).sum())
    reason = f"no test drifted ({rule})"
    if small_effects:
        reason += (f"; {small_effects} significant test(s) changed less than the effect-size floor "
                   f"(min_ks_statistic={min_ks_statistic:g}, min_distance={min_distance:g} sd): "
                   + ", ".join(f for f in named))
    return DriftReport(NO_DRIFT, reason, significant=named, **common)


def wasserstein_sd(reference_sorted: np.ndarray, current_sorted: np.ndarray, reference_sd: float) -> float:
    """The Wasserstein-1 distance between two sorted samples, in standard deviations of the reference.

    Computed by scipy between DISTANCE_QUANTILES evenly spaced quantiles of each sample (the
    midpoints of equal-probability bins), which is within a bin's width of the exact distance.
    """
    from scipy import stats

    def quantiles(values: np.ndarray) -> np.ndarray:
        n = values.size
        positions = ((np.arange(DISTANCE_QUANTILES) + 0.5) * n / DISTANCE_QUANTILES).astype(np.int64)
        return values[np.minimum(positions, n - 1)].astype(np.float64)

    distance = float(stats.wasserstein_distance(quantiles(reference_sorted), quantiles(current_sorted)))
    if reference_sd > 0:
        return distance / reference_sd
    return 0.0 if distance == 0 else math.inf


# --- the detector --------------------------------------------------------------------------------


def _as_columns(data: np.ndarray | pd.DataFrame, features: Sequence[str], dtype: np.dtype) -> np.ndarray:
    """Rows (n, F) or a DataFrame -> a new feature-major (F, n) array of `dtype`.

    Always a copy: the detector sorts it in place, and must not sort (or fail to sort: pandas 3
    hands out read-only arrays) the caller's data.
    """
    if isinstance(data, pd.DataFrame):
        missing = [f for f in features if f not in data.columns]
        if missing:
            raise ValueError(f"data lacks feature column(s) {missing}")
        array = data[list(features)].to_numpy(dtype=dtype)
    else:
        array = np.asarray(data, dtype=dtype)
        if array.ndim == 1 and len(features) == 1:
            array = array[:, None]
    if array.ndim != 2 or array.shape[1] != len(features):
        raise ValueError(f"expected rows of {len(features)} features, got an array of shape {array.shape}")
    return np.array(array.T, dtype=dtype, order="C", copy=True)


class KSDrift:
    """Feature-wise two-sample KS drift detector with a multiple-testing correction.

    Args:
        reference: reference rows, (n, F) array or DataFrame (then `features` default to its columns).
        p_val: the family-wise (Bonferroni) or false-discovery (fdr) level, in (0, 1).
        correction: 'bonferroni' (default), 'fdr' (Benjamini–Hochberg) or 'none'.
        features: names of the F columns.
        min_window_rows: below this many current rows a check is inconclusive.
        min_ks_statistic: a test drifts only when its statistic also reaches this (effect size).
        min_distance: a test drifts only when its Wasserstein distance, in standard deviations of the
            reference, also reaches this (effect size).
        method: p-value method, 'auto', 'exact' or 'asymp'.
        dtype: the float type values are compared in (float32 halves memory for large windows).
        workers: features scored at once, each in a thread of its own: numpy's sort and binary
            search release the GIL, so a large window's features are sorted and compared in
            parallel (docs/decisions/020-drift-check-start-up-and-ks.md).

    Raises:
        ValueError: an option is out of range, or the reference is empty or holds NaN/inf.
    """

    def __init__(self, reference: np.ndarray | pd.DataFrame, *, p_val: float = 0.01, correction: str = "bonferroni",
                 features: Sequence[str] | None = None, min_window_rows: int = 1, min_ks_statistic: float = 0.0,
                 min_distance: float = 0.0, method: str = "auto", dtype: type = np.float64, workers: int = 1):
        if features is None:
            if isinstance(reference, pd.DataFrame):
                features = list(reference.columns)
            else:
                width = 1 if np.ndim(reference) == 1 else np.shape(reference)[1]
                features = [f"f{i}" for i in range(width)]
        self.features = tuple(str(f) for f in features)
        if not self.features or len(set(self.features)) != len(self.features):
            raise ValueError(f"features must be non-empty and unique, got {list(self.features)}")
        if not 0.0 < float(p_val) < 1.0:
            raise ValueError(f"p_val must be within (0, 1), got {p_val}")
        if int(min_window_rows) < 1:
            raise ValueError(f"min_window_rows must be at least 1, got {min_window_rows}")
        if not 0.0 <= float(min_ks_statistic) <= 1.0:
            raise ValueError(f"min_ks_statistic must be within [0, 1], got {min_ks_statistic}")
        if not 0.0 <= float(min_distance) < math.inf:
            raise ValueError(f"min_distance must be a finite number of standard deviations, 0 or more, got "
                             f"{min_distance}")
        if method not in METHODS:
            raise ValueError(f"method {method!r} is unknown; expected one of {METHODS}")
        if int(workers) < 1:
            raise ValueError(f"workers must be at least 1, got {workers}")
        self.workers = int(workers)
        self.p_val = float(p_val)
        self.correction = normalise_correction(correction)
        self.min_window_rows = int(min_window_rows)
        self.min_ks_statistic = float(min_ks_statistic)
        self.min_distance = float(min_distance)
        self.method = method
        self.dtype = np.dtype(dtype)
        columns = _as_columns(reference, self.features, self.dtype)
        if columns.shape[1] == 0:
            raise ValueError("the reference has no rows")
        _require_finite(columns, "reference", self.features)
        columns.sort(axis=1)
        self._reference = columns
        self._jumps = [distinct_counts(c) for c in columns]
        self._sd = columns.std(axis=1, dtype=np.float64)

    @property
    def n_reference(self) -> int:
        return int(self._reference.shape[1])

    def reference_sorted(self, feature: str) -> np.ndarray:
        """The reference values of one feature, sorted (read-only view)."""
        view = self._reference[self.features.index(feature)].view()
        view.flags.writeable = False
        return view

    def score(self, current: np.ndarray | pd.DataFrame) -> KSScores:
        """Per-feature KS statistics and p-values of `current` rows against the reference."""
        return self.score_columns(_as_columns(current, self.features, self.dtype), presorted=False)

    def score_columns(self, columns: np.ndarray, *, presorted: bool = False) -> KSScores:
        """Like `score`, for a feature-major (F, n) array that the caller hands over: it is sorted in
        place unless `presorted`.

        The drift stage reads large windows straight into such an array to avoid copies.
        """
        columns = np.asarray(columns)
        if columns.ndim != 2 or columns.shape[0] != len(self.features):
            raise ValueError(f"expected {len(self.features)} feature columns, got an array of shape {columns.shape}")
        if columns.dtype != self.dtype:
            columns = columns.astype(self.dtype)
        n1, n2 = self.n_reference, int(columns.shape[1])
        width = len(self.features)
        if n2 == 0:
            nan = (float("nan"),) * width
            return KSScores(self.features, nan, nan, (n1,) * width, (0,) * width, ("none",) * width, nan)
        _require_finite(columns, "current window", self.features)

        def one(k: int) -> tuple[int, float]:
            current = columns[k]
            if not presorted:
                current.sort()
            values, counts = self._jumps[k]
            return ecdf_gap(values, counts, n1, current), wasserstein_sd(self._reference[k], current, self._sd[k])

        if self.workers > 1 and width > 1:
            with ThreadPoolExecutor(min(self.workers, width)) as pool:
                tests = list(pool.map(one, range(width)))
        else:
            tests = [one(k) for k in range(width)]
        gaps = np.array([gap for gap, _ in tests], dtype=np.int64)
        distances = [distance for _, distance in tests]
        pvalues, used = ks_pvalues(gaps, n1, n2, self.method)
        statistics = gaps / (n1 * n2)
        return KSScores(self.features, tuple(map(float, statistics)), tuple(map(float, pvalues)),
                        (n1,) * width, (n2,) * width, (used,) * width, tuple(distances))

    def decide(self, scores: KSScores) -> DriftReport:
        """Judge `scores` (possibly this detector's plus others') with this detector's options."""
        return decide(scores, p_val=self.p_val, correction=self.correction, min_ks_statistic=self.min_ks_statistic,
                      min_distance=self.min_distance, min_window_rows=self.min_window_rows)

    def predict(self, current: np.ndarray | pd.DataFrame) -> DriftReport:
        """The drift decision for `current` rows."""
        return self.decide(self.score(current))


def _require_finite(columns: np.ndarray, what: str, features: Sequence[str]) -> None:
    finite = np.isfinite(columns).all(axis=1)
    if not finite.all():
        bad = [features[i] for i in np.flatnonzero(~finite)]
        raise ValueError(f"the {what} holds NaN or infinite values in {bad}")
