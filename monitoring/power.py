"""How large a change the drift check catches, and whether the changes it catches hurt the model.

`python -m monitoring.power [--windows 30] [--rows 10000] [--reference-rows 50000]` prints the table
the README quotes. For each change in `CHANGES`, `windows` windows of `rows` transactions are drawn
by `training.scenarios` with the change applied to every row (legitimate and fraud alike, as a change
of the whole population would be; a new fraud pattern replaces old frauds at the normal fraud rate),
and judged by the shipped drift check (`data/drift_config.json`: a KS test per feature and on the
model's score, corrected together, and the effect-size floor) against a `reference_rows` sample of
the model's training data, as `monitoring.drift` judges the request log.

Reported per change:
- the share of windows flagged by the p-value alone, and with the effect-size floor (the default);
- the share the original service's rule would flag (any p < 0.01, no correction);
- what the change does to a forest trained on the reference period with the default parameters: its
  recall, precision and average precision at its own threshold, on the same rows with and without the
  change (paired, so the difference is the change's alone).

A change "hurts" when it costs more recall than the promotion gate's `max_recall_drop` tolerates
between two models. The effect-size floor is chosen so that the check flags the changes that hurt and
not the ones that do not (docs/decisions/015-drift-effect-size-floor.md).

A second table does the same for the performance check (`monitoring.performance`, with
`data/performance_config.json`): `--performance-windows` windows of `--performance-rows` rows of the
`stable` traffic and of new fraud patterns, every label matured as the chargeback feed gives it (a
fraud never reported counts as legitimate), judged against the model's figures on a hold-out of the
reference period. On `stable` every "degraded" is a false alarm.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from common import evaluation as ev
from common import settings
from common.features import AmountScaler
from common.schema import FEATURES, LABEL, SCORE
from monitoring import performance as perf
from monitoring.detector import KSDrift, decide
from monitoring.drift import DriftConfig
from training import scenarios
from training.forest import FittedForest, fit_forest
from training.params import TrainParams

ORIGINAL_P = 0.01  # the original service: drift when any feature's p-value is below this, uncorrected
# The model's strongest fraud features; a shift up moves frauds toward legitimate traffic (their fraud
# means are negative), the direction in which a change of the population can cost recall.
STRONGEST = ("V10", "V12", "V14", "V16", "V17")


@dataclass(frozen=True)
class Change:
    """One row of the table: a name, its size in the change's own unit, and the scenario options."""

    kind: str
    size: float
    unit: str
    options: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.kind} {self.size:g} {self.unit}".strip() if self.size or self.unit else self.kind


def _population(**options) -> dict:
    return {"covariate_month": 1, "covariate_ramp": 0, "covariate_scope": "all", **options}


CHANGES: tuple[Change, ...] = (
    Change("none", 0, "", {}),
    *(Change("Amount", dollars, "$", _population(amount_shift=dollars)) for dollars in (1, 5, 10, 25, 100)),
    *(Change("V14", sd, "sd", _population(v_shift=sd, v_features=("V14",))) for sd in (0.05, 0.1, 0.2, 0.5, 1, 2, 3)),
    *(Change("V10,V12,V14,V16,V17", sd, "sd", _population(v_shift=sd, v_features=STRONGEST))
      for sd in (0.05, 0.1, 0.2, 0.5, 1, 2)),
    *(Change("new pattern", share, "of frauds", {"pattern_month": 1, "pattern_share": share, "pattern_max": share})
      for share in (0.5, 0.8)),
)


@dataclass
class Row:
    change: Change
    windows: int = 0
    flagged_p: int = 0
    flagged_floor: int = 0
    flagged_original: int = 0
    before: dict = field(default_factory=dict)
    after: dict = field(default_factory=dict)

    def rate(self, count: int) -> float:
        return count / self.windows if self.windows else math.nan

    def delta(self, metric: str) -> float:
        return self.after.get(metric, math.nan) - self.before.get(metric, math.nan)


@dataclass(frozen=True)
class PowerResult:
    rows: list[Row]
    windows: int
    window_rows: int
    reference_rows: int
    train_rows: int
    config: DriftConfig
    reference_scores: str
    max_recall_drop: float
    seconds: float

    def hurts(self, row: Row) -> bool:
        return row.delta("recall") < -self.max_recall_drop


@dataclass(frozen=True)
class _Reference:
    scaler: AmountScaler
    X: pd.DataFrame  # the training rows' FEATURES
    fitted: FittedForest
    threshold: float


def _reference_model(seed: int, train_rows: int, trees: int) -> _Reference:
    """The default forest trained on `train_rows` of the `stable` reference period, its threshold chosen
    on its out-of-bag scores by F1, as training chooses it."""
    training = scenarios.month_frame(scenarios.named("stable", seed=seed), 0, train_rows)
    scaler = AmountScaler.fit(training["Amount"].to_numpy())
    X = scenarios.model_inputs(training, scaler)
    y = X.pop(LABEL).to_numpy()
    fitted = fit_forest(X, y, TrainParams(n_estimators=trees, seed=seed), say=lambda _line: None)
    return _Reference(scaler, X, fitted, ev.choose_threshold(y, fitted.oob_proba, "f1").threshold)


def measure(windows: int = 30, rows: int = 10_000, reference_rows: int = 50_000, train_rows: int = 200_000,
            trees: int = 100, changes: Sequence[Change] = CHANGES, seed: int = 0, config: DriftConfig | None = None,
            reference_scores: str = "in-sample", max_recall_drop: float | None = None) -> PowerResult:
    """Run every change over `windows` windows; see the module docstring.

    Args:
        windows: windows per change; window k of every change has the same base traffic.
        rows: rows per window.
        reference_rows: rows of the drift reference (a sample of the training rows).
        train_rows: rows the forest is trained on (the reference period of the `stable` scenario).
        trees: the forest's trees (the default training forest has 100).
        changes: the table's rows.
        seed: shifts every seed, for an independent replication.
        config: the drift check's options (default: the shipped drift config).
        reference_scores: "in-sample" (the model's own scores on its training rows, as the promotion gate
            stores them in the drift reference) or "oob" (their out-of-bag scores).
        max_recall_drop: what "hurts" means (default: the shipped promotion config's margin).
    """
    from monitoring.gate import GateConfig

    started = time.perf_counter()
    config = config or DriftConfig.load(settings.drift_config_path())
    if max_recall_drop is None:
        max_recall_drop = GateConfig.load(settings.promotion_config_path()).max_recall_drop
    base, ref = scenarios.named("stable", seed=seed), _reference_model(seed, train_rows, trees)
    scaler, X, model, oob, threshold = ref.scaler, ref.X, ref.fitted.model, ref.fitted.oob_proba, ref.threshold
    sample = np.random.default_rng(seed).choice(len(X), size=min(reference_rows, len(X)), replace=False)
    reference = X.iloc[np.sort(sample)]
    if reference_scores == "oob":
        ref_scores = np.nan_to_num(oob[np.sort(sample)], nan=0.0)
    else:
        ref_scores = model.predict_proba(reference)[:, 1]
    features = list(config.features)
    plain = KSDrift(reference[features], features=features, p_val=config.ks_pvalue_threshold, correction="none")
    score_detector = KSDrift(ref_scores, features=[SCORE], p_val=config.ks_pvalue_threshold, correction="none")

    unchanged: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # window k -> (labels, scores) without a change

    def baseline(k: int) -> tuple[np.ndarray, np.ndarray]:
        if k not in unchanged:
            inputs = scenarios.inputs(base.with_options(seed=seed + 1 + k, months=1), 1, scaler, rows)
            unchanged[k] = inputs[LABEL].to_numpy(), model.predict_proba(inputs[list(FEATURES)])[:, 1]
        return unchanged[k]

    out = [Row(change) for change in changes]
    for row in out:
        scenario = scenarios.named("stable", seed=seed, months=1, **row.change.options)
        truth, scored = [], []
        for k in range(windows):
            # Window k of every change draws the same base rows (month 1 of the scenario at seed + 1 + k).
            inputs = scenarios.inputs(scenario.with_options(seed=seed + 1 + k), 1, scaler, rows)
            p = model.predict_proba(inputs[list(FEATURES)])[:, 1]
            scores = plain.score(inputs[features])
            if config.test_score:
                scores = scores + score_detector.score(p[:, None])
            p_only = decide(scores, p_val=config.ks_pvalue_threshold, correction=config.correction)
            floored = decide(scores, p_val=config.ks_pvalue_threshold, correction=config.correction,
                             min_ks_statistic=config.min_ks_statistic, min_distance=config.min_distance)
            row.windows += 1
            row.flagged_p += p_only.status == "drift"
            row.flagged_floor += floored.status == "drift"
            row.flagged_original += bool((np.asarray(scores.pvalues[:len(features)]) < ORIGINAL_P).any())
            truth.append(inputs[LABEL].to_numpy())
            scored.append(p)
        row.after = ev.evaluate_scores(np.concatenate(truth), np.concatenate(scored), threshold)
        row.before = ev.evaluate_scores(np.concatenate([baseline(k)[0] for k in range(windows)]),
                                        np.concatenate([baseline(k)[1] for k in range(windows)]), threshold)
    return PowerResult(out, windows, rows, len(reference), train_rows, config, reference_scores, max_recall_drop,
                       time.perf_counter() - started)


# The performance check's traffic: stable, and new fraud patterns as in `CHANGES`.
PERFORMANCE_TRAFFIC: tuple[Change, ...] = (
    Change("stable", 0, "", {}),
    *(Change("new pattern", share, "of frauds", {"pattern_month": 1, "pattern_share": share, "pattern_max": share})
      for share in (0.2, 0.5, 0.8)),
)


@dataclass
class AlarmRow:
    traffic: Change
    windows: int = 0
    degraded: int = 0
    inconclusive: int = 0
    frauds: list[int] = field(default_factory=list)
    recall: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class AlarmResult:
    rows: list[AlarmRow]
    window_rows: int
    holdouts: list[dict]  # window k's hold-out figures
    holdout_rows: int
    config: perf.PerformanceConfig
    seconds: float


def performance_alarms(windows: int = 30, rows: int = 50_000, train_rows: int = 200_000, trees: int = 100,
                       traffic: Sequence[Change] = PERFORMANCE_TRAFFIC, seed: int = 0,
                       config: perf.PerformanceConfig | None = None) -> AlarmResult:
    """How often the performance check says "degraded" on each kind of traffic; see the module docstring.

    The model is trained on `train_rows` of the reference period, with its threshold chosen on its
    out-of-bag scores. Each window is judged against hold-out figures of its own: the model's on a fresh
    draw of a quarter as many rows of the reference period (the training's time split holds out a fifth
    of the file), so the false-alarm rate includes the noise of the hold-out figures themselves.
    """
    started = time.perf_counter()
    config = config or perf.PerformanceConfig.load(settings.performance_config_path())
    base, ref = scenarios.named("stable", seed=seed), _reference_model(seed, train_rows, trees)
    scaler, fitted, threshold = ref.scaler, ref.fitted, ref.threshold
    holdout_rows = max(train_rows // 4, 1)

    def holdout(k: int) -> dict:
        held = scenarios.inputs(base.with_options(seed=seed + 10_000 + k), 0, scaler, holdout_rows)
        return ev.evaluate_scores(held[LABEL].to_numpy(), fitted.model.predict_proba(held[list(FEATURES)])[:, 1],
                                  threshold)

    holdouts = [holdout(k) for k in range(windows)]
    out = [AlarmRow(kind) for kind in traffic]
    for row in out:
        scenario = scenarios.named("stable", seed=seed, months=1, **row.traffic.options)
        for k in range(windows):
            window = scenario.with_options(seed=seed + 1 + k)
            frame = scenarios.month_frame(window, 1, rows)
            p = fitted.model.predict_proba(scenarios.model_inputs(frame, scaler)[list(FEATURES)])[:, 1]
            known = scenarios.labels(window, frame, 1)["label"].to_numpy()  # every label matured
            served = perf.figures(known, (p >= threshold).astype(np.int64), p)
            verdict = perf.judge(served, holdouts[k], known, p, config)
            row.windows += 1
            row.degraded += verdict.status == perf.DEGRADED
            row.inconclusive += verdict.status == perf.INCONCLUSIVE
            row.frauds.append(served["frauds"])
            row.recall.append(served["recall"])
    return AlarmResult(out, rows, holdouts, holdout_rows, config, time.perf_counter() - started)


def _median(result: AlarmResult, metric: str) -> float:
    return float(np.median([h[metric] for h in result.holdouts]))


def format_alarms(result: AlarmResult) -> str:
    """The performance check's table (markdown)."""
    c = result.config
    lines = [
        f"performance check: windows of {result.window_rows:,} rows with every label matured, each against "
        f"hold-out figures on {result.holdout_rows:,} other rows (median recall {_median(result, 'recall'):.3f}, "
        f"average precision {_median(result, 'average_precision'):.3f}); margins "
        f"{c.recall_margin:g} / {c.average_precision_margin:g} "
        f"at alpha {c.alpha:g}, min_frauds {c.min_frauds}; {result.seconds:.0f} s",
        "",
        "| traffic | windows | degraded | inconclusive | known frauds (median) | realised recall (median) |",
        "|---|---|---|---|---|---|",
    ]
    for row in result.rows:
        lines.append(
            f"| {row.traffic.label} | {row.windows} | {row.degraded} ({row.degraded / row.windows:.0%}) | "
            f"{row.inconclusive} | {np.median(row.frauds):.0f} | {np.nanmedian(row.recall):.3f} |")
    return "\n".join(lines)


def format_table(result: PowerResult) -> str:
    """The table, one change per line (markdown)."""
    floor = (f"min_distance {result.config.min_distance:g} sd" if result.config.min_distance
             else "no floor")
    lines = [
        f"{result.windows} windows of {result.window_rows:,} rows per change against a {result.reference_rows:,}-row "
        f"reference; {result.config.correction} at p_val={result.config.ks_pvalue_threshold:g} over "
        f"{len(result.config.features) + result.config.test_score} tests; a forest trained on "
        f"{result.train_rows:,} rows; reference scores {result.reference_scores}; {result.seconds:.0f} s",
        "",
        f"| change | flagged, p-value only | flagged, with the floor ({floor}) | original rule | "
        "recall | precision | average precision | hurts recall? |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in result.rows:
        lines.append(
            f"| {row.change.label} | {row.rate(row.flagged_p):.0%} | {row.rate(row.flagged_floor):.0%} | "
            f"{row.rate(row.flagged_original):.0%} | {row.after['recall']:.3f} ({row.delta('recall'):+.3f}) | "
            f"{row.after['precision']:.3f} ({row.delta('precision'):+.3f}) | "
            f"{row.after['average_precision']:.3f} ({row.delta('average_precision'):+.3f}) | "
            f"{'yes' if result.hurts(row) else 'no'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m monitoring.power", description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=30, help="windows per change (default 30)")
    parser.add_argument("--rows", type=int, default=10_000, help="rows per window (default 10000)")
    parser.add_argument("--reference-rows", "--reference_rows", dest="reference_rows", type=int, default=50_000)
    parser.add_argument("--train-rows", "--train_rows", dest="train_rows", type=int, default=200_000)
    parser.add_argument("--trees", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-distance", "--min_distance", dest="min_distance", type=float, default=None,
                        help="effect-size floor to judge with (default: the drift config's)")
    parser.add_argument("--reference-scores", "--reference_scores", dest="reference_scores", default="in-sample",
                        choices=("oob", "in-sample"))
    parser.add_argument("--performance-windows", "--performance_windows", dest="performance_windows", type=int,
                        default=30, help="windows per traffic kind of the performance check's table (default 30; "
                                         "0: skip the table)")
    parser.add_argument("--performance-rows", "--performance_rows", dest="performance_rows", type=int,
                        default=50_000, help="rows per window of the performance check's table (default 50000)")
    args = parser.parse_args(argv)
    if min(args.windows, args.rows, args.reference_rows, args.train_rows, args.trees, args.performance_rows) < 1:
        parser.error("windows, rows, reference rows, train rows, trees and performance rows must be positive")
    if args.performance_windows < 0:
        parser.error("performance windows must be 0 or more")
    config = DriftConfig.load(settings.drift_config_path())
    if args.min_distance is not None:
        config = DriftConfig(**{**config.__dict__, "min_distance": args.min_distance}).validated("--min-distance")
    result = measure(args.windows, args.rows, args.reference_rows, args.train_rows, args.trees, seed=args.seed,
                     config=config, reference_scores=args.reference_scores)
    print(format_table(result), flush=True)
    if args.performance_windows:
        alarms = performance_alarms(args.performance_windows, args.performance_rows, args.train_rows, args.trees,
                                    seed=args.seed)
        print()
        print(format_alarms(alarms))
    return 0


if __name__ == "__main__":
    sys.exit(main())
