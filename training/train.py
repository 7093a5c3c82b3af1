"""Train the fraud forest on labelled data only, evaluate it honestly, and register it in Staging.

`python -m training.train` (or `mlflow run . -e train`) runs these steps:

1. Load labelled rows (`training.data`): the reference database and request-log rows that
   received a true label through the feedback endpoint; unlabelled rows are excluded and counted.
2. Split: time-ordered by default (reference rows by `ts` = dataset Time, then request-log rows
   by `ts`; the last `test_fraction` is the evaluation set), or stratified at random. Refuse
   (registering nothing) when there are no labels, one class, or too few frauds in either part.
3. Fit a RandomForest (`training.forest`), printing progress tree by tree. The decision threshold
   is chosen on the out-of-bag predictions of the training rows: each row is scored only by the
   trees that did not see it, so no row used to fit a tree chooses its own threshold, and the
   evaluation set stays untouched until the final measurement.
4. Evaluate on the held-out set (`common.evaluation.evaluate_scores`); then `training.registration`
   exports ONNX and checks its parity with scikit-learn, writes plots, the evaluation JSON and the
   data the promotion gate and drift monitor need (`data/evaluation.parquet`,
   `data/training_features.parquet`).
5. Register a new version of MODEL_NAME in stage Staging with alias `challenger`, tagged with its
   metrics and threshold and described by its headline metrics and data. Production is never
   touched: promotion is the gate's job.

The run is named after its data and seed (`train · ref 284,807 + feedback 1,203 · seed 0`) and
logs the reference, feedback and evaluation rows as MLflow datasets (`training.datasets`).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from common import registry, settings
from common.evaluation import choose_threshold, evaluate_scores
from common.model import OnnxParityError
from common.schema import LABEL
from common.store import StoreUnavailable, describe
from training import registration
from training.data import LabelledData, Split, check_supports_model, load_labelled, resolve_sources, split_rows
from training.forest import fit_forest
from training.params import CLASS_WEIGHTS, TrainingError, TrainingRefused, TrainParams
from training.registration import Candidate


@dataclass(frozen=True)
class TrainResult:
    """What `train` registered, where, and how it measured."""

    run_id: str
    experiment_id: str
    tracking_uri: str
    model_name: str
    version: str
    model_uri: str
    threshold: float
    threshold_method: str
    metrics: dict[str, float]
    seconds: float
    artifacts: tuple[str, ...] = field(default=())


def train(params: TrainParams, *, progress: Callable[[str], None] | None = None) -> TrainResult:
    """Train, evaluate and register one model version (stage Staging, alias `challenger`).

    Tracking goes to MLFLOW_TRACKING_URI (default: the embedded SQLite store). Under `mlflow run`
    (MLFLOW_RUN_ID set) the project's run is reused; otherwise a run is started in
    `params.experiment`.

    Raises:
        TrainingRefused: the labelled data cannot support a model; no run is started (under
            `mlflow run` the run is tagged with the reason) and nothing is registered.
        TrainingError: a parameter is invalid or a data source is missing.
        common.model.OnnxParityError: the ONNX export disagrees with the forest; nothing registered.
    """
    started = time.perf_counter()
    say = _progress(progress, started)
    params.validate()
    model_name = params.model_name or settings.model_name()
    uri = settings.tracking_uri()

    reference, requests, notes = resolve_sources(params)
    for note in notes:
        say(note)
    say(f"loading labelled rows from {describe(reference)}" + (f" and {describe(requests)}" if requests else ""))
    with ThreadPoolExecutor(max_workers=1) as pool:
        imported = pool.submit(registration.import_logging_modules)
        data = load_labelled(reference, requests, notes)
        imported.result()
    frame = data.frame
    say(f"loaded {len(frame)} labelled rows ({int(frame[LABEL].sum())} frauds): {data.reference_rows} reference, "
        f"{data.request_labelled} request-log with feedback; excluded {data.excluded_unlabelled} unlabelled")
    split = split_rows(frame, params.split, params.test_fraction, params.seed,
                       served_trained_at=served_model_trained_at(model_name, uri),
                       min_eval_frauds=params.min_eval_frauds)
    if split.note:
        say(f"split ({split.method}): {split.note}")
    run_name = registration.run_name(data, params.seed)
    try:
        check_supports_model(data, split, params)
    except TrainingRefused as exc:
        registration.tag_refusal(uri, str(exc), run_name)
        raise

    with registry.use_tracking(uri), registration.active_run(params.experiment, uri, say, run_name) as run:
        run_id, experiment_id = run.info.run_id, run.info.experiment_id
        inputs = registration.log_inputs(params, data, split, model_name, run_id, uri)
        say(f"split ({split.method}): train {len(split.train)} rows ({int(data.labels(split.train).sum())} frauds), "
            f"evaluation {len(split.evaluation)} rows ({int(data.labels(split.evaluation).sum())} frauds)")
        with tempfile.TemporaryDirectory(prefix="train-artifacts-", ignore_cleanup_errors=True) as scratch:
            candidate = _fit_and_measure(params, data, split, Path(scratch), say)
            recorded = registration.record(candidate, Path(scratch), model_name, uri, run_id, inputs, say)
    seconds = time.perf_counter() - started
    say(f"done in {seconds:.1f}s: {model_name} version {recorded.version} is in Staging (alias challenger)")
    return TrainResult(run_id=run_id, experiment_id=experiment_id, tracking_uri=uri, model_name=model_name,
                       version=recorded.version, model_uri=f"models:/{model_name}/{recorded.version}",
                       threshold=candidate.threshold.threshold, threshold_method=params.threshold_method,
                       metrics=recorded.metrics, seconds=seconds, artifacts=recorded.artifacts)


def served_model_trained_at(model_name: str, uri: str) -> float | None:
    """When the served (Production) version's training run started, in epoch seconds; None without one."""
    from mlflow.exceptions import MlflowException

    client = registry.client(uri)
    try:
        served = registry.production_version(client, model_name)
        if served is None or not served.run_id:
            return None
        return client.get_run(served.run_id).info.start_time / 1000
    except MlflowException:
        return None


def _fit_and_measure(params: TrainParams, data: LabelledData, split: Split, artifacts: Path,
                     say: Callable[[str], None]) -> Candidate:
    """Fit the forest, choose its threshold out of bag, and measure it on the evaluation rows."""
    X_train, y_train = data.features(split.train), data.labels(split.train)
    weights, weighed = sample_weights(params, split)
    say(f"fitting {params.n_estimators} trees on {len(split.train)} rows{weighed}")
    forest = fit_forest(X_train, y_train, params, say, sample_weight=weights)
    registration.write_data_artifacts(artifacts, data, split, params.seed)
    rows, which = threshold_rows(params, split, y_train)
    choice = choose_threshold(y_train[rows], forest.oob_proba[rows], params.threshold_method, params.cost_ratio)
    say(f"threshold {choice.threshold:.4f} by {choice.description}, on {which}")
    say(f"evaluating on {len(split.evaluation)} held-out rows")
    eval_proba = forest.model.predict_proba(data.features(split.evaluation))[:, 1]
    evaluation = evaluate_scores(data.labels(split.evaluation), eval_proba, choice.threshold)
    say("evaluation: " + ", ".join(f"{k}={evaluation[k]:.4g}" for k in
                                   ("average_precision", "roc_auc", "precision", "recall", "f1")))
    return Candidate(params, data, split, forest, choice, eval_proba, evaluation)


def _arrived_since_served(split: Split) -> np.ndarray:
    """Which training rows' labels arrived since the served model was trained (a mask over `split.train`)."""
    return np.isin(split.train, split.arrived)


def sample_weights(params: TrainParams, split: Split) -> tuple[np.ndarray | None, str]:
    """Each training row's weight in the fit (None: all alike), and a note for the log.

    The rows whose labels arrived since the served model was trained weigh `recent_weight`, the others 1.
    scikit-learn draws each tree's bootstrap sample in proportion to the weights, so a weighted row is out of
    bag for fewer trees (docs/decisions/036-a-cost-threshold-and-recent-weights-off.md).
    """
    recent = _arrived_since_served(split)
    if params.recent_weight == 1.0 or not recent.any():
        return None, ""
    return np.where(recent, params.recent_weight, 1.0), (f", the {int(recent.sum())} whose labels arrived since the "
                                                          f"served model was trained weighing {params.recent_weight:g}")


def threshold_rows(params: TrainParams, split: Split, y_train: np.ndarray) -> tuple[np.ndarray, str]:
    """Which training rows choose the threshold (a boolean mask over `split.train`), and a description.

    With `threshold_rows="recent"`, the rows whose labels arrived since the served model was trained,
    when they hold at least `min_threshold_frauds` frauds: the threshold then fits the traffic the
    model will serve, in which a new fraud pattern may score lower than the old ones. Otherwise every
    training row.
    """
    everything = np.ones(len(split.train), dtype=bool)
    if params.threshold_rows != "recent" or not len(split.arrived):
        return everything, f"all {len(split.train)} training rows"
    recent = _arrived_since_served(split)
    frauds = int(y_train[recent].sum())
    if frauds < params.min_threshold_frauds or frauds == int(recent.sum()):
        return everything, (f"all {len(split.train)} training rows (the {int(recent.sum())} that arrived since the "
                            f"served model was trained hold {frauds} frauds; {params.min_threshold_frauds} needed)")
    return recent, (f"the {int(recent.sum())} training rows ({frauds} frauds) whose labels arrived since the served "
                    "model was trained")


def _progress(progress: Callable[[str], None] | None, started: float) -> Callable[[str], None]:
    def say(message: str) -> None:
        line = f"[train {time.perf_counter() - started:6.1f}s] {message}"
        if progress is None:
            print(line, flush=True)
        else:
            progress(line)
    return say


# --- CLI --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training.train", description=__doc__.splitlines()[0])
    defaults = TrainParams()
    helps = {
        "data": "reference database path or URL (default: REFERENCE_DB, data/reference_data.db)",
        "requests": "request log path or URL whose feedback-labelled rows are added (default: LATEST_DB when it "
                    "exists; 'none' for no request log)",
        "max_depth": "maximum tree depth; 0 = unlimited",
        "max_features": "features per split: sqrt, log2, none, a fraction or a count",
        "max_samples": "each tree's bootstrap sample, as a fraction of the training rows (1 = all)",
        "class_weight": f"one of {CLASS_WEIGHTS}",
        "split": "time: evaluate on the latest rows; stratified: random split keeping the fraud rate",
        "model_name": "registered model name (default: MODEL_NAME, fraud-detector)",
        "threshold_method": "f1: max F1; cost: min cost_ratio x missed frauds + false alarms",
        "cost_ratio": "cost of a missed fraud in false alarms (threshold_method=cost)",
        "threshold_rows": "recent: choose the threshold on the training rows whose labels arrived since the served "
                          "model was trained (when they hold min_threshold_frauds frauds); all: on every training row",
        "min_threshold_frauds": "frauds the recent rows need to choose the threshold (threshold_rows=recent)",
        "recent_weight": "weight in the fit of each training row whose label arrived since the served model was "
                         "trained (the others weigh 1)",
        "min_train_frauds": "refuse when the training part has fewer frauds",
        "min_eval_frauds": "refuse when the evaluation part has fewer frauds",
    }
    converters = {"int": int, "float": float, "str": str}
    for f in dataclasses.fields(TrainParams):
        kind = f.type if isinstance(f.type, str) else f.type.__name__  # a name under postponed annotations
        flags = [f"--{f.name}"] + ([f"--{f.name.replace('_', '-')}"] if "_" in f.name else [])
        parser.add_argument(*flags, dest=f.name, type=converters[kind], default=getattr(defaults, f.name),
                            help=helps.get(f.name, f"default {getattr(defaults, f.name)!r}"))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    params = TrainParams(**vars(args))
    try:
        result = train(params)
    except TrainingRefused as exc:
        print(f"train: refused, nothing registered: {exc}", file=sys.stderr)
        return 3
    except (TrainingError, OnnxParityError, StoreUnavailable) as exc:
        print(f"train: {exc}; nothing registered", file=sys.stderr)
        return 2
    metrics = result.metrics
    print(f"registered {result.model_name} version {result.version} (Staging, alias challenger) from run "
          f"{result.run_id}: average_precision={metrics['average_precision']:.4f} roc_auc={metrics['roc_auc']:.4f} "
          f"precision={metrics['precision']:.3f} recall={metrics['recall']:.3f} threshold={result.threshold:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
