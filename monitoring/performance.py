"""Realised performance: how well each served model version does on the traffic it scored, from the
labels that have arrived since.

`python -m monitoring.performance [--window N] [--since T|promotion] [--as-of T]`, or
`mlflow run . -e performance --env-manager local`.

Labels. A row's label is known once `/feedback` gave it one (a chargeback, or a confirmation), or,
for a row without one, once it is older than `maturity_days` at the check's clock (`--as-of`,
default now): no chargeback came, so it was legitimate. Rows neither labelled nor mature are pending
and left out; the share that is known is reported as `coverage`.

For each model version that served rows of the window: rows, known rows, coverage, known frauds,
fraud rate, and precision, recall and average precision of what it served (the logged `decision`,
made at its threshold, and `score`); and the challenger's figures on the same rows from its shadow
scores, for each challenger version that shadowed them.

Verdict, for the Production version (`performance_degraded`):
- `inconclusive` while its rows hold fewer than `min_frauds` known frauds (the number needed is said);
- `true` when its realised recall is below its hold-out recall (the version's `recall` tag, measured
  at training) by more than `recall_margin`, and a one-sided binomial test of the caught frauds
  against that bound rejects at `alpha` (scipy.stats.binomtest); or when its average precision is
  below its hold-out figure by more than `average_precision_margin` at the same confidence (a
  bootstrap of the known rows, frauds and legitimate rows resampled separately);
- `false` otherwise.
The false-alarm rate is therefore at most `alpha` per metric while the hold-out figures hold.

Every check is one MLflow run in experiment `performance-monitoring` (metrics by role and version:
`champion.recall`, `v3.recall`, `challenger.v4.recall` ...; tag `performance_degraded`; artifact
`performance_result.json`, also written to `--output-dir`).

Exit codes: 0 not degraded, 3 degraded, 4 inconclusive, 2 bad arguments or config, 1 the check could
not run. With `--exit-zero true` every completed check exits 0 (the MLproject entry point sets it).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import traceback
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats
from sklearn.metrics import average_precision_score

from common import registry, settings
from common.archive import read_log_frame
from common.schema import LABEL
from common.store import RequestStore, StoreUnavailable, describe
from common.text import cli_bool, first_line
from monitoring.runs import log, start_run
from monitoring.window import iso, parse_since, parse_time

EXIT_FINE, EXIT_ERROR, EXIT_USAGE, EXIT_DEGRADED, EXIT_INCONCLUSIVE = 0, 1, 2, 3, 4
DEGRADED, FINE, INCONCLUSIVE = "true", "false", "inconclusive"
EXIT_CODES = {FINE: EXIT_FINE, DEGRADED: EXIT_DEGRADED, INCONCLUSIVE: EXIT_INCONCLUSIVE}
# The verdict in the run's name, e.g. `performance · v3 · degraded`.
VERDICT_WORDS = {DEGRADED: "degraded", FINE: "not degraded", INCONCLUSIVE: "inconclusive"}
RESULT_FILE = "performance_result.json"
DAY = 86_400.0
COLUMNS = ("ts", "model_version", "score", "decision", LABEL, "shadow_score", "shadow_decision", "shadow_version")


class PerformanceConfigError(ValueError):
    """The performance config or the check's arguments are invalid (exit code 2)."""


class PerformanceCheckError(RuntimeError):
    """The check could not run: the request log or the registry is unavailable (exit code 1)."""


@dataclass(frozen=True)
class PerformanceConfig:
    """`data/performance_config.json`."""

    maturity_days: float = 90.0
    default_window_rows: int = 200_000
    recall_margin: float = 0.10
    average_precision_margin: float = 0.10
    alpha: float = 0.01
    min_frauds: int = 30
    bootstrap_resamples: int = 200

    @classmethod
    def load(cls, path: Path) -> PerformanceConfig:
        """Read and validate the config.

        Raises:
            PerformanceConfigError: missing, malformed, unknown keys, or a value out of range.
        """
        try:
            raw = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise PerformanceConfigError(f"performance config {path} does not exist (PERFORMANCE_CONFIG)") from None
        except (OSError, ValueError) as exc:
            raise PerformanceConfigError(f"performance config {path} is not valid JSON: {exc}") from None
        known = set(cls.__dataclass_fields__)
        if not isinstance(raw, dict) or set(raw) - known:
            raise PerformanceConfigError(f"performance config {path} must be an object with keys from "
                                         f"{sorted(known)}")
        try:
            config = cls(**{k: (int(v) if isinstance(cls.__dataclass_fields__[k].default, int) else float(v))
                            for k, v in raw.items()})
        except (TypeError, ValueError) as exc:
            raise PerformanceConfigError(f"performance config {path}: {exc}") from None
        return config.validated(str(path))

    def validated(self, origin: str = "performance config") -> PerformanceConfig:
        checks = [
            (self.maturity_days >= 0, f"maturity_days must be 0 or more, got {self.maturity_days}"),
            (self.default_window_rows >= 1, f"default_window_rows must be at least 1, got {self.default_window_rows}"),
            (0 <= self.recall_margin <= 1, f"recall_margin must be within [0, 1], got {self.recall_margin}"),
            (0 <= self.average_precision_margin <= 1,
             f"average_precision_margin must be within [0, 1], got {self.average_precision_margin}"),
            (0 < self.alpha < 1, f"alpha must be within (0, 1), got {self.alpha}"),
            (self.min_frauds >= 1, f"min_frauds must be at least 1, got {self.min_frauds}"),
            (self.bootstrap_resamples >= 20, f"bootstrap_resamples must be at least 20, got "
                                             f"{self.bootstrap_resamples}"),
        ]
        for ok, message in checks:
            if not ok:
                raise PerformanceConfigError(f"{origin}: {message}")
        return self


# --- the figures -------------------------------------------------------------------------------------


def known_labels(frame: pd.DataFrame, as_of: float, maturity_days: float) -> np.ndarray:
    """Each row's known label: its feedback label, else 0 once older than the maturity window, else -1
    (pending)."""
    label = frame[LABEL].to_numpy(dtype=np.float64)
    mature = frame["ts"].to_numpy(dtype=np.float64) <= as_of - maturity_days * DAY
    return np.where(np.isfinite(label), label, np.where(mature, 0.0, -1.0)).astype(np.int64)


def figures(y: np.ndarray, decision: np.ndarray, score: np.ndarray) -> dict[str, float]:
    """Precision, recall and average precision of served decisions and scores against known labels."""
    y, decision = np.asarray(y, dtype=np.int64), np.asarray(decision, dtype=np.int64)
    tp = int(((decision == 1) & (y == 1)).sum())
    fp = int(((decision == 1) & (y == 0)).sum())
    frauds = int(y.sum())
    both = 0 < frauds < len(y)
    return {
        "known_rows": len(y), "frauds": frauds, "caught": tp, "false_alarms": fp,
        "fraud_rate": frauds / len(y) if len(y) else math.nan,
        "recall": tp / frauds if frauds else math.nan,
        "precision": tp / (tp + fp) if tp + fp else math.nan,
        "average_precision": float(average_precision_score(y, score)) if both else math.nan,
    }


def average_precision_upper(y: np.ndarray, score: np.ndarray, confidence: float, resamples: int,
                            seed: int = 0) -> float:
    """An upper confidence bound on average precision: the `confidence` quantile of a bootstrap in which
    frauds and legitimate rows are resampled separately (every resample keeps both classes)."""
    rng = np.random.default_rng(seed)
    frauds, legit = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    values = []
    for _ in range(resamples):
        pick = np.concatenate([rng.choice(frauds, frauds.size), rng.choice(legit, legit.size)])
        values.append(average_precision_score(y[pick], score[pick]))
    return float(np.quantile(values, confidence))


@dataclass(frozen=True)
class Verdict:
    status: str  # DEGRADED, FINE or INCONCLUSIVE
    reason: str
    tests: dict = field(default_factory=dict)


def judge(served: dict[str, float], holdout: dict[str, float], y: np.ndarray, score: np.ndarray,
          config: PerformanceConfig) -> Verdict:
    """The verdict on one version's realised figures against its hold-out figures (see the module docstring)."""
    frauds, caught = served["frauds"], served["caught"]
    if frauds < config.min_frauds:
        return Verdict(INCONCLUSIVE, f"too few matured frauds: {frauds} of the {config.min_frauds} needed "
                                     "(min_frauds)")
    tests, degraded = {}, []
    if math.isfinite(holdout.get("recall", math.nan)):
        bound = max(holdout["recall"] - config.recall_margin, 0.0)
        pvalue = stats.binomtest(caught, frauds, bound, alternative="less").pvalue if bound > 0 else 1.0
        tests["recall"] = {"realised": served["recall"], "holdout": holdout["recall"], "bound": bound,
                           "pvalue": float(pvalue)}
        if pvalue < config.alpha:
            degraded.append(f"recall {served['recall']:.3f} ({caught} of {frauds} frauds caught) is below its "
                            f"hold-out {holdout['recall']:.3f} - {config.recall_margin:g} (p = {pvalue:.2g})")
    if math.isfinite(holdout.get("average_precision", math.nan)) and math.isfinite(served["average_precision"]):
        bound = holdout["average_precision"] - config.average_precision_margin
        upper = average_precision_upper(y, score, 1 - config.alpha, config.bootstrap_resamples)
        tests["average_precision"] = {"realised": served["average_precision"],
                                      "holdout": holdout["average_precision"], "bound": bound,
                                      "upper_confidence": upper}
        if upper < bound:
            degraded.append(f"average precision {served['average_precision']:.3f} (at most {upper:.3f} at "
                            f"{1 - config.alpha:.0%} confidence) is below its hold-out "
                            f"{holdout['average_precision']:.3f} - {config.average_precision_margin:g}")
    if not tests:
        return Verdict(INCONCLUSIVE, "the version has no hold-out figures (tags recall, average_precision) to "
                                     "compare with")
    if degraded:
        return Verdict(DEGRADED, "; ".join(degraded), tests)
    return Verdict(FINE, f"within the margins of its hold-out figures on {frauds} matured frauds", tests)


# --- the check ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PerformanceParams:
    """The check's options; names match the CLI flags and the MLproject parameters."""

    window: int | None = None
    since: str | None = None
    as_of: str | None = None
    maturity_days: float | None = None
    output_dir: Path = Path()
    config: Path | None = None
    request_log: str | None = None
    model_name: str | None = None
    tracking_uri: str | None = None


@dataclass(frozen=True)
class PerformanceResult:
    verdict: Verdict
    run_id: str
    result_path: Path
    summary: dict

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.verdict.status]


def _holdout(mlflow_client, name: str, version: str) -> dict[str, float]:
    from mlflow.exceptions import MlflowException

    try:
        tags = mlflow_client.get_model_version(name, str(version)).tags or {}
    except MlflowException:
        return {}
    out = {}
    for metric in ("recall", "average_precision", "precision"):
        try:
            out[metric] = float(tags[metric])
        except (KeyError, TypeError, ValueError):
            continue
    return out


def _read(request_log: str, last_n: int | None, since_ts: float | None) -> tuple[pd.DataFrame, dict[str, int]]:
    """The window from the live log and its archive (common/archive.py), and the rows from each."""
    store = RequestStore(request_log, create=False)
    try:
        present = store.columns()
    except StoreUnavailable as exc:
        raise PerformanceCheckError(str(exc)) from None
    finally:
        store.dispose()
    if not present:
        return pd.DataFrame(columns=list(COLUMNS)), {"live": 0, "archive": 0}
    wanted = [c for c in COLUMNS if c in present]  # a log from before shadow scoring has no shadow columns
    try:
        frame, sources = read_log_frame(request_log, wanted, last_n=last_n, since_ts=since_ts)
    except StoreUnavailable as exc:
        raise PerformanceCheckError(str(exc)) from None
    for column in COLUMNS:
        if column not in frame:
            frame[column] = None
    return frame, sources


def measure(frame: pd.DataFrame, as_of: float, config: PerformanceConfig) -> dict:
    """Per served version: its figures, and each challenger's on the same rows (see the module docstring)."""
    y_all = known_labels(frame, as_of, config.maturity_days)
    out = {}
    for version, rows in frame.groupby(frame["model_version"].astype(str), sort=True):
        y = y_all[rows.index.to_numpy()]
        known = y >= 0
        served = figures(y[known], rows["decision"].to_numpy()[known], rows["score"].to_numpy(np.float64)[known])
        served.update(rows=len(rows), coverage=float(known.mean()) if len(rows) else math.nan)
        shadows = {}
        shadow_version = rows["shadow_version"]
        for challenger, part in rows[shadow_version.notna()].groupby(shadow_version.dropna().astype(str)):
            yk = y_all[part.index.to_numpy()]
            mask = yk >= 0
            shadows[challenger] = {
                **figures(yk[mask], part["shadow_decision"].to_numpy(np.float64)[mask],
                          part["shadow_score"].to_numpy(np.float64)[mask]),
                # The champion on exactly these rows, for a like-for-like comparison.
                "champion": figures(yk[mask], part["decision"].to_numpy()[mask],
                                    part["score"].to_numpy(np.float64)[mask]),
                "rows": len(part)}
        out[version] = {"served": served, "challengers": shadows, "y": y[known],
                        "score": rows["score"].to_numpy(np.float64)[known]}
    return out


def check_performance(params: PerformanceParams) -> PerformanceResult:
    """Run one check and log it as one MLflow run.

    Raises:
        PerformanceConfigError: invalid config or arguments (nothing logged).
        PerformanceCheckError: the request log or the registry is unavailable.
    """
    started = time.perf_counter()
    config = PerformanceConfig.load(params.config or settings.performance_config_path())
    if params.maturity_days is not None:
        config = PerformanceConfig(**{**asdict(config), "maturity_days": params.maturity_days}).validated(
            "--maturity-days")
    uri = params.tracking_uri or settings.tracking_uri()
    mlflow_client = registry.client(uri)
    name = params.model_name or settings.model_name()
    request_log = params.request_log or settings.request_log_url()
    if "://" not in request_log and not Path(request_log).is_file():
        raise PerformanceCheckError(f"request log {request_log} does not exist (LATEST_DB): no traffic has been logged")
    production = registry.production_version(mlflow_client, name)
    challenger = registry.version_in_stage(mlflow_client, name, "Staging")
    try:
        since_ts, since_text = parse_since(params.since, production)
        as_of = time.time() if not params.as_of else parse_time(params.as_of, "--as-of")
    except ValueError as exc:
        raise PerformanceConfigError(str(exc)) from None
    rows = config.default_window_rows if params.window is None else params.window
    if rows < 0:
        raise PerformanceConfigError(f"--window must be 0 (no row limit) or more, got {rows}")
    frame, sources = _read(request_log, rows or None, since_ts)
    by_version = measure(frame, as_of, config)

    champion = str(production.version) if production is not None else None
    if champion is None:
        verdict = Verdict(INCONCLUSIVE, f"{name} has no Production version to judge")
    elif champion not in by_version:
        verdict = Verdict(INCONCLUSIVE, f"the window holds no row served by Production v{champion}")
    else:
        mine = by_version[champion]
        verdict = judge(mine["served"], _holdout(mlflow_client, name, champion), mine["y"], mine["score"], config)

    window = (f"last {rows} rows" if rows else "all rows") + (f" {since_text}" if since_text else "")
    summary = {
        "performance_degraded": verdict.status, "reason": verdict.reason, "tests": verdict.tests,
        "model_name": name, "production_version": champion,
        "challenger_version": str(challenger.version) if challenger is not None else None,
        "as_of": iso(as_of), "window": {"description": window, "rows": len(frame), "sources": sources},
        "maturity_days": config.maturity_days, "request_log": describe(request_log),
        "versions": {v: {"served": _jsonable(d["served"]), "holdout": _holdout(mlflow_client, name, v),
                         "challengers": {c: _jsonable(f) for c, f in d["challengers"].items()}}
                     for v, d in by_version.items()},
        "config": asdict(config),
    }
    run_name = f"performance · v{champion or 'none'} · {VERDICT_WORDS[verdict.status]}"
    run_id = start_run(mlflow_client, registry.PERFORMANCE_EXPERIMENT, run_name,
                       {"production_version": champion or "none"}, uri)
    try:
        summary["run_id"] = run_id
        summary["seconds"] = round(time.perf_counter() - started, 3)
        result_path = _write(Path(params.output_dir) / RESULT_FILE, summary)
        log(mlflow_client, run_id,
            params={"window": window, "as_of": iso(as_of), "request_log": describe(request_log), "model_name": name,
                    **{f"config.{k}": v for k, v in asdict(config).items()}},
            metrics=_metrics(summary, champion, str(challenger.version) if challenger is not None else None),
            tags={"performance_degraded": verdict.status, "reason": verdict.reason[:4900]})
        mlflow_client.log_artifact(run_id, str(result_path))
    except BaseException as exc:
        mlflow_client.set_tag(run_id, "error", first_line(exc, 4900))
        mlflow_client.set_terminated(run_id, "FAILED")
        raise
    mlflow_client.set_terminated(run_id, "FINISHED")
    return PerformanceResult(verdict, run_id, result_path, summary)


def _metrics(summary: dict, champion: str | None, challenger: str | None) -> dict[str, float]:
    out: dict[str, float] = {}
    keys = ("recall", "precision", "average_precision", "coverage", "frauds", "known_rows", "rows", "fraud_rate")
    for version, body in summary["versions"].items():
        served = body["served"]
        for key in keys:
            out[f"v{version}.{key}"] = served.get(key)
            if version == champion:
                out[f"champion.{key}"] = served.get(key)
        for other, shadow in body["challengers"].items():
            for key in ("recall", "precision", "average_precision", "frauds", "rows"):
                out[f"challenger.v{other}.{key}"] = shadow.get(key)
                if other == challenger and version == champion:
                    out[f"challenger.{key}"] = shadow.get(key)
    return {k: v for k, v in out.items() if isinstance(v, (int, float)) and math.isfinite(v)}


def _jsonable(body: dict) -> dict:
    return {k: (_jsonable(v) if isinstance(v, dict) else
                (None if isinstance(v, float) and not math.isfinite(v) else v)) for k, v in body.items()}


def _write(path: Path, body: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(body, indent=2, default=str) + "\n")
    tmp.replace(path)
    return path


# --- CLI ---------------------------------------------------------------------------------------------


def _optional(kind):
    def parse(text: str):
        return None if str(text).strip() == "" else kind(text)
    parse.__name__ = kind.__name__
    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m monitoring.performance", description=__doc__.splitlines()[0],
                                     epilog="exit codes: 0 not degraded, 3 degraded, 4 inconclusive, 2 bad arguments "
                                            "or config, 1 the check could not run")
    add = parser.add_argument
    add("--window", type=_optional(int), default=None,
        help="newest rows to judge (default: default_window_rows of the config; 0 = no row limit)")
    add("--since", default=None, help="only rows logged at or after this: epoch seconds, ISO-8601, or 'promotion'")
    add("--as-of", "--as_of", dest="as_of", default=None,
        help="the check's clock for the maturity window (epoch or ISO-8601; default now)")
    add("--maturity-days", "--maturity_days", dest="maturity_days", type=_optional(float), default=None,
        help="days after which a row without a chargeback counts as legitimate (default: the config's)")
    add("--output-dir", "--output_dir", dest="output_dir", type=Path, default=Path(),
        help="where performance_result.json is written")
    add("--config", type=_optional(Path), default=None, help="performance config (default: PERFORMANCE_CONFIG)")
    add("--request-log", "--request_log", dest="request_log", type=_optional(str), default=None,
        help="request log path or URL (default: LATEST_DB)")
    add("--model-name", "--model_name", dest="model_name", type=_optional(str), default=None,
        help="registered model (default: MODEL_NAME)")
    add("--exit-zero", "--exit_zero", dest="exit_zero", type=cli_bool, default=False,
        help="exit 0 for every completed check (errors still exit 1 or 2)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    params = PerformanceParams(**{k: v for k, v in vars(args).items() if k != "exit_zero"})
    try:
        result = check_performance(params)
    except PerformanceConfigError as exc:
        print(f"performance: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except PerformanceCheckError as exc:
        print(f"performance: the check could not run: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except Exception as exc:
        traceback.print_exc()
        print(f"performance: the check failed unexpectedly: {type(exc).__name__}: {first_line(exc)}", file=sys.stderr)
        return EXIT_ERROR
    summary = result.summary
    print(f"performance check: degraded={result.verdict.status} - {result.verdict.reason}")
    for version, body in summary["versions"].items():
        served = body["served"]
        role = " (Production)" if version == summary["production_version"] else ""
        print(f"  v{version}{role}: {served['rows']} rows, coverage {_pct(served['coverage'])}, "
              f"{served['frauds']} known frauds; recall {_num(served['recall'])} (hold-out "
              f"{_num(body['holdout'].get('recall'))}), precision {_num(served['precision'])}, "
              f"average precision {_num(served['average_precision'])}")
        for other, shadow in body["challengers"].items():
            print(f"    challenger v{other} on {shadow['rows']} of these rows: recall {_num(shadow['recall'])}, "
                  f"precision {_num(shadow['precision'])}, average precision {_num(shadow['average_precision'])} "
                  f"(champion on the same rows: recall {_num(shadow['champion']['recall'])})")
    print(f"  MLflow run {result.run_id} (experiment {registry.PERFORMANCE_EXPERIMENT}); wrote {result.result_path}")
    return EXIT_FINE if args.exit_zero else result.exit_code


def _num(value) -> str:
    return "n/a" if value is None or (isinstance(value, float) and not math.isfinite(value)) else f"{value:.3f}"


def _pct(value) -> str:
    return "n/a" if value is None or (isinstance(value, float) and not math.isfinite(value)) else f"{value:.0%}"


if __name__ == "__main__":
    sys.exit(main())
