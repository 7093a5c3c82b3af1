"""The drift check's statistical quality on simulated traffic: false-alarm rate and power.

Deterministic: the reference and every window come from `training.generate.drift_batch` with fixed
seeds. Month 0 windows have the reference distribution, so every alarm there is false; month m
windows carry the simulator's drift, so the share of alarms there is the power. Each rule is judged
on the same p-values:

- `bonferroni`, `fdr`: the drift check's corrections at `p_val`, over the 29 features;
- `original`: the rule this project replaced, "any feature with p < 0.01", no correction.

`python -m monitoring.quality` prints the table quoted in
docs/decisions/014-drift-multiple-testing-correction.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from common.features import AmountScaler
from common.schema import FEATURES
from monitoring.detector import KSDrift, corrected_threshold
from training.generate import drift_batch, generate_frame

ORIGINAL_P = 0.01


@dataclass(frozen=True)
class QualityResult:
    windows: int
    rows: int
    reference_rows: int
    p_val: float
    months: tuple[int, ...]
    # alarms[rule][month] = number of windows that alarmed
    alarms: dict[str, dict[int, int]]
    seconds: float

    def rate(self, rule: str, month: int) -> float:
        return self.alarms[rule][month] / self.windows


def _alarms(pvalues: np.ndarray, p_val: float) -> dict[str, bool]:
    return {
        "bonferroni": bool((pvalues <= corrected_threshold(pvalues, p_val, "bonferroni")).any()),
        "fdr": bool((pvalues <= corrected_threshold(pvalues, p_val, "fdr")).any()),
        "original": bool((pvalues < ORIGINAL_P).any()),
    }


def simulate(windows: int = 200, rows: int = 10_000, reference_rows: int = 10_000, months: Sequence[int] = (0, 1),
             p_val: float = 0.01, seed: int = 0) -> QualityResult:
    """Count alarms of each rule over `windows` simulated windows per month.

    Args:
        windows: windows per month; window k of every month shares its base traffic (seed + 1 + k).
        rows: rows per window.
        reference_rows: rows in the reference (its own seed, disjoint from the windows').
        months: simulator months; 0 is the no-drift control.
        p_val: the corrected rules' level.
        seed: shifts every seed, for an independent replication.
    """
    started = time.perf_counter()
    reference_seed = 1_000_000 + seed
    scaler = AmountScaler.fit(generate_frame(reference_rows, seed=reference_seed)["Amount"].to_numpy())
    reference = drift_batch(reference_rows, 0, reference_seed, scaler)[list(FEATURES)]
    detector = KSDrift(reference, p_val=p_val, correction="none")
    alarms = {rule: dict.fromkeys(months, 0) for rule in ("bonferroni", "fdr", "original")}
    for k in range(windows):
        for month in months:
            window = drift_batch(rows, month, seed + 1 + k, scaler)[list(FEATURES)]
            pvalues = np.asarray(detector.score(window).pvalues)
            for rule, alarmed in _alarms(pvalues, p_val).items():
                alarms[rule][month] += alarmed
    return QualityResult(windows, rows, reference_rows, p_val, tuple(months), alarms, time.perf_counter() - started)


def format_table(result: QualityResult) -> str:
    head = f"{'rule':<34}" + "".join(f"{'month ' + str(m):>14}" for m in result.months)
    rules = {
        "bonferroni": f"bonferroni, p_val={result.p_val:g}",
        "fdr": f"benjamini-hochberg, q={result.p_val:g}",
        "original": f"original: any p < {ORIGINAL_P:g}, no correction",
    }
    lines = [f"{result.windows} windows of {result.rows} rows per month vs a {result.reference_rows}-row reference, "
             f"{len(FEATURES)} features; alarm share (month 0 = false alarms, others = power); "
             f"{result.seconds:.1f}s", head]
    for rule, label in rules.items():
        cells = "".join(f"{result.rate(rule, m):>9.1%} {result.alarms[rule][m]:>4}" for m in result.months)
        lines.append(f"{label:<34}{cells}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m monitoring.quality", description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=200, help="windows per month (default 200)")
    parser.add_argument("--rows", type=int, default=10_000, help="rows per window (default 10000)")
    parser.add_argument("--reference-rows", "--reference_rows", dest="reference_rows", type=int, default=10_000)
    parser.add_argument("--months", type=int, nargs="+", default=[0, 1], help="simulator months (default 0 1)")
    parser.add_argument("--p-val", "--p_val", dest="p_val", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.windows < 1 or args.rows < 1 or args.reference_rows < 1 or not 0 < args.p_val < 1:
        parser.error("windows, rows and reference rows must be positive and p_val within (0, 1)")
    print(format_table(simulate(args.windows, args.rows, args.reference_rows, args.months, args.p_val, args.seed)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
