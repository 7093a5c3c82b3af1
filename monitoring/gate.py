"""The promotion gate: the only way a model version reaches Production, and the way back (rollback).

`python -m monitoring.gate [--version N] [--reason scheduled|manual] [--rollback true]`, or
`mlflow run . -e promote --env-manager local -P version=N -P reason=manual -P rollback=true`.

The candidate (default: the newest Staging version, alias `challenger`) is promoted only if all hold:

(a) cause: a `drift-monitoring` run started after the current Production version's promotion found
    `drift_detected=true`, or an explicit reason (`scheduled`, `manual`) is given; either is recorded;
(b) quality: on the candidate's evaluation rows (its run's `data/evaluation.parquet`: labelled rows
    held out from its training), its `average_precision` and its recall at its own operating
    threshold are each at most the configured margin below the Production model's on the same rows
    (both measured by `common.evaluation.evaluate_scores`, the function training uses);
(c) integrity: the candidate loads as the service would load it, its input signature is the 29
    FEATURES, and its ONNX artifact agrees with its scikit-learn model on the evaluation rows within
    `common.model.PARITY_TOLERANCE`.

With no Production version yet (the first model), (a) does not apply and (b) is replaced by an
absolute floor on the candidate's own metrics. Margins and floor: `data/promotion_config.json`
(PROMOTION_CONFIG).

On pass the version first gets the gate's record (`gate_record`: the gate run and the sha256 of each
artifact file it checked, which every replica verifies before serving it; common.provenance), then
becomes Production (the previous one Archived with alias `previous`; see
`common.registry.move_to_stage`), the version is tagged with the gate run's id, the reasons and
`promoted_at`, and the drift reference file is replaced atomically with the new model's training
data and scores. On fail nothing changes, the reasons are printed and logged. Rollback makes the
`previous` version Production again with the same bookkeeping (it must still load).

Every decision is one run in experiment `promotions`, named after it (`gate · v3 → Production`,
`gate · v3 refused`, `gate · rollback to v2`), with both models' metrics side by side
(`candidate.<metric>`, `production.<metric>`, `delta.<metric>`), and `promotion_result.json`
(also written to `--output-dir`).

One gate at a time: a promotion or a rollback holds the gate lock in the request log's database
(monitoring.gate_lock) from before it reads the registry until its registry change is done. A second
gate waits for it up to `--lock-wait` seconds, then gives up without changing anything. Holding the
lock, a gate first repairs a promotion that an earlier gate left half done (killed, or failed
midway) and says so (monitoring.promotion).

Exit codes: 0 promoted (or rolled back), 3 refused by a check, 2 bad arguments or config (or
nothing to decide: no candidate, no previous version), 4 another promotion or rollback held the
gate lock for all of `--lock-wait`, 1 the gate could not run.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException

from common import registry, settings
from common.model import PARITY_TOLERANCE, ModelLoadError, load_bundle
from common.schema import FEATURES, LABEL
from common.store import RequestStore, StoreUnavailable
from common.text import cli_bool, first_line
from monitoring import promotion
from monitoring.gate_lock import LockBusy, LockUnavailable, gate_lock
from monitoring.reference import ReferenceError, commit_reference_file, discard_staged, stage_refresh
from monitoring.runs import PROMOTED_AT_TAG, log, promoted_at, start_run

EXIT_PASSED = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_REFUSED = 3
EXIT_BUSY = 4

REASONS = ("scheduled", "manual", "performance")
EVALUATION_ARTIFACT = "data/evaluation.parquet"  # written by training.registration (EVALUATION_ARTIFACT)
RESULT_FILE = "promotion_result.json"
COMPARED = ("average_precision", "recall")
# How long a gate waits for another one to finish; a gate run takes seconds to a few minutes.
LOCK_WAIT_SECONDS = 300.0


class GateUsageError(ValueError):
    """Bad arguments or config, or nothing to decide (exit code 2)."""


class GateError(RuntimeError):
    """The gate could not run (exit code 1)."""


class GateBusy(GateError):
    """Another promotion or rollback held the gate lock for the whole wait (exit code 4)."""


@dataclass(frozen=True)
class GateConfig:
    """`data/promotion_config.json`; the defaults are the shipped file's values (a test holds this)."""

    max_average_precision_drop: float = 0.01
    max_recall_drop: float = 0.05
    floor_average_precision: float = 0.5
    floor_recall: float = 0.5
    min_evaluation_frauds: int = 5
    # The live comparison (shadow scores with known labels) counts once it covers this many frauds.
    min_live_frauds: int = 20

    @classmethod
    def load(cls, path: Path) -> GateConfig:
        """Read and validate the config.

        Raises:
            GateUsageError: missing, malformed, unknown keys, or values out of range.
        """
        try:
            raw = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise GateUsageError(f"promotion config {path} does not exist (PROMOTION_CONFIG)") from None
        except (OSError, ValueError) as exc:
            raise GateUsageError(f"promotion config {path} is not valid JSON: {exc}") from None
        known = set(cls.__dataclass_fields__)
        if not isinstance(raw, dict) or set(raw) - known:
            raise GateUsageError(f"promotion config {path} must be an object with keys from {sorted(known)}")
        try:
            config = cls(**{k: (int(v) if k in ("min_evaluation_frauds", "min_live_frauds") else float(v))
                            for k, v in raw.items()})
        except (TypeError, ValueError) as exc:
            raise GateUsageError(f"promotion config {path}: {exc}") from None
        for name in ("max_average_precision_drop", "max_recall_drop", "floor_average_precision", "floor_recall"):
            value = getattr(config, name)
            if not (math.isfinite(value) and 0.0 <= value <= 1.0):
                raise GateUsageError(f"promotion config {path}: {name} must be within [0, 1], got {value}")
        for name in ("min_evaluation_frauds", "min_live_frauds"):
            if getattr(config, name) < 1:
                raise GateUsageError(f"promotion config {path}: {name} must be at least 1")
        return config


@dataclass(frozen=True)
class GateParams:
    """Options; the names match the CLI flags and the MLproject parameters."""

    version: str | None = None
    reason: str | None = None
    rollback: bool = False
    model_name: str | None = None
    tracking_uri: str | None = None
    config: Path | None = None
    reference_file: Path | None = None
    output_dir: Path = Path()
    lock_wait: float = LOCK_WAIT_SECONDS
    request_log: str | None = None  # for the live comparison; None: LATEST_DB


@dataclass(frozen=True)
class Check:
    name: str
    passed: bool
    detail: str


@dataclass(frozen=True)
class GateDecision:
    """What the gate decided and why."""

    action: str  # "promote" or "rollback"
    passed: bool
    model_name: str
    candidate: str | None
    production: str | None
    checks: tuple[Check, ...]
    metrics: dict[str, float] = field(default_factory=dict)
    run_id: str | None = None
    notes: tuple[str, ...] = ()

    @property
    def reasons(self) -> list[str]:
        """Failed checks when refused; every check's detail when passed."""
        failed = [c for c in self.checks if not c.passed]
        return [f"{c.name}: {c.detail}" for c in (failed if failed else self.checks)]

    @property
    def exit_code(self) -> int:
        return EXIT_PASSED if self.passed else EXIT_REFUSED

    @property
    def run_name(self) -> str:
        """The decision's run name: `gate · v3 → Production`, `gate · v3 refused`, `gate · rollback to v2`
        or `gate · rollback to v2 refused`."""
        if self.action == "rollback":
            return f"gate · rollback to v{self.candidate}" + ("" if self.passed else " refused")
        return f"gate · v{self.candidate} " + ("→ Production" if self.passed else "refused")

    def to_dict(self) -> dict:
        return {
            "action": self.action,
            "passed": self.passed,
            "decision": _decision(self),
            "model_name": self.model_name,
            "candidate_version": self.candidate,
            "production_version_before": self.production,
            "checks": [c.__dict__ for c in self.checks],
            "reasons": self.reasons,
            "metrics": {k: (v if math.isfinite(v) else None) for k, v in self.metrics.items()},
            "run_id": self.run_id,
            "notes": list(self.notes),
        }


def _decision(decision: GateDecision) -> str:
    if decision.action == "rollback":
        return "rolled_back" if decision.passed else "rollback_refused"
    return "promoted" if decision.passed else "refused"


# --- checks ----------------------------------------------------------------------------------------


def drift_cause(mlflow_client, production, reason: str | None) -> Check:
    """(a): an explicit reason, or a verdict since Production's promotion: a drift run that found drift,
    or a performance run that found Production degraded. `reason=performance` needs the latter."""
    if reason and reason != "performance":
        return Check("cause", True, f"explicit reason {reason!r}")
    since = promoted_at(production)
    verdicts = [("performance", registry.PERFORMANCE_EXPERIMENT, "performance_degraded", "degradation")]
    if reason != "performance":
        verdicts.insert(0, ("drift", registry.DRIFT_EXPERIMENT, "drift_detected", "drift"))
    for kind, experiment_name, tag, found in verdicts:
        experiment = mlflow_client.get_experiment_by_name(experiment_name)
        if experiment is None:
            continue
        runs = mlflow_client.search_runs(
            [experiment.experiment_id],
            filter_string=f"tags.{tag} = 'true' and attributes.start_time > {int(since * 1000)}",
            order_by=["attributes.start_time DESC"], max_results=1)
        if runs:
            run = runs[0]
            when = datetime.fromtimestamp(run.info.start_time / 1000, UTC).isoformat(timespec="seconds")
            detail = run.data.tags.get("drifted_features") if kind == "drift" else run.data.tags.get("reason")
            return Check("cause", True, f"{kind} run {run.info.run_id} at {when} found {found} ({detail or ''})")
    promoted = datetime.fromtimestamp(since, UTC).isoformat(timespec="seconds")
    if reason == "performance":
        return Check("cause", False, f"reason 'performance', but no performance run since v{production.version} was "
                                     f"promoted ({promoted}) found it degraded")
    return Check("cause", False, f"no drift or performance run since v{production.version} was promoted ({promoted}) "
                                 "found drift or degradation, and no reason (scheduled, manual) was given")


def live_comparison(request_log: str | None, candidate: str, production: str, config: GateConfig,
                    metrics: dict[str, float], notes: list[str]) -> Check | None:
    """(b'): the candidate against Production on live traffic: the rows Production served while the
    candidate scored them in the shadow, whose labels are known (feedback, or matured; see
    monitoring.performance). None, with a note, while those rows hold fewer than `min_live_frauds` frauds.

    Both models are judged with the hold-out margins, each at its own threshold (the logged decisions).
    """
    from monitoring.performance import PerformanceConfig, PerformanceConfigError, figures, known_labels

    if not request_log or ("://" not in request_log and not Path(request_log).is_file()):
        notes.append("no live comparison: no request log")
        return None
    store = RequestStore(request_log, create=False)
    try:
        if "shadow_version" not in store.columns():
            notes.append("no live comparison: the request log has no shadow scores")
            return None
        frame = store.read_frame(("ts", "score", "decision", LABEL, "shadow_score", "shadow_decision"),
                                 equals={"model_version": production, "shadow_version": candidate})
    except StoreUnavailable as exc:
        notes.append(f"no live comparison: {exc}")
        return None
    finally:
        store.dispose()
    try:
        maturity = PerformanceConfig.load(settings.performance_config_path()).maturity_days
    except PerformanceConfigError as exc:
        raise GateUsageError(str(exc)) from None
    y = known_labels(frame, time.time(), maturity)
    known = y >= 0
    if int(y[known].sum()) < config.min_live_frauds:
        notes.append(f"no live comparison: the {int(known.sum())} rows with known labels that v{candidate} scored in "
                     f"the shadow of v{production} hold {int(y[known].sum())} frauds, fewer than "
                     f"min_live_frauds={config.min_live_frauds}")
        return None
    y = y[known]
    champion = figures(y, frame["decision"].to_numpy()[known], frame["score"].to_numpy(np.float64)[known])
    challenger = figures(y, frame["shadow_decision"].to_numpy()[known],
                         frame["shadow_score"].to_numpy(np.float64)[known])
    for role, body in (("candidate", challenger), ("production", champion)):
        metrics.update({f"live.{role}.{k}": float(body[k]) for k in (*COMPARED, "precision", "frauds", "known_rows")})
    metrics.update({f"live.delta.{k}": float(challenger[k]) - float(champion[k]) for k in COMPARED})
    check = quality_against(challenger, champion, config)
    where = f"on {len(y)} live rows ({champion['frauds']} frauds) v{candidate} scored in the shadow of v{production}"
    if check.passed:
        return Check("live", True, f"{check.detail.replace('not worse than Production: ', 'not worse ')} {where}")
    return Check("live", False, check.detail.replace("candidate worse than Production", f"worse {where}"))


def evaluation_rows(mlflow_client, run_id: str | None) -> pd.DataFrame:
    """The candidate's held-out evaluation rows (FEATURES + Class).

    Raises:
        GateError: the run or its artifact is missing or malformed.
    """
    if not run_id:
        raise GateError("the candidate has no training run, so no evaluation rows")
    with tempfile.TemporaryDirectory(prefix="gate-eval-") as tmp:
        try:
            frame = pd.read_parquet(mlflow_client.download_artifacts(run_id, EVALUATION_ARTIFACT, tmp))
        except Exception as exc:  # MlflowException, OSError, Arrow errors all mean "not available"
            raise GateError(f"run {run_id} has no readable {EVALUATION_ARTIFACT}: "
                            f"{first_line(exc)}") from None
    missing = [c for c in (*FEATURES, LABEL) if c not in frame.columns]
    if missing:
        raise GateError(f"run {run_id}'s {EVALUATION_ARTIFACT} lacks columns {missing}")
    return frame


def integrity(mlflow_client, name: str, version: str, rows: np.ndarray | None):
    """(c): (Check, bundle to serve or None). Loads ONNX (required) and scikit-learn, compares them."""
    try:
        served = load_bundle(mlflow_client, name, version, flavor="onnx")
        forest = load_bundle(mlflow_client, name, version, flavor="sklearn")
    except ModelLoadError as exc:
        return Check("integrity", False, f"v{version} cannot be served: {exc}"), None
    changed = sorted(k for k, v in forest.digests.items() if served.digests.get(k) != v)
    if changed:  # the gate records the digests of what it checked: both reads must be the same files
        return Check("integrity", False, f"v{version}'s artifacts changed while the gate read them: "
                                         f"{', '.join(changed)}"), None
    if rows is None or len(rows) == 0:
        return Check("integrity", True, f"v{version} loads (signature, threshold, ONNX parity on probe rows)"), served
    try:
        diff = float(np.max(np.abs(served.predict_proba(rows) - forest.predict_proba(rows))))
    except Exception as exc:  # a model that raises on valid rows is broken, whatever the exception
        return Check("integrity", False, f"v{version} fails to score the evaluation rows: {exc}"), None
    if not diff <= PARITY_TOLERANCE:
        return Check("integrity", False, f"v{version}'s ONNX and scikit-learn disagree on the evaluation rows: "
                                         f"max |Δp| = {diff:.3g} > {PARITY_TOLERANCE:g}"), None
    return Check("integrity", True, f"v{version} loads, signature = the {len(FEATURES)} features, ONNX agrees with "
                                    f"scikit-learn on {len(rows)} evaluation rows (max |Δp| = {diff:.2g})"), served


def _metrics(bundle, rows: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    from common.evaluation import evaluate_scores

    return evaluate_scores(labels, bundle.predict_proba(rows), bundle.threshold)


def quality_against(candidate: dict, production: dict, config: GateConfig) -> Check:
    """(b): the candidate may fall at most the configured margins below Production."""
    margins = {"average_precision": config.max_average_precision_drop, "recall": config.max_recall_drop}
    failures, details = [], []
    for metric in COMPARED:
        cand, prod = candidate[metric], production[metric]
        text = f"{metric} {cand:.4f} vs {prod:.4f} (margin {margins[metric]:g})"
        details.append(text)
        if not (math.isfinite(cand) and math.isfinite(prod)) or cand < prod - margins[metric]:
            failures.append(text)
    if failures:
        return Check("quality", False, "candidate worse than Production: " + "; ".join(failures))
    return Check("quality", True, "not worse than Production: " + "; ".join(details))


def quality_floor(candidate: dict, config: GateConfig) -> Check:
    """The first model's bar: absolute floors on its own metrics."""
    floors = {"average_precision": config.floor_average_precision, "recall": config.floor_recall}
    failures = [f"{m} {candidate[m]:.4f} < floor {floors[m]:g}" for m in COMPARED
                if not (math.isfinite(candidate[m]) and candidate[m] >= floors[m])]
    details = ", ".join(f"{m} {candidate[m]:.4f} (floor {floors[m]:g})" for m in COMPARED)
    if failures:
        return Check("floor", False, "first model below the quality floor: " + "; ".join(failures))
    return Check("floor", True, f"first model meets the quality floor: {details}")


def _quality(mlflow_client, name: str, production, served, rows: np.ndarray, labels: np.ndarray,
             config: GateConfig, metrics: dict[str, float]) -> Check:
    """(b), or the floor for a first model; fills `metrics` with both models' side by side.

    Raises:
        GateError: the Production version cannot be loaded to compare with.
    """
    frauds = int(labels.sum())
    if frauds < config.min_evaluation_frauds:
        return Check("quality", False, f"the evaluation rows hold {frauds} frauds, fewer than "
                                       f"min_evaluation_frauds={config.min_evaluation_frauds}")
    if served is None:
        return Check("quality", False, "not measured: the candidate cannot be served")
    candidate = _metrics(served, rows, labels)
    metrics.update({f"candidate.{k}": float(v) for k, v in candidate.items()})
    if production is None:
        return quality_floor(candidate, config)
    try:
        current = load_bundle(mlflow_client, name, production.version)
    except ModelLoadError as exc:
        raise GateError(f"Production v{production.version} cannot be loaded to compare: {exc}") from None
    incumbent = _metrics(current, rows, labels)
    metrics.update({f"production.{k}": float(v) for k, v in incumbent.items()})
    metrics.update({f"delta.{k}": float(candidate[k]) - float(incumbent[k]) for k in candidate if k in incumbent})
    return quality_against(candidate, incumbent, config)


# --- the gate --------------------------------------------------------------------------------------


def _candidate(mlflow_client, name: str, version: str | None):
    if version:
        try:
            with registry.stages_api():
                return mlflow_client.get_model_version(name, str(version))
        except MlflowException:
            raise GateUsageError(f"{name} has no version {version}") from None
    found = registry.version_in_stage(mlflow_client, name, "Staging")
    if found is None:
        raise GateUsageError(f"{name} has no Staging (challenger) version to promote; train one first "
                             "(mlflow run . -e train) or name one with --version")
    return found


def promote(params: GateParams) -> GateDecision:
    """Judge the candidate and promote it when every check passes, holding the gate lock. See the
    module docstring.

    Raises:
        GateUsageError: bad arguments or config, no candidate, or the candidate is already Production.
        GateBusy: another gate held the lock for all of `params.lock_wait`.
        GateError: the registry, the tracking store, an artifact or the gate lock is unavailable.
    """
    if params.rollback:
        return rollback(params)
    return _exclusive(params, _promote)


def rollback(params: GateParams) -> GateDecision:
    """Make the `previous` version Production again (it must still load), holding the gate lock; the
    current one becomes `previous`.

    Raises:
        GateUsageError: there is no `previous` version, or it is already Production.
        GateBusy: another gate held the lock for all of `params.lock_wait`.
        GateError: the registry, the tracking store or the gate lock is unavailable.
    """
    return _exclusive(params, _rollback)


def _exclusive(params: GateParams, decide) -> GateDecision:
    """Run `decide(params, repairs)` holding the gate lock, after repairing an interrupted promotion."""
    uri = params.tracking_uri or settings.tracking_uri()
    name = params.model_name or settings.model_name()
    location = params.request_log or settings.request_log_url()
    try:
        with gate_lock(location, params.lock_wait, on_wait=lambda where: print(
                f"gate: another promotion or rollback holds the gate lock ({where}); waiting up to "
                f"{params.lock_wait:g} s", file=sys.stderr, flush=True)):
            mlflow_client = registry.client(uri)
            repairs = promotion.repair(mlflow_client, name,
                                       Path(params.reference_file or settings.drift_reference_path()), uri)
            for line in repairs:
                print(f"gate: repaired: {line}", flush=True)
            try:
                decision = decide(params, tuple(f"repaired first: {line}" for line in repairs))
            except (GateUsageError, GateError) as exc:
                if repairs:  # printed above; said again beside the error
                    raise type(exc)(f"{exc} (after repairing an interrupted promotion first)") from None
                raise
            if decision.passed:
                promotion.finish(mlflow_client, name)
            return decision
    except LockBusy as exc:
        raise GateBusy(f"{exc}; nothing was changed. Run the gate again once the other one is done "
                       "(or give it longer with --lock-wait)") from None
    except LockUnavailable as exc:
        raise GateError(str(exc)) from None


def _promote(params: GateParams, repairs: tuple[str, ...] = ()) -> GateDecision:
    if params.reason and params.reason not in REASONS:
        raise GateUsageError(f"--reason {params.reason!r} is unknown; expected one of {REASONS} (or none)")
    config = GateConfig.load(params.config or settings.promotion_config_path())
    uri = params.tracking_uri or settings.tracking_uri()
    mlflow_client = registry.client(uri)
    name = params.model_name or settings.model_name()
    candidate = _candidate(mlflow_client, name, params.version)
    production = registry.production_version(mlflow_client, name)
    if production is not None and str(production.version) == str(candidate.version):
        raise GateUsageError(f"{name} v{candidate.version} is already Production")
    run_id = start_run(mlflow_client, registry.PROMOTION_EXPERIMENT, f"gate · v{candidate.version} running",
                       {"action": "promote"}, uri)
    staged = None
    try:
        checks, metrics, notes = [], {}, list(repairs)
        if production is not None:
            checks.append(drift_cause(mlflow_client, production, params.reason))
        elif params.reason:
            notes.append(f"reason {params.reason!r} recorded (first model: no drift condition applies)")
        try:
            frame = evaluation_rows(mlflow_client, candidate.run_id)
            rows, labels = frame[list(FEATURES)].to_numpy(np.float64), frame[LABEL].to_numpy(np.int64)
        except GateError as exc:  # a candidate without its held-out rows cannot be judged
            rows = labels = None
            checks.append(Check("quality", False, f"not measured: {exc}"))
        check, served = integrity(mlflow_client, name, candidate.version, rows)
        checks.append(check)
        if labels is not None:
            checks.append(_quality(mlflow_client, name, production, served, rows, labels, config, metrics))
        if production is not None:
            live = live_comparison(params.request_log or settings.request_log_url(), str(candidate.version),
                                   str(production.version), config, metrics, notes)
            if live is not None:
                checks.append(live)
        reference_path = Path(params.reference_file or settings.drift_reference_path())
        if all(c.passed for c in checks):
            # Built before the registry changes, so a candidate without usable training data is refused.
            try:
                staged = stage_refresh(mlflow_client, served, reference_path)
            except ReferenceError as exc:
                checks.append(Check("reference", False, f"the drift reference cannot be built: {exc}"))
        passed = all(c.passed for c in checks)
        decision = GateDecision("promote", passed, name, str(candidate.version),
                                str(production.version) if production else None, tuple(checks), metrics, run_id,
                                tuple(notes))
        if passed:
            _make_production(mlflow_client, name, candidate.version, decision, served)
            commit_reference_file(staged, reference_path)
            staged = None
            promotion.crash_point("reference")
            decision = GateDecision(**{**decision.__dict__,
                                       "notes": (*decision.notes, f"drift reference refreshed: {reference_path}")})
        _log_decision(mlflow_client, decision, params, config)
    except BaseException as exc:
        discard_staged(staged)
        _fail_run(mlflow_client, run_id, exc, f"gate · v{candidate.version} error")
        raise
    _write_result(Path(params.output_dir), decision)
    mlflow_client.set_terminated(run_id, "FINISHED")
    return decision


def _rollback(params: GateParams, repairs: tuple[str, ...] = ()) -> GateDecision:
    uri = params.tracking_uri or settings.tracking_uri()
    mlflow_client = registry.client(uri)
    name = params.model_name or settings.model_name()
    try:
        previous = mlflow_client.get_model_version_by_alias(name, registry.PREVIOUS_ALIAS)
    except MlflowException:
        raise GateUsageError(f"{name} has no version with alias '{registry.PREVIOUS_ALIAS}' to roll back to") from None
    production = registry.production_version(mlflow_client, name)
    if production is not None and str(production.version) == str(previous.version):
        raise GateUsageError(f"{name} v{previous.version} ('{registry.PREVIOUS_ALIAS}') is already Production")
    run_id = start_run(mlflow_client, registry.PROMOTION_EXPERIMENT, f"gate · rollback to v{previous.version} running",
                       {"action": "rollback"}, uri)
    staged = None
    try:
        check, served = integrity(mlflow_client, name, previous.version, None)
        if served is None:  # without ONNX the service still serves scikit-learn; rollback needs only that
            try:
                served = load_bundle(mlflow_client, name, previous.version, flavor="auto")
                check = Check("integrity", True, f"v{previous.version} loads (scikit-learn; {check.detail})")
            except ModelLoadError as exc:
                check = Check("integrity", False, f"v{previous.version} cannot be loaded: {exc}")
        cause = Check("cause", True, f"rollback from v{production.version if production else 'none'}"
                                     + (f" ({params.reason})" if params.reason else ""))
        decision = GateDecision("rollback", check.passed, name, str(previous.version),
                                str(production.version) if production else None, (cause, check), {}, run_id,
                                repairs)
        if decision.passed:
            reference_path = Path(params.reference_file or settings.drift_reference_path())
            notes = list(repairs)
            try:
                staged = stage_refresh(mlflow_client, served, reference_path)
            except ReferenceError as exc:
                notes.append(f"drift reference not refreshed: {exc}")
            _make_production(mlflow_client, name, previous.version, decision, served)
            if staged is not None:
                commit_reference_file(staged, reference_path)
                staged = None
                notes.append(f"drift reference refreshed: {reference_path}")
            promotion.crash_point("reference")
            decision = GateDecision(**{**decision.__dict__, "notes": tuple(notes)})
        _log_decision(mlflow_client, decision, params, None)
    except BaseException as exc:
        discard_staged(staged)
        _fail_run(mlflow_client, run_id, exc, f"gate · rollback to v{previous.version} error")
        raise
    _write_result(Path(params.output_dir), decision)
    mlflow_client.set_terminated(run_id, "FINISHED")
    return decision


def _make_production(mlflow_client, name: str, version: str, decision: GateDecision, served) -> None:
    """Make `version` Production with its promotion tags and the gate record of `served`, the bundle
    the gate checked (its files' digests: common.provenance)."""
    reasons = "; ".join(decision.reasons)
    tags = {PROMOTED_AT_TAG: repr(time.time()), "promotion_run_id": decision.run_id or "",
            "promotion_action": decision.action, "promotion_reasons": reasons[:4900]}
    if decision.production:
        tags[promotion.REPLACED_TAG] = decision.production
    promotion.make_production(mlflow_client, name, version, run_id=decision.run_id, action=decision.action,
                              tags=tags, digests=served.digests)


def _log_decision(mlflow_client, decision: GateDecision, params: GateParams, config: GateConfig | None) -> None:
    log(mlflow_client, decision.run_id,
        params={"action": decision.action, "model_name": decision.model_name,
                "candidate_version": decision.candidate or "", "production_version": decision.production or "none",
                "reason": params.reason or "", "requested_version": params.version or "",
                **({f"config.{k}": v for k, v in config.__dict__.items()} if config else {})},
        metrics={**decision.metrics, "passed": float(decision.passed)},
        tags={"decision": _decision(decision), "passed": str(decision.passed).lower(),
              "reasons": "\n".join(decision.reasons),
              **{f"check.{c.name}": ("pass: " if c.passed else "FAIL: ") + c.detail for c in decision.checks}})
    with tempfile.TemporaryDirectory(prefix="gate-result-") as tmp:
        path = Path(tmp) / RESULT_FILE
        path.write_text(json.dumps(decision.to_dict(), indent=2) + "\n")
        mlflow_client.log_artifact(decision.run_id, str(path))
    mlflow_client.update_run(decision.run_id, name=decision.run_name)


def _write_result(output_dir: Path, decision: GateDecision) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    tmp = output_dir / f".{RESULT_FILE}.tmp"
    tmp.write_text(json.dumps(decision.to_dict(), indent=2) + "\n")
    tmp.replace(output_dir / RESULT_FILE)


def _fail_run(mlflow_client, run_id: str, exc: BaseException, name: str) -> None:
    try:
        mlflow_client.set_tag(run_id, "decision", "error")
        mlflow_client.set_tag(run_id, "error", (str(exc).strip() or type(exc).__name__)[:4900])
        mlflow_client.update_run(run_id, name=name)
        mlflow_client.set_terminated(run_id, "FAILED")
    except Exception:  # noqa: S110 - the original error is what the caller must see
        pass


# --- CLI ---------------------------------------------------------------------------------------------



def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m monitoring.gate", description=__doc__.splitlines()[0],
                                     epilog="exit codes: 0 promoted or rolled back, 3 refused, 2 bad arguments or "
                                            "nothing to decide, 4 another promotion or rollback held the gate "
                                            "lock for all of --lock-wait, 1 the gate could not run")
    parser.add_argument("--version", default=None, help="candidate version (default: the newest Staging version)")
    parser.add_argument("--reason", default=None,
                        help="why retrain: scheduled or manual (enough by themselves), or performance (needs a "
                             "performance run since the last promotion that found degradation)")
    parser.add_argument("--request-log", "--request_log", dest="request_log", default=None,
                        help="request log for the live comparison (default: LATEST_DB)")
    parser.add_argument("--rollback", type=cli_bool, default=False,
                        help="true: restore the previous Production version")
    parser.add_argument("--model-name", "--model_name", dest="model_name", default=None,
                        help="registered model (default: MODEL_NAME)")
    parser.add_argument("--config", type=Path, default=None, help="promotion config (default: PROMOTION_CONFIG)")
    parser.add_argument("--reference-file", "--reference_file", dest="reference_file", type=Path, default=None,
                        help="drift reference file to refresh (default: DRIFT_REFERENCE)")
    parser.add_argument("--output-dir", "--output_dir", dest="output_dir", type=Path, default=Path(),
                        help="where promotion_result.json is written")
    parser.add_argument("--lock-wait", "--lock_wait", dest="lock_wait", type=_seconds, default=LOCK_WAIT_SECONDS,
                        help="seconds to wait while another promotion or rollback holds the gate lock "
                             f"(default {LOCK_WAIT_SECONDS:g}); then exit 4")
    return parser


def _seconds(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds (0 or more)")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    params = GateParams(version=(args.version or "").strip() or None, reason=(args.reason or "").strip() or None,
                        rollback=args.rollback, model_name=args.model_name, config=args.config,
                        reference_file=args.reference_file, output_dir=args.output_dir, lock_wait=args.lock_wait,
                        request_log=(args.request_log or "").strip() or None)
    try:
        decision = promote(params)
    except GateUsageError as exc:
        print(f"gate: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except GateBusy as exc:
        print(f"gate: gave up: {exc}", file=sys.stderr)
        return EXIT_BUSY
    except (GateError, ReferenceError, MlflowException) as exc:
        print(f"gate: could not decide: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except Exception as exc:
        traceback.print_exc()
        print(f"gate: failed unexpectedly: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_ERROR
    verb = _decision(decision).upper().replace("_", " ")
    before = decision.production or "none"
    print(f"gate: {verb}: {decision.model_name} v{decision.candidate} (Production before: v{before}); "
          f"MLflow run {decision.run_id} (experiment {registry.PROMOTION_EXPERIMENT})")
    for check in decision.checks:
        print(f"  [{'pass' if check.passed else 'FAIL'}] {check.name}: {check.detail}")
    for note in decision.notes:
        print(f"  note: {note}")
    for metric in COMPARED:
        cand, prod = decision.metrics.get(f"candidate.{metric}"), decision.metrics.get(f"production.{metric}")
        if cand is not None:
            print(f"  {metric}: candidate {cand:.4f}" + (f", production {prod:.4f}" if prod is not None else ""))
    return decision.exit_code


if __name__ == "__main__":
    sys.exit(main())
