"""What a training run records in MLflow, and the version it registers.

The run is named after what it trained on (`run_name`). It holds the parameters (as given, and as
resolved), tags naming the code and the data, the data as MLflow datasets (`training.datasets`), the
metrics of `common.evaluation`, the model and its ONNX export (`common.model.log_fraud_model`),
plots, an evaluation JSON, and the data the promotion gate and the drift monitor read
(EVALUATION_ARTIFACT, TRAINING_FEATURES_ARTIFACT). The model is registered last, as a new version
in stage Staging (alias `challenger`) tagged with its threshold and metrics and described by its
headline metrics and its data (`version_description`); Production is never touched here:
promotion is the gate's job.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.metrics import average_precision_score

from common import registry
from common.evaluation import ThresholdChoice
from common.model import (
    ONNX_ARTIFACT,
    THRESHOLD_METHOD_TAG,
    THRESHOLD_TAG,
    LoggedFraudModel,
    export_onnx,
    log_fraud_model,
)
from common.paths import REPO_ROOT
from common.schema import FEATURES, LABEL
from common.store import describe
from training import datasets
from training.data import LabelledData, Split
from training.datasets import TrainingDatasets
from training.forest import FittedForest
from training.params import TrainParams

# The drift monitor's reference: a bounded sample of the training features.
TRAINING_SAMPLE_ROWS = 50_000
EVALUATION_ARTIFACT = "data/evaluation.parquet"
TRAINING_FEATURES_ARTIFACT = "data/training_features.parquet"
EVALUATION_JSON = "evaluation.json"
# Version tags copied from the evaluation metrics, so the registry UI and the gate can read them.
VERSION_TAG_METRICS = ("average_precision", "roc_auc", "precision", "recall", "f1", "recall_at_precision_90",
                       "brier_score", "log_loss", "eval_rows", "eval_frauds", "train_rows", "train_frauds")


@dataclass(frozen=True)
class Candidate:
    """A fitted forest, how it was made, and how it measured: everything a run records about it."""

    params: TrainParams
    data: LabelledData
    split: Split
    forest: FittedForest
    threshold: ThresholdChoice  # chosen on the forest's out-of-bag scores
    eval_proba: np.ndarray  # the forest's fraud probabilities of the evaluation rows
    evaluation: dict[str, float]  # `common.evaluation.evaluate_scores` on the evaluation rows


@dataclass(frozen=True)
class Recorded:
    """What `record` left in the registry and the run: the version, the logged metrics, the artifact paths."""

    version: str
    metrics: dict[str, float]
    artifacts: tuple[str, ...]


# --- the run ----------------------------------------------------------------------------------------


def run_name(data: LabelledData, seed: int) -> str:
    """What the run trains on, e.g. `train · ref 284,807 + feedback 1,203 · seed 0` (no feedback part
    without a request log)."""
    parts = [f"ref {data.reference_rows:,}"] + ([f"feedback {data.request_labelled:,}"] if data.requests else [])
    return f"train · {' + '.join(parts)} · seed {seed}"


@contextmanager
def active_run(experiment: str, uri: str, say: Callable[[str], None], name: str) -> Iterator:
    """The run to record in: the caller's active run (its name left as the caller chose), the one
    `mlflow run` started (MLFLOW_RUN_ID; renamed `name`, as MLflow named it at random), or a new run
    `name` in `experiment`. MLflow's fluent API must already point at `uri`."""
    import mlflow

    active = mlflow.active_run()
    if active is not None:
        yield active
        return
    run_id = os.environ.get("MLFLOW_RUN_ID")
    if run_id:
        registry.client(uri).update_run(run_id, name=name)
        with mlflow.start_run(run_id=run_id) as run:
            chosen = registry.client(uri).get_experiment(run.info.experiment_id).name
            if chosen != experiment:
                say(f"note: this run is in experiment {chosen!r}, chosen by `mlflow run` "
                    f"(use --experiment-name {experiment} to put it in {experiment!r})")
            yield run
        return
    experiment_id = registry.ensure_experiment(experiment, uri)
    with mlflow.start_run(experiment_id=experiment_id, run_name=name) as run:
        yield run


def tag_refusal(uri: str, reason: str, name: str) -> None:
    """Under `mlflow run` a run already exists: say on it why nothing was trained, in its name too."""
    run_id = os.environ.get("MLFLOW_RUN_ID")
    if run_id:
        mlflow_client = registry.client(uri)
        mlflow_client.set_tag(run_id, "refused", reason[:5000])
        mlflow_client.update_run(run_id, name=f"{name} · refused")


def git_commit() -> tuple[str, bool]:
    """(HEAD commit or "unknown", whether tracked files differ from it)."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip() != ""
        return commit, dirty
    except (OSError, subprocess.SubprocessError):
        return "unknown", False


def log_inputs(params: TrainParams, data: LabelledData, split: Split, model_name: str, run_id: str,
               uri: str) -> TrainingDatasets:
    """Log the parameters, the tags that name the code and the data, and the data as MLflow datasets,
    before anything is fitted. Returns the datasets."""
    import mlflow

    commit, dirty = git_commit()
    reference = describe(data.reference)
    requests = describe(data.requests) if data.requests else "none"
    # `mlflow run` has already logged the parameters as given; params cannot change, so only the
    # missing ones are added, and resolved values go under their own keys.
    given = mlflow.get_run(run_id).data.params
    mlflow.log_params({k: v for k, v in dataclasses.asdict(params).items() if k not in given})
    mlflow.log_params({
        "data_source": reference,
        "requests_source": requests,
        "registered_model_name": model_name,
        "reference_rows": data.reference_rows,
        "request_labelled_rows": data.request_labelled,
        "request_archived_rows": data.request_archived,
        "excluded_unlabelled_rows": data.excluded_unlabelled,
        "data_sha256": data.sha256,
        "threshold_source": "out-of-bag",
    })
    mlflow.set_tags({
        "git_commit": commit,
        "git_dirty": str(dirty).lower(),
        "data_source_reference": reference,
        "data_source_requests": requests,
        "data_sha256": data.sha256,
        "split": params.split,
        **({"split_note": split.note} if split.note else {}),
        THRESHOLD_METHOD_TAG: params.threshold_method,
        "model_name": model_name,
        **({"data_notes": "; ".join(data.notes)} if data.notes else {}),
    })
    built = datasets.build(data, split, mlflow.get_artifact_uri(EVALUATION_ARTIFACT))
    registry.client(uri).log_inputs(run_id, datasets=built.inputs(split, data))
    return built


# --- artifacts --------------------------------------------------------------------------------------


def import_logging_modules() -> None:
    """Import what logging the model needs (about 3 s): `train` runs this beside the data loading.

    Not beside the fit: these imports may enter `warnings.catch_warnings`, which swaps the process's
    filter list, and the fit narrows one filter of its own (training/forest.py) that a swap on
    another thread would undo.
    """
    # log_model checks the input example by loading the model through mlflow.pyfunc.
    import mlflow.models.utils
    import mlflow.pyfunc
    import mlflow.sklearn  # noqa: F401
    import onnxruntime  # noqa: F401
    import pyarrow.parquet  # noqa: F401
    import skl2onnx  # noqa: F401
    import skops.io  # noqa: F401

    import training.plots  # noqa: F401 - matplotlib


def write_data_artifacts(root: Path, data: LabelledData, split: Split, seed: int) -> None:
    """Write the evaluation rows and a sample of the training features under `root`."""
    (root / "data").mkdir(parents=True, exist_ok=True)
    frame = data.frame
    frame.loc[split.evaluation, [*FEATURES, LABEL, "ts", "source"]].to_parquet(root / EVALUATION_ARTIFACT,
                                                                              index=False)
    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(split.train, size=min(TRAINING_SAMPLE_ROWS, len(split.train)), replace=False))
    data.features(sample).to_parquet(root / TRAINING_FEATURES_ARTIFACT, index=False)


def record(candidate: Candidate, root: Path, model_name: str, uri: str, run_id: str, inputs: TrainingDatasets,
           say: Callable[[str], None]) -> Recorded:
    """Log the model, its metrics and the artifacts under `root` to the active run, then register
    the version in Staging. The metrics measured on the evaluation rows are logged against
    `inputs.evaluation` and the logged model, and the row counts against their sources: the
    model's lineage.

    Raises:
        common.model.OnnxParityError: the ONNX export disagrees with the forest; nothing registered.
    """
    import mlflow

    say("exporting ONNX and checking parity with scikit-learn; drawing the plots meanwhile")
    logged = _log_model_and_plots(candidate, root)
    say(f"logged the model; ONNX max |Δp| = {logged.onnx_max_abs_diff:.2g} on {len(candidate.split.evaluation)} "
        "rows")
    metrics = run_metrics(candidate, logged)
    finite = {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(float(v))}
    # Each dataset gets the metrics that describe the model on it (the evaluation rows), or its
    # share of the training (the row counts of the two sources): the model's page lists every
    # dataset a metric of the model names.
    against = [(inputs.evaluation, evaluation_metric_names(candidate)), (inputs.reference, {"reference_rows"})]
    if inputs.feedback is not None:
        against.append((inputs.feedback, {"request_labelled_rows"}))
    for dataset, names in against:
        mlflow.log_metrics({k: v for k, v in finite.items() if k in names}, dataset=dataset,
                           model_id=logged.model_id)
    linked = set().union(*(names for _dataset, names in against))
    mlflow.log_metrics({k: v for k, v in finite.items() if k not in linked})

    say("logging plots, evaluation JSON and data artifacts")
    (root / EVALUATION_JSON).write_text(json.dumps(evaluation_report(candidate, metrics, run_id), indent=2,
                                                   default=str) + "\n")
    mlflow.log_artifacts(str(root))
    artifacts = tuple(sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()))

    say(f"registering {model_name}")
    version = register(model_name, logged.model_uri, candidate.threshold, metrics,
                       version_description(candidate, metrics, run_id), uri)
    return Recorded(version, metrics, artifacts)


def _log_model_and_plots(candidate: Candidate, root: Path) -> LoggedFraudModel:
    from training import plots

    model, choice = candidate.forest.model, candidate.threshold
    y_eval = candidate.data.labels(candidate.split.evaluation)
    with ThreadPoolExecutor(max_workers=1) as pool:
        drawn = pool.submit(plots.write_plots, root / "plots", y_eval, candidate.eval_proba, choice.threshold,
                            candidate.evaluation, FEATURES, model.feature_importances_)
        onnx_bytes = export_onnx(model)
        logged = log_fraud_model(model, candidate.data.features(candidate.split.evaluation).to_numpy(),
                                 choice.threshold, candidate.params.threshold_method,
                                 reference_proba=candidate.eval_proba, onnx_bytes=onnx_bytes,
                                 extra_metadata={"cost_ratio": choice.cost_ratio, "threshold_source": "out-of-bag"})
        drawn.result()
    return logged


def evaluation_metric_names(candidate: Candidate) -> set[str]:
    """The names under which `run_metrics` logs what was measured on the evaluation rows."""
    renamed = {"rows": "eval_rows", "frauds": "eval_frauds", "fraud_rate": "eval_fraud_rate"}
    return {renamed.get(k, k) for k in candidate.evaluation}


def run_metrics(candidate: Candidate, logged: LoggedFraudModel) -> dict[str, float]:
    """Every metric the run logs: the evaluation's, the training part's, the model's sizes and parity."""
    evaluation, forest, data = candidate.evaluation, candidate.forest, candidate.data
    y_train = data.labels(candidate.split.train)
    scored = forest.oob_scored
    return {
        **{k: v for k, v in evaluation.items() if k not in ("rows", "frauds", "fraud_rate")},
        "eval_rows": evaluation["rows"],
        "eval_frauds": evaluation["frauds"],
        "eval_fraud_rate": evaluation["fraud_rate"],
        "train_rows": len(y_train),
        "train_frauds": int(y_train.sum()),
        "oob_average_precision": float(average_precision_score(y_train[scored], forest.oob_proba[scored])),
        "oob_scored_rows": int(scored.sum()),
        "threshold": candidate.threshold.threshold,
        "training_seconds": forest.seconds,
        "model_size_bytes": logged.model_size_bytes or 0,
        "onnx_size_bytes": logged.onnx_size_bytes,
        "onnx_max_abs_diff": logged.onnx_max_abs_diff,
        "reference_rows": data.reference_rows,
        "request_labelled_rows": data.request_labelled,
        "excluded_unlabelled_rows": data.excluded_unlabelled,
    }


def evaluation_report(candidate: Candidate, metrics: dict[str, float], run_id: str) -> dict:
    """The run's EVALUATION_JSON: metrics, threshold, split, data provenance, parameters, artifacts."""
    from training import plots

    params, data, split = candidate.params, candidate.data, candidate.split
    frame = data.frame
    train_ts, eval_ts = frame["ts"].to_numpy()[split.train], frame["ts"].to_numpy()[split.evaluation]
    return {
        "run_id": run_id,
        "metrics": {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()},
        "threshold": {**dataclasses.asdict(candidate.threshold), "rule": "p >= threshold is fraud",
                      "chosen_on": "out-of-bag predictions of the training rows"},
        "split": {"method": split.method, "note": split.note, "test_fraction": params.test_fraction,
                  "train_rows": len(split.train), "eval_rows": len(split.evaluation),
                  "train_ts": [float(train_ts.min()), float(train_ts.max())],
                  "eval_ts": [float(eval_ts.min()), float(eval_ts.max())],
                  "eval_sources": frame.loc[split.evaluation, "source"].value_counts().to_dict()},
        "data": {"reference": describe(data.reference),
                 "requests": describe(data.requests) if data.requests else None,
                 "reference_rows": data.reference_rows, "request_labelled_rows": data.request_labelled,
                 "excluded_unlabelled_rows": data.excluded_unlabelled, "sha256": data.sha256,
                 "notes": list(data.notes)},
        "params": dataclasses.asdict(params),
        "artifacts": {"model": "model (registered)", "onnx": ONNX_ARTIFACT, "evaluation": EVALUATION_ARTIFACT,
                      "training_features": TRAINING_FEATURES_ARTIFACT, "plots": list(plots.PLOT_FILES)},
    }


# --- the registry -----------------------------------------------------------------------------------


def _tag_value(value) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def version_description(candidate: Candidate, metrics: dict, run_id: str) -> str:
    """The registered version's description: the headline metrics at the threshold, and the data."""
    data, split, choice = candidate.data, candidate.split, candidate.threshold
    feedback = f" + feedback {data.request_labelled:,}" if data.requests else ""
    return (f"Average precision {metrics['average_precision']:.4f}, recall {metrics['recall']:.3f} and precision "
            f"{metrics['precision']:.3f} at threshold {choice.threshold:.4f} ({choice.method}), on "
            f"{int(metrics['eval_rows']):,} held-out rows with {int(metrics['eval_frauds']):,} frauds.\n\n"
            f"Data: reference {data.reference_rows:,}{feedback} labelled rows; {split.method} split, "
            f"{len(split.train):,} rows trained on and {len(split.evaluation):,} evaluated on"
            + (f" ({split.note})" if split.note else "") + f". RandomForest from run {run_id}.")


def register(model_name: str, model_uri: str, choice: ThresholdChoice, metrics: dict, description: str,
             uri: str) -> str:
    """Register the logged model as a new version in Staging; on any failure, remove that version."""
    import mlflow

    tags = {THRESHOLD_TAG: repr(choice.threshold), THRESHOLD_METHOD_TAG: choice.method,
            **({"cost_ratio": _tag_value(choice.cost_ratio)} if choice.cost_ratio else {}),
            **{name: _tag_value(metrics[name]) for name in VERSION_TAG_METRICS}}
    mlflow_client = registry.client(uri)
    version = mlflow.register_model(model_uri, model_name, tags=tags).version
    try:
        mlflow_client.update_model_version(model_name, version, description=description)
        registry.move_to_stage(mlflow_client, model_name, version, "Staging")
    except BaseException:
        mlflow_client.delete_model_version(model_name, version)
        raise
    return str(version)
