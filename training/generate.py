"""Synthetic transactions shaped like the public credit-card fraud dataset.

Real card data cannot be downloaded here, so this writes a CSV with the public file's header
(`Time,V1..V28,Amount,Class`) whose class-conditional statistics follow the public dataset:
centred V columns with decreasing spread for legitimate rows; shifted, wide, skewed and correlated
V columns for frauds (a latent "severity" drives them together); heavy-tailed amounts; a daily
cycle in `Time`.

The classes overlap as they do on real data (`Overlap`): a share of frauds is camouflaged inside
legitimate traffic, nudged only slightly toward the fraud means, and a few legitimate rows look like
frauds. Each class's V columns are a mixture whose mean and standard deviation are still the public
figures (the main component is rescaled to make room for the other one). The shares are calibrated so
that the default forest's average precision on the time-ordered hold-out of the full-size seed-0 file
lies within the published random-forest results on the real file (see the README).

`training.scenarios` builds months of changing traffic from the same pieces.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pa_csv

from common.schema import CSV_COLUMNS, V_COLUMNS

FULL_ROWS = 284_807
DEFAULT_FRAUD_RATE = 0.00172
TWO_DAYS = 172_792  # the public file's last Time value, in seconds

# Class-conditional (mean, std) of V1..V28 in the public dataset: legit, then fraud.
LEGIT_MOMENTS = np.array([
    (0.00, 1.93), (0.00, 1.62), (-0.02, 1.44), (0.01, 1.41), (0.04, 1.34), (0.00, 1.34), (0.01, 1.14),
    (-0.01, 1.10), (0.01, 1.10), (0.02, 1.05), (0.00, 1.01), (0.02, 0.94), (0.01, 0.98), (-0.01, 0.95),
    (0.01, 0.92), (0.00, 0.83), (0.03, 0.75), (0.00, 0.82), (0.03, 0.81), (0.00, 0.76), (0.00, 0.70),
    (0.02, 0.71), (0.00, 0.53), (0.00, 0.61), (0.00, 0.52), (0.00, 0.48), (0.00, 0.41), (0.00, 0.37),
])
FRAUD_MOMENTS = np.array([
    (-4.77, 6.78), (3.62, 4.29), (-7.03, 7.11), (4.54, 2.87), (-3.15, 5.37), (-1.40, 1.86), (-5.57, 7.21),
    (0.57, 6.80), (-2.58, 2.50), (-5.68, 4.90), (3.80, 2.68), (-6.26, 4.65), (-0.11, 1.10), (-6.97, 4.28),
    (-0.09, 1.05), (-4.14, 3.87), (-6.67, 6.97), (-2.25, 2.90), (0.68, 1.54), (0.37, 1.35), (0.71, 3.87),
    (0.01, 1.49), (-0.04, 1.58), (-0.11, 0.52), (0.04, 0.80), (0.05, 0.47), (0.17, 1.38), (0.08, 0.55),
])


@dataclass(frozen=True)
class Overlap:
    """How far the classes overlap.

    camouflaged: share of frauds drawn as legitimate traffic, each moved toward the fraud means by a
        uniform 0..`camouflage_sd` legitimate standard deviations on the V columns where frauds differ.
    outliers: share of legitimate rows drawn as frauds, scaled by `outlier_scale` (milder than most).
    """

    camouflaged: float = 0.20
    camouflage_sd: float = 1.3
    outliers: float = 0.0005
    outlier_scale: float = 0.6

    def validate(self) -> None:
        """Raises ValueError naming the first value out of range."""
        if not 0.0 <= self.camouflaged < 1.0:
            raise ValueError(f"camouflaged must be within [0, 1), got {self.camouflaged}")
        if not 0.0 <= self.outliers < 0.01:
            raise ValueError(f"outliers must be within [0, 0.01), got {self.outliers}")
        if not self.camouflage_sd >= 0.0:
            raise ValueError(f"camouflage_sd must be 0 or more, got {self.camouflage_sd}")
        if not 0.0 < self.outlier_scale <= 1.0:
            raise ValueError(f"outlier_scale must be within (0, 1], got {self.outlier_scale}")


NO_OVERLAP = Overlap(camouflaged=0.0, outliers=0.0)
# The kinds of row a draw holds (`draw` returns one per row): the CSV has only Class.
LEGIT, LEGIT_OUTLIER, FRAUD, CAMOUFLAGED_FRAUD = "legit", "legit_outlier", "fraud", "camouflaged_fraud"


@dataclass(frozen=True)
class GenerateResult:
    path: Path
    rows: int
    frauds: int
    seconds: float


def _standard_skewed(rng: np.random.Generator, size: int, skew_sigma: float) -> np.ndarray:
    """Zero-mean, unit-variance draws with a long right tail (a standardised log-normal)."""
    s2 = skew_sigma**2
    mean = np.exp(s2 / 2)
    std = np.sqrt((np.exp(s2) - 1) * np.exp(s2))
    return (rng.lognormal(0.0, skew_sigma, size) - mean) / std


def _legit_v(rng: np.random.Generator, n: int) -> np.ndarray:
    # Student-t with 5 degrees of freedom, rescaled to unit variance: PCA components of real
    # transactions are centred but heavier-tailed than a Gaussian.
    t = rng.standard_t(5, size=(n, 28)) / np.sqrt(5 / 3)
    return LEGIT_MOMENTS[:, 0] + LEGIT_MOMENTS[:, 1] * t


def _fraud_v(rng: np.random.Generator, n: int) -> np.ndarray:
    means, stds = FRAUD_MOMENTS[:, 0], FRAUD_MOMENTS[:, 1]
    # A shared severity makes fraud features move together; its skew gives the long tails
    # (V14 and V17 reach -19 and beyond). Each feature's tail points the way its mean moved.
    severity = _standard_skewed(rng, n, 0.8)[:, None]
    own = _standard_skewed(rng, n * 28, 0.5).reshape(n, 28)
    direction = np.where(np.abs(means) > 0.3, np.sign(means), 1.0)
    loading = np.where(np.abs(means) > 0.3, 0.8, 0.0)
    z = loading * severity + np.sqrt(1 - loading**2) * own
    return means + stds * direction * z


# Where frauds differ from legitimate traffic: the sign of the fraud mean on the V columns it moved.
FRAUD_DIRECTION = np.sign(FRAUD_MOMENTS[:, 0]) * (np.abs(FRAUD_MOMENTS[:, 0]) > 0.3)


def _camouflaged_v(rng: np.random.Generator, n: int, overlap: Overlap) -> np.ndarray:
    strength = rng.uniform(0.0, overlap.camouflage_sd, size=(n, 1))
    return _legit_v(rng, n) + strength * FRAUD_DIRECTION * LEGIT_MOMENTS[:, 1]


def _rescale_to_moments(main: np.ndarray, moments: np.ndarray, share: float, other_mean: np.ndarray,
                        other_var: np.ndarray) -> np.ndarray:
    """Rescale draws with the class's own moments so that, mixed with `share` of another component
    (per-feature mean and variance given), the mixture keeps the class's mean and standard deviation."""
    mean, std = moments[:, 0], moments[:, 1]
    if share == 0.0:
        return main
    main_mean = (mean - share * other_mean) / (1 - share)
    main_var = (std**2 + mean**2 - share * (other_var + other_mean**2)) / (1 - share) - main_mean**2
    scale = np.sqrt(np.maximum(main_var, 1e-6)) / std
    return main_mean + scale * (main - mean)


def legit_v(rng: np.random.Generator, n: int, overlap: Overlap) -> tuple[np.ndarray, np.ndarray]:
    """V columns of n legitimate rows, and which of them are fraud-like outliers."""
    scale = overlap.outlier_scale
    v = _rescale_to_moments(_legit_v(rng, n), LEGIT_MOMENTS, overlap.outliers, scale * FRAUD_MOMENTS[:, 0],
                            (scale * FRAUD_MOMENTS[:, 1]) ** 2)
    outlier = rng.random(n) < overlap.outliers
    v[outlier] = scale * _fraud_v(rng, int(outlier.sum()))
    return v, outlier


def fraud_v(rng: np.random.Generator, n: int, overlap: Overlap) -> tuple[np.ndarray, np.ndarray]:
    """V columns of n frauds, and which of them are camouflaged in legitimate traffic."""
    lift = overlap.camouflage_sd * FRAUD_DIRECTION * LEGIT_MOMENTS[:, 1]
    camo_mean = LEGIT_MOMENTS[:, 0] + lift / 2
    camo_var = LEGIT_MOMENTS[:, 1] ** 2 + lift**2 / 12  # a legitimate draw plus a uniform lift
    v = _rescale_to_moments(_fraud_v(rng, n), FRAUD_MOMENTS, overlap.camouflaged, camo_mean, camo_var)
    camouflaged = rng.random(n) < overlap.camouflaged
    v[camouflaged] = _camouflaged_v(rng, int(camouflaged.sum()), overlap)
    return v, camouflaged


def _piecewise_lognormal(rng: np.random.Generator, n: int, median: float, lo_sigma: float, hi_sigma: float,
                         knee_z: float = 1.2816) -> np.ndarray:
    """Log-normal whose log has one spread below the 90th percentile and another above it."""
    z = rng.standard_normal(n)
    log_amount = np.log(median) + lo_sigma * np.minimum(z, knee_z) + hi_sigma * np.maximum(z - knee_z, 0.0)
    return np.exp(log_amount)


def amounts(rng: np.random.Generator, n: int, fraud: bool) -> np.ndarray:
    if fraud:
        # median ~9, p90 ~350; card testers' 1.00 and 0.00 charges; the public maximum is 2125.87.
        amount = np.minimum(_piecewise_lognormal(rng, n, 16.0, 2.6, 1.0), 2125.87)
        tests = rng.random(n) < 0.15
        amount[tests] = rng.choice([0.0, 1.0], size=int(tests.sum()), p=[0.2, 0.8])
    else:
        # median ~22, p90 ~200, p99 ~1,000; about 0.6% zero-amount authorisations.
        amount = np.minimum(_piecewise_lognormal(rng, n, 22.0, 1.72, 1.54), 25691.16)
        amount[rng.random(n) < 0.0064] = 0.0
    return np.round(amount, 2)


def _times(rng: np.random.Generator, n: int, fraud: bool, span: float = TWO_DAYS) -> np.ndarray:
    """Seconds over `span`; legitimate traffic follows a day/night cycle, fraud is flatter."""
    depth = 0.3 if fraud else 0.85
    out = np.empty(0)
    while out.size < n:  # thinning: accept t with probability proportional to the daily rate
        t = rng.uniform(0, span, size=2 * (n - out.size) + 16)
        rate = 1 - depth * np.cos(2 * np.pi * (t / 86_400 - 0.15)) ** 2 * (np.cos(2 * np.pi * t / 86_400 - 0.8) > 0)
        out = np.concatenate([out, t[rng.random(t.size) < rate]])
    return np.floor(out[:n])


def draw(rng: np.random.Generator, n_legit: int, n_fraud: int, overlap: Overlap,
         span: float = TWO_DAYS) -> pd.DataFrame:
    """n_legit legitimate rows then n_fraud frauds, unsorted: `Time` (seconds within `span`),
    V1..V28, `Amount`, `Class`, and `kind` (LEGIT, LEGIT_OUTLIER, FRAUD or CAMOUFLAGED_FRAUD)."""
    legit, outlier = legit_v(rng, n_legit, overlap)
    fraud, camouflaged = fraud_v(rng, n_fraud, overlap)
    frame = pd.DataFrame(np.vstack([legit, fraud]), columns=list(V_COLUMNS))
    frame.insert(0, "Time", np.concatenate([_times(rng, n_legit, False, span), _times(rng, n_fraud, True, span)]))
    frame["Amount"] = np.concatenate([amounts(rng, n_legit, False), amounts(rng, n_fraud, True)])
    frame["Class"] = np.concatenate([np.zeros(n_legit, dtype=np.int64), np.ones(n_fraud, dtype=np.int64)])
    frame["kind"] = np.concatenate([np.where(outlier, LEGIT_OUTLIER, LEGIT), np.where(camouflaged, CAMOUFLAGED_FRAUD,
                                                                                       FRAUD)])
    return frame


def generate_frame(rows: int = FULL_ROWS, fraud_rate: float = DEFAULT_FRAUD_RATE, seed: int = 0,
                   overlap: Overlap = Overlap()) -> pd.DataFrame:
    """Generate `rows` transactions in the public file's column order, sorted by Time.

    Args:
        rows: number of rows, at least 1.
        fraud_rate: the share of frauds in [0, 1]; the count is rounded, not sampled.
        seed: the same seed gives the same frame.
        overlap: how far the classes overlap (NO_OVERLAP: frauds as separable as the moments allow).

    Raises:
        ValueError: rows < 1, fraud_rate outside [0, 1], or an overlap value out of range.
    """
    if rows < 1:
        raise ValueError(f"rows must be at least 1, got {rows}")
    if not 0.0 <= fraud_rate <= 1.0:
        raise ValueError(f"fraud_rate must be within [0, 1], got {fraud_rate}")
    overlap.validate()
    rng = np.random.default_rng(seed)
    n_fraud = round(rows * fraud_rate)
    frame = draw(rng, rows - n_fraud, n_fraud, overlap)
    times = frame["Time"].to_numpy(copy=True)
    times[np.argmin(times)] = 0.0  # the public file starts at Time 0
    frame["Time"] = times
    order = np.lexsort((rng.random(rows), times))
    return frame.iloc[order].reset_index(drop=True)[list(CSV_COLUMNS)]


def write_csv(frame: pd.DataFrame, out: Path) -> None:
    """Write the frame as the public file does (header, then plain decimals), atomically.

    Arrow's CSV writer keeps full-size generation to about a second; values are rounded to six
    decimals first so they print short.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    table = frame.copy()
    table[list(V_COLUMNS)] = table[list(V_COLUMNS)].round(6)
    table["Time"] = table["Time"].astype(np.int64)
    tmp = out.with_name(out.name + ".tmp")
    with tmp.open("wb") as fh:
        fh.write((",".join(CSV_COLUMNS) + "\n").encode())
        pa_csv.write_csv(pa.Table.from_pandas(table, preserve_index=False), fh,
                         pa_csv.WriteOptions(include_header=False, quoting_style="none"))
    tmp.replace(out)


def generate(rows: int = FULL_ROWS, seed: int = 0, out: Path = Path("data/creditcard.csv"),
             fraud_rate: float = DEFAULT_FRAUD_RATE) -> GenerateResult:
    """Generate a CSV in the public credit-card dataset's format and write it atomically."""
    started = time.perf_counter()
    frame = generate_frame(rows, fraud_rate, seed)
    write_csv(frame, Path(out))
    return GenerateResult(Path(out), len(frame), int(frame["Class"].sum()), time.perf_counter() - started)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.generate", description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=FULL_ROWS, help="rows to write (default: the public file's 284807)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; the same seed writes the same file")
    parser.add_argument("--out", type=Path, default=Path("data/creditcard.csv"), help="CSV path to write")
    parser.add_argument("--fraud-rate", "--fraud_rate", dest="fraud_rate", type=float, default=DEFAULT_FRAUD_RATE,
                        help="share of frauds (default 0.00172, as in the public file)")
    args = parser.parse_args(argv)
    try:
        result = generate(args.rows, args.seed, args.out, args.fraud_rate)
    except ValueError as exc:
        print(f"generate: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {result.rows} rows ({result.frauds} frauds) to {result.path} in {result.seconds:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
