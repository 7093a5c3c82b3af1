"""The drift check: KS tests of the request log's recent traffic against a reference, as one MLflow run.

`python -m monitoring.drift [--window N] [--since T|promotion] [--reference auto|file|production|db]`,
or `mlflow run . -e drift --env-manager local -P window=N -P since=...`.

- Reference: see `monitoring.reference` (default `auto`: the Production model's training data,
  else the reference database).
- Window: the newest `--window` rows of the request log (LATEST_DB; default: the drift config's
  `default_window_rows`; 0 = no row limit), only those logged at or after `--since` when given (an
  epoch time, an ISO-8601 time, or `promotion` = since the current Production version's promotion).
- Tests: two-sample KS on every feature of the drift config, and on the model's score when
  `test_score` is on: the reference's scores (the Production model's, on the reference rows)
  against the logged `score` of the window rows that the same model version served. All tests
  are corrected together (Bonferroni by default, Benjamini–Hochberg with `fdr`).
- Below `min_window_rows` current rows the check is inconclusive, says why, and is still logged.

Every check is one run in experiment `drift-monitoring` (params, `ks_stat.<test>`,
`ks_pvalue.<test>`, drifted count and share, tag `drift_detected` = true/false/inconclusive,
artifacts `drift_result.json` and `drift_report.html`), named after the rows it compared and its
outcome once it has one: `drift · window 5,000 · drift` (or `no drift`, `inconclusive`; a check
that failed is `drift · error`). Both files are also written to
`--output-dir` (default: the working directory); a failed check writes `status: "error"` there.

Exit codes (`python -m monitoring.drift`):
    0  no drift
    3  drift detected
    4  inconclusive (too few rows in the window)
    2  bad arguments or drift config
    1  the check could not run (request log, registry or reference unavailable; any other error)
With `--exit-zero true` every completed check exits 0 (errors keep 1 and 2). The MLproject entry
point sets it, because `mlflow run` turns any non-zero code into 1 and marks its run failed; there,
branch on `drift_result.json` (`status`, `drift_detected`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from common import settings
from common.schema import FEATURES, SCORE
from common.store import RequestStore, StoreUnavailable, describe
from common.text import cli_bool, first_line, parse_bool
from monitoring import report as html_report
from monitoring.detector import DRIFT, INCONCLUSIVE, NO_DRIFT, DriftReport, KSDrift, normalise_correction
from monitoring.reference import KINDS, ReferenceError, load_reference
from monitoring.window import (
    PendingWindow,
    Window,
    WindowReadError,
    iso,
    needs_production,
    parse_since,
    read_window,
    start_reading,
)

# MLflow (common.registry, monitoring.runs) is imported once the window is being read, so that the
# forked readers read while it loads (docs/decisions/020-drift-check-start-up-and-ks.md).

EXIT_NO_DRIFT = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_DRIFT = 3
EXIT_INCONCLUSIVE = 4
EXIT_CODES = {NO_DRIFT: EXIT_NO_DRIFT, DRIFT: EXIT_DRIFT, INCONCLUSIVE: EXIT_INCONCLUSIVE}

RESULT_FILE = "drift_result.json"
REPORT_FILE = "drift_report.html"
REQUIRED_KEYS = ("features", "ks_pvalue_threshold", "correction", "test_score", "min_window_rows",
                 "min_ks_statistic", "min_distance", "default_window_rows")


class DriftConfigError(ValueError):
    """The drift config or the check's arguments are invalid (exit code 2)."""


class DriftCheckError(RuntimeError):
    """The check could not run: a source is missing or unavailable (exit code 1)."""


@dataclass(frozen=True)
class DriftConfig:
    """`data/drift_config.json`: which features to test and how strictly."""

    features: tuple[str, ...]
    ks_pvalue_threshold: float
    correction: str
    test_score: bool
    min_window_rows: int
    min_ks_statistic: float
    min_distance: float
    default_window_rows: int
    report_features: int = 6

    @classmethod
    def load(cls, path: Path) -> DriftConfig:
        """Read and validate the config.

        Raises:
            DriftConfigError: the file is missing or malformed, or a value is out of range.
        """
        try:
            raw = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise DriftConfigError(f"drift config {path} does not exist (DRIFT_CONFIG)") from None
        except (OSError, ValueError) as exc:
            raise DriftConfigError(f"drift config {path} is not valid JSON: {exc}") from None
        if not isinstance(raw, dict):
            raise DriftConfigError(f"drift config {path} must be a JSON object")
        missing = [k for k in REQUIRED_KEYS if k not in raw]
        if missing:
            raise DriftConfigError(f"drift config {path} lacks keys {missing}")
        try:
            config = cls(
                features=tuple(str(f) for f in raw["features"]),
                ks_pvalue_threshold=float(raw["ks_pvalue_threshold"]),
                correction=str(raw["correction"]),
                test_score=parse_bool(raw["test_score"]),
                min_window_rows=int(raw["min_window_rows"]),
                min_ks_statistic=float(raw["min_ks_statistic"]),
                min_distance=float(raw["min_distance"]),
                default_window_rows=int(raw["default_window_rows"]),
                report_features=int(raw.get("report_features", 6)),
            )
        except (TypeError, ValueError) as exc:
            raise DriftConfigError(f"drift config {path}: {exc}") from None
        return config.validated(str(path))

    def validated(self, origin: str = "drift config") -> DriftConfig:
        """Self, checked. Raises DriftConfigError naming the bad value."""
        unknown = [f for f in self.features if f not in FEATURES]
        checks = [
            (bool(self.features), "features must not be empty"),
            (not unknown, f"features {unknown} are not model inputs ({FEATURES[0]}..{FEATURES[-1]})"),
            (len(set(self.features)) == len(self.features), "features must be unique"),
            (0.0 < self.ks_pvalue_threshold < 1.0, f"ks_pvalue_threshold must be within (0, 1), got "
                                                   f"{self.ks_pvalue_threshold}"),
            (self.min_window_rows >= 1, f"min_window_rows must be at least 1, got {self.min_window_rows}"),
            (0.0 <= self.min_ks_statistic <= 1.0, f"min_ks_statistic must be within [0, 1], got "
                                                  f"{self.min_ks_statistic}"),
            (0.0 <= self.min_distance < math.inf, f"min_distance must be 0 or more standard deviations, got "
                                                  f"{self.min_distance}"),
            (self.default_window_rows >= 1, f"default_window_rows must be at least 1, got "
                                            f"{self.default_window_rows}"),
            (self.report_features >= 0, f"report_features must be 0 or more, got {self.report_features}"),
        ]
        for ok, message in checks:
            if not ok:
                raise DriftConfigError(f"{origin}: {message}")
        try:
            return DriftConfig(**{**self.__dict__, "correction": normalise_correction(self.correction)})
        except ValueError as exc:
            raise DriftConfigError(f"{origin}: {exc}") from None



@dataclass(frozen=True)
class DriftParams:
    """The check's options; names match the CLI flags and the MLproject parameters.

    None means "from the drift config" (or the environment, for locations).
    """

    window: int | None = None
    since: str | None = None
    reference: str = "auto"
    p_val: float | None = None
    correction: str | None = None
    min_ks_statistic: float | None = None
    min_distance: float | None = None
    min_window_rows: int | None = None
    test_score: bool | None = None
    output_dir: Path = Path()
    config: Path | None = None
    request_log: str | None = None
    reference_db: str | None = None
    reference_file: Path | None = None
    model_name: str | None = None
    tracking_uri: str | None = None


@dataclass(frozen=True)
class DriftResult:
    report: DriftReport
    run_id: str
    result_path: Path
    report_path: Path | None
    summary: dict = field(repr=False)

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.report.status]


def resolve_window(window: int | None, since: str | None, config: DriftConfig, production) -> Window:
    rows = config.default_window_rows if window is None else int(window)
    if rows < 0:
        raise DriftConfigError(f"--window must be 0 (no row limit) or more, got {rows}")
    try:
        since_ts, since_text = parse_since(since, production)
    except ValueError as exc:
        raise DriftConfigError(str(exc)) from None
    last_n = rows or None
    parts = [f"last {rows} rows" if last_n else "all rows"] + ([since_text] if since_text else [])
    return Window(last_n, since_ts, " ".join(parts))


def _configured(params: DriftParams) -> DriftConfig:
    config = DriftConfig.load(params.config or settings.drift_config_path())
    overrides = {
        "ks_pvalue_threshold": params.p_val,
        "correction": params.correction,
        "min_ks_statistic": params.min_ks_statistic,
        "min_distance": params.min_distance,
        "min_window_rows": params.min_window_rows,
        "test_score": params.test_score,
    }
    changed = {k: v for k, v in overrides.items() if v is not None}
    return DriftConfig(**{**config.__dict__, **changed}).validated("arguments") if changed else config


def check_drift(params: DriftParams) -> DriftResult:
    """Run one drift check and log it as one MLflow run.

    Raises:
        DriftConfigError: invalid config or arguments (nothing logged).
        DriftCheckError, ReferenceError, WindowReadError: a source is unavailable (the run is logged
            as failed).
    """
    started = time.perf_counter()
    output_dir = Path(params.output_dir)
    pending: PendingWindow | None = None
    try:
        if params.reference not in KINDS:
            raise DriftConfigError(f"--reference {params.reference!r} is unknown; expected one of {KINDS}")
        config = _configured(params)
        request_log = params.request_log or settings.request_log_url()
        if "://" not in request_log and not Path(request_log).is_file():
            raise DriftCheckError(f"request log {request_log} does not exist (LATEST_DB): no traffic has been logged")
        # The score column comes along when the score test may run.
        columns = [*config.features, *([SCORE] if config.test_score else [])]
        # The window is read in the background (by forked readers when large) while MLflow is
        # imported, the registry asked, the reference loaded and the detector built. Only a window
        # that starts at the promotion waits for the registry.
        if not needs_production(params.since):
            window = resolve_window(params.window, params.since, config, None)
            pending = start_reading(request_log, columns, window)
        from common import registry
        from monitoring.runs import start_run

        uri = params.tracking_uri or settings.tracking_uri()
        mlflow_client = registry.client(uri)
        name = params.model_name or settings.model_name()
        production = registry.production_version(mlflow_client, name)
        if pending is None:
            window = resolve_window(params.window, params.since, config, production)
            pending = start_reading(request_log, columns, window)
        run_id = start_run(mlflow_client, registry.DRIFT_EXPERIMENT, f"drift · {window.description} · running",
                           {"production_version": str(production.version) if production else "none"}, uri)
    except BaseException as exc:
        if pending is not None:
            pending.close()
        write_error_result(output_dir, first_line(exc, 1000))
        raise
    try:
        result = _check(params, config, mlflow_client, name, production, window, request_log, run_id, output_dir,
                        started, pending)
    except BaseException as exc:
        _record_failure(mlflow_client, run_id, output_dir, exc)
        raise
    mlflow_client.set_terminated(run_id, "FINISHED")
    return result


def _check(params: DriftParams, config: DriftConfig, mlflow_client, name: str, production, window: Window,
           request_log: str, run_id: str, output_dir: Path, started: float, pending: PendingWindow) -> DriftResult:
    from monitoring.runs import log

    def load_bundle():
        from common.model import load_bundle as load

        return load(mlflow_client, name, production.version)

    try:
        reference, notes = load_reference(params.reference, mlflow_client=mlflow_client, production=production,
                                          load=load_bundle if config.test_score else None,
                                          path=params.reference_file, reference_db=params.reference_db)
        indexes = [FEATURES.index(f) for f in config.features]
        detector = KSDrift(reference.columns[indexes].T, p_val=config.ks_pvalue_threshold,
                           correction=config.correction, features=config.features,
                           min_window_rows=config.min_window_rows, min_ks_statistic=config.min_ks_statistic,
                           min_distance=config.min_distance,
                           dtype=np.float32, workers=os.cpu_count() or 1)
        store = RequestStore(request_log, create=False)
        try:
            score_plan = _plan_score_test(store, config, reference, window, notes)
        except StoreUnavailable as exc:
            raise DriftCheckError(str(exc)) from None
        finally:
            store.dispose()
        # The detector imports scipy.stats on first use: here, while the readers may still read.
        import scipy.stats  # noqa: F401
        current = pending.result()
    finally:
        pending.close()
    scores = detector.score_columns(current[:len(config.features)])
    current_scores = None
    if score_plan == "same-pass":
        current_scores = current[len(config.features)]
    elif score_plan == "filtered":
        current_scores = read_window(request_log, [SCORE], window, model_version=reference.model_version,
                                     not_null=(SCORE,))[0]

    score_detector = None
    if current_scores is not None:
        if current_scores.size >= config.min_window_rows:
            score_detector = KSDrift(reference.scores, features=[SCORE], p_val=config.ks_pvalue_threshold,
                                     dtype=np.float32)
            scores = scores + score_detector.score_columns(current_scores[None, :])
        else:
            notes.append(f"score test skipped: {current_scores.size} window rows were scored by "
                         f"v{reference.model_version}, fewer than min_window_rows={config.min_window_rows}")
    report = detector.decide(scores)

    context = {
        "window": window.description,
        "request log": describe(request_log),
        "reference": reference.source,
        "reference rows": f"{reference.rows:,}",
        "current rows": f"{current.shape[1]:,}",
        "rows from": ", ".join(f"{source} {rows:,}" for source, rows in pending.sources.items()) or "-",
        "production version": str(production.version) if production else "none",
        "threshold": f"{report.threshold:.4g} ({report.correction} of p_val={report.p_val:g})",
        "min KS statistic": report.min_ks_statistic,
        "min distance (sd)": report.min_distance,
        "run id": run_id,
        "notes": "; ".join(notes) or "-",
    }
    summary = {
        **report.to_dict(),
        "run_id": run_id,
        "checked_at": iso(time.time()),
        "window": {"description": window.description, "last_n": window.last_n, "since_ts": window.since_ts,
                   "since": params.since or None, "rows": int(current.shape[1]),
                   "sources": pending.sources},
        "reference": {"kind": params.reference, "source": reference.source, "rows": reference.rows,
                      "model_name": reference.model_name, "model_version": reference.model_version},
        "request_log": describe(request_log),
        "production_version": str(production.version) if production else None,
        "score_test": SCORE in report.scores.features,
        "notes": notes,
    }
    output_dir.mkdir(parents=True, exist_ok=True)
    report_path = output_dir / REPORT_FILE
    samples = {}
    for test in report.most_drifted(config.report_features):
        if test == SCORE:
            samples[test] = (score_detector.reference_sorted(SCORE), current_scores)
        else:
            samples[test] = (detector.reference_sorted(test), current[config.features.index(test)])
    report_path.write_text(html_report.render_html(report, context, html_report.ecdf_panels(samples, report)))
    summary["seconds"] = round(time.perf_counter() - started, 3)
    result_path = _write_json(output_dir / RESULT_FILE, summary)

    metrics = {"drifted_count": len(report.drifted), "drifted_share": report.drifted_share,
               "corrected_threshold": report.threshold, "current_rows": int(current.shape[1]),
               "reference_rows": reference.rows, "seconds": summary["seconds"]}
    for test, stat, p, distance in zip(report.scores.features, report.scores.statistics, report.scores.pvalues,
                                       report.scores.distances, strict=True):
        metrics[f"ks_stat.{test}"] = stat
        metrics[f"ks_pvalue.{test}"] = p
        metrics[f"distance.{test}"] = distance
    log(mlflow_client, run_id,
        params={"window": window.description, "window_rows": window.last_n or 0,
                "since": params.since or "", "since_ts": window.since_ts if window.since_ts is not None else "",
                "reference": params.reference, "reference_source": reference.source, "reference_rows": reference.rows,
                "current_rows": int(current.shape[1]), "p_val": report.p_val, "correction": report.correction,
                "min_window_rows": report.min_window_rows, "min_ks_statistic": report.min_ks_statistic,
                "min_distance": report.min_distance,
                "test_score": config.test_score, "features": len(config.features),
                "request_log": describe(request_log), "model_name": name},
        metrics=metrics,
        tags={"drift_detected": report.tag, "status": report.status, "reason": report.reason,
              "drifted_features": ",".join(report.drifted), "significant_features": ",".join(report.significant),
              "notes": "; ".join(notes)})
    mlflow_client.log_artifact(run_id, str(result_path))
    mlflow_client.log_artifact(run_id, str(report_path))
    mlflow_client.update_run(run_id, name=run_name(int(current.shape[1]), report.status))
    return DriftResult(report, run_id, result_path, report_path, summary)


def run_name(rows: int, status: str) -> str:
    """The check's run name, e.g. `drift · window 5,000 · no drift` (the rows it compared)."""
    return f"drift · window {rows:,} · {status.replace('_', ' ')}"


def _plan_score_test(store: RequestStore, config: DriftConfig, reference, window: Window, notes: list[str]) -> str:
    """How to get the window's scores: 'same-pass' (every scored row is the reference model's),
    'filtered' (a second read of that version's rows), or 'none' (no score test, with a note)."""
    if not config.test_score:
        return "none"
    if reference.scores is None:
        notes.append("score test skipped: the reference has no model scores")
        return "none"
    versions = store.window_versions(last_n=window.last_n, since_ts=window.since_ts)
    mine = versions.get(str(reference.model_version), (0, 0))
    if mine[0] == 0:
        notes.append(f"score test skipped: no window row was scored by v{reference.model_version} "
                     f"(versions in the window: {sorted(str(v) for v in versions)})")
        return "none"
    if len(versions) == 1 and mine[0] == mine[1]:
        return "same-pass"
    notes.append(f"score test uses the {mine[0]} window rows scored by v{reference.model_version}")
    return "filtered"


def _write_json(path: Path, body: dict) -> Path:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(body, indent=2, default=_jsonable, allow_nan=False) + "\n")
    tmp.replace(path)
    return path


def _jsonable(value: object):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _record_failure(mlflow_client, run_id: str, output_dir: Path, exc: BaseException) -> None:
    """Log a failed check as such: status error in drift_result.json, tags on a FAILED run."""
    message = first_line(exc, 1000)
    write_error_result(output_dir, message, run_id)
    try:
        mlflow_client.set_tag(run_id, "drift_detected", "error")
        mlflow_client.set_tag(run_id, "error", message)
        mlflow_client.update_run(run_id, name="drift · error")
        mlflow_client.set_terminated(run_id, "FAILED")
    except Exception:  # noqa: S110 - the original error is what the caller must see
        pass



def write_error_result(output_dir: Path, message: str, run_id: str | None = None) -> None:
    """Replace drift_result.json with an error record, so no stale result is mistaken for this check's."""
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        _write_json(output_dir / RESULT_FILE, {"drift_detected": None, "feature_pvalues": {}, "status": "error",
                                               "reason": message, "run_id": run_id, "checked_at": iso(time.time())})
    except OSError:
        pass


# --- CLI ---------------------------------------------------------------------------------------------


def _optional(kind):
    def parse(text: str):
        return None if text.strip() == "" else kind(text)
    parse.__name__ = kind.__name__
    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m monitoring.drift", description=__doc__.splitlines()[0],
                                     epilog="exit codes: 0 no drift, 3 drift, 4 inconclusive, 2 bad arguments or "
                                            "config, 1 the check could not run",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = parser.add_argument
    add("--window", type=_optional(int), default=None,
        help="newest rows to test (default: default_window_rows of the drift config; 0 = no row limit)")
    add("--since", default=None, help="only rows logged at or after this: epoch seconds, ISO-8601, or 'promotion'")
    add("--reference", default="auto", choices=KINDS, help="reference source (see monitoring/reference.py)")
    add("--p-val", "--p_val", dest="p_val", type=_optional(float), default=None,
        help="family-wise level (default: ks_pvalue_threshold of the drift config)")
    add("--correction", default=None, type=_optional(str), help="bonferroni, fdr or none (default: drift config)")
    add("--min-ks-statistic", "--min_ks_statistic", dest="min_ks_statistic", type=_optional(float), default=None,
        help="minimum KS statistic for a test to count as drifted (default: drift config)")
    add("--min-distance", "--min_distance", dest="min_distance", type=_optional(float), default=None,
        help="minimum Wasserstein distance, in reference standard deviations, for a test to count as drifted "
             "(default: drift config)")
    add("--min-window-rows", "--min_window_rows", dest="min_window_rows", type=_optional(int), default=None,
        help="fewer current rows make the check inconclusive (default: drift config)")
    add("--test-score", "--test_score", dest="test_score", type=_optional(cli_bool), default=None,
        help="also test the model's score distribution (default: drift config)")
    add("--output-dir", "--output_dir", dest="output_dir", type=Path, default=Path(),
        help="where drift_result.json and drift_report.html are written")
    add("--config", type=_optional(Path), default=None, help="drift config (default: DRIFT_CONFIG)")
    add("--request-log", "--request_log", dest="request_log", type=_optional(str), default=None,
        help="request log path or URL (default: LATEST_DB)")
    add("--reference-db", "--reference_db", dest="reference_db", type=_optional(str), default=None,
        help="reference database (default: REFERENCE_DB)")
    add("--reference-file", "--reference_file", dest="reference_file", type=_optional(Path), default=None,
        help="drift reference file (default: DRIFT_REFERENCE)")
    add("--model-name", "--model_name", dest="model_name", type=_optional(str), default=None,
        help="registered model (default: MODEL_NAME)")
    add("--exit-zero", "--exit_zero", dest="exit_zero", type=cli_bool, default=False,
        help="exit 0 for every completed check (errors still exit 1 or 2)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    options = {k: v for k, v in vars(args).items() if k != "exit_zero"}
    params = DriftParams(**options)
    try:
        result = check_drift(params)
    except DriftConfigError as exc:
        print(f"drift: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (DriftCheckError, ReferenceError, StoreUnavailable, WindowReadError) as exc:
        print(f"drift: the check could not run: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except Exception as exc:
        traceback.print_exc()
        print(f"drift: the check failed unexpectedly: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_ERROR
    report = result.report
    print(f"drift check: {report.status.upper()} - {report.reason}")
    print(f"  window: {result.summary['window']['description']} ({result.summary['window']['rows']} rows); "
          f"reference: {result.summary['reference']['source']} ({result.summary['reference']['rows']} rows)")
    for note in result.summary["notes"]:
        print(f"  note: {note}")
    top = report.most_drifted(5)
    if top:
        print("  largest KS statistics: " + ", ".join(
            f"{t}={report.feature_statistics[t]:.4f} (p={report.feature_pvalues[t]:.3g}, "
            f"{report.feature_distances[t]:.3f} sd)" for t in top))
    from common.registry import DRIFT_EXPERIMENT

    print(f"  MLflow run {result.run_id} (experiment {DRIFT_EXPERIMENT}); wrote {result.result_path} and "
          f"{result.report_path} in {result.summary['seconds']:.1f}s")
    return EXIT_NO_DRIFT if args.exit_zero else result.exit_code


if __name__ == "__main__":
    sys.exit(main())
