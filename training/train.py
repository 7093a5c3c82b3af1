"""Train the fraud forest on labelled data only, evaluate it honestly, and register it in Staging.

`python -m training.train` (or `mlflow run . -e train`) runs these steps:

1. Load labelled rows: the reference database (every row has `Class`) and request-log rows that
   received a true label through the feedback endpoint. Unlabelled rows are excluded and counted;
   a label is never derived from a model score.
2. Split: time-ordered by default (reference rows by `ts` = dataset Time, then request-log rows
   by `ts`; the last `test_fraction` is the evaluation set), or stratified at random. Refuse
   (registering nothing) when there are no labels, one class, or too few frauds in either part.
3. Fit a RandomForest, printing progress tree by tree. The decision threshold
   is chosen on the out-of-bag predictions of the training rows: each row is scored only by the
   trees that did not see it, so no row used to fit a tree chooses its own threshold, and the
   evaluation set stays untouched until the final measurement.
4. Evaluate on the held-out set (`common.evaluation.evaluate_scores`), export ONNX and check its
   parity with scikit-learn, write plots, the evaluation JSON and the data the promotion gate and
   drift monitor need (`data/evaluation.parquet`, `data/training_features.parquet`).
5. Register a new version of MODEL_NAME in stage Staging with alias `challenger`, tagged with its
   metrics and threshold. Production is never touched: promotion is the gate's job.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import average_precision_score

from common import evaluation as ev
from common import registry, settings
from common.model import (
    ONNX_ARTIFACT,
    THRESHOLD_METHOD_TAG,
    THRESHOLD_TAG,
    OnnxParityError,
    export_onnx,
    log_fraud_model,
)
from common.paths import REPO_ROOT
from common.schema import FEATURES, LABEL
from common.store import RequestStore, StoreUnavailable, describe
from common.text import first_line

SPLITS = ("time", "stratified")
CLASS_WEIGHTS = ("none", "balanced", "balanced_subsample")
# The drift monitor's reference: a bounded sample of the training features.
TRAINING_SAMPLE_ROWS = 50_000
EVALUATION_ARTIFACT = "data/evaluation.parquet"
TRAINING_FEATURES_ARTIFACT = "data/training_features.parquet"
EVALUATION_JSON = "evaluation.json"
# Version tags copied from the evaluation metrics, so the registry UI and the gate can read them.
VERSION_TAG_METRICS = ("average_precision", "roc_auc", "precision", "recall", "f1", "recall_at_precision_90",
                       "brier_score", "log_loss", "eval_rows", "eval_frauds", "train_rows", "train_frauds")


class TrainingError(RuntimeError):
    """Training could not run: a data source is missing or the parameters are invalid."""


class TrainingRefused(TrainingError):
    """The labelled data cannot support an honest model; nothing was registered."""


@dataclass(frozen=True)
class TrainParams:
    """Training parameters; the names are those of the MLproject `train` entry point and the CLI.

    `data`/`requests` are SQLite paths or SQLAlchemy URLs. `data=""` means REFERENCE_DB;
    `requests=""` means LATEST_DB when it exists and `requests="none"` uses no request log.
    `max_depth=0` means unlimited. `model_name=""` means MODEL_NAME.
    """

    data: str = ""
    requests: str = ""
    n_estimators: int = 100
    max_depth: int = 0
    min_samples_leaf: int = 1
    max_features: str = "sqrt"
    # Each tree's bootstrap sample holds half the training rows: on the generated data the forest
    # ranks as well as with full-size samples, in a little over half the fitting time.
    max_samples: float = 0.5
    class_weight: str = "none"
    test_fraction: float = 0.2
    split: str = "time"
    seed: int = 0
    model_name: str = ""
    experiment: str = registry.TRAINING_EXPERIMENT
    threshold_method: str = "f1"
    cost_ratio: float = ev.DEFAULT_COST_RATIO
    min_train_frauds: int = 20
    min_eval_frauds: int = 10
    n_jobs: int = -1

    def validate(self) -> None:
        """Raises TrainingError naming the first invalid parameter."""
        checks = [
            (self.n_estimators >= 1, f"n_estimators must be at least 1, got {self.n_estimators}"),
            (self.max_depth >= 0, f"max_depth must be 0 (unlimited) or more, got {self.max_depth}"),
            (self.min_samples_leaf >= 1, f"min_samples_leaf must be at least 1, got {self.min_samples_leaf}"),
            (0.0 < self.max_samples <= 1.0, f"max_samples must be within (0, 1], got {self.max_samples}"),
            (self.class_weight in CLASS_WEIGHTS, f"class_weight must be one of {CLASS_WEIGHTS}, got "
                                                 f"{self.class_weight!r}"),
            (0.0 < self.test_fraction < 1.0, f"test_fraction must be within (0, 1), got {self.test_fraction}"),
            (self.split in SPLITS, f"split must be one of {SPLITS}, got {self.split!r}"),
            (self.threshold_method in ev.THRESHOLD_METHODS,
             f"threshold_method must be one of {ev.THRESHOLD_METHODS}, got {self.threshold_method!r}"),
            (self.cost_ratio > 0, f"cost_ratio must be above 0, got {self.cost_ratio}"),
            (self.min_train_frauds >= 1, f"min_train_frauds must be at least 1, got {self.min_train_frauds}"),
            (self.min_eval_frauds >= 1, f"min_eval_frauds must be at least 1, got {self.min_eval_frauds}"),
            (self.experiment.strip() != "", "experiment must not be empty"),
        ]
        for ok, message in checks:
            if not ok:
                raise TrainingError(message)
        _max_features(self.max_features)

    def forest_kwargs(self) -> dict:
        """RandomForestClassifier arguments (bootstrap on: the threshold needs out-of-bag scores)."""
        return {
            "n_estimators": self.n_estimators,
            "max_depth": self.max_depth or None,
            "min_samples_leaf": self.min_samples_leaf,
            "max_features": _max_features(self.max_features),
            "class_weight": None if self.class_weight == "none" else self.class_weight,
            "bootstrap": True,
            "max_samples": None if self.max_samples >= 1.0 else self.max_samples,
            "random_state": self.seed,
            "n_jobs": self.n_jobs,
        }


@dataclass(frozen=True)
class LabelledData:
    """Labelled rows in time order (reference first, then the request log) and their provenance."""

    frame: pd.DataFrame  # FEATURES + Class + ts + source
    reference: str
    requests: str | None
    reference_rows: int
    reference_unlabelled: int
    request_labelled: int
    request_unlabelled: int
    sha256: str
    notes: tuple[str, ...] = ()

    @property
    def excluded_unlabelled(self) -> int:
        return self.reference_unlabelled + self.request_unlabelled


@dataclass(frozen=True)
class TrainResult:
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


# --- data -------------------------------------------------------------------------------------------


def _location(value: str) -> str:
    """A user-given path resolved against the working directory; URLs unchanged."""
    return value if "://" in value else str(Path(value).expanduser().resolve())


def _is_missing_file(location: str) -> bool:
    return "://" not in location and not Path(location).is_file()


def resolve_sources(params: TrainParams) -> tuple[str, str | None, tuple[str, ...]]:
    """(reference, request log or None, notes) for the parameters and environment.

    Raises:
        TrainingError: the reference database or an explicitly named request log does not exist.
    """
    reference = _location(params.data) if params.data else settings.reference_db_url()
    if _is_missing_file(reference):
        raise TrainingError(f"reference database {reference} does not exist; generate and import data first "
                            "(make data, or mlflow run . -e generate then -e import_csv)")
    notes: list[str] = []
    if params.requests.lower() == "none":
        requests = None
    elif params.requests:
        requests = _location(params.requests)
        if _is_missing_file(requests):
            raise TrainingError(f"request log {requests} does not exist")
    else:
        requests = settings.request_log_url()
        if _is_missing_file(requests):
            notes.append(f"no request log at {requests} (LATEST_DB); training on the reference data only")
            requests = None
    if requests is not None and _same_location(requests, reference):
        raise TrainingError(f"the request log and the reference database are the same ({describe(reference)})")
    return reference, requests, tuple(notes)


def _same_location(a: str, b: str) -> bool:
    return describe(a) == describe(b)


def _read_labelled(location: str) -> tuple[pd.DataFrame, int]:
    import sqlalchemy as sa

    columns = (*FEATURES, LABEL, "ts")
    store = RequestStore(location, create=False)
    try:
        values = store.read_columns(columns, dtype=np.float64, labelled=True)
        unlabelled = store.count(labelled=False)
    except sa.exc.SQLAlchemyError as exc:
        raise StoreUnavailable(f"cannot read the requests table of {describe(location)}: {first_line(exc)}") from None
    finally:
        store.dispose()
    frame = pd.DataFrame(dict(zip(columns, values, strict=True)))
    if not frame["ts"].is_monotonic_increasing:
        frame = frame.sort_values("ts", kind="stable", ignore_index=True)
    return frame, unlabelled


def load_labelled(reference: str, requests: str | None, notes: tuple[str, ...] = ()) -> LabelledData:
    """Read the labelled rows of both sources, time-ordered within each, reference first.

    Raises:
        common.store.StoreUnavailable: a database cannot be read.
    """
    ref, ref_unlabelled = _read_labelled(reference)
    ref["source"] = "reference"
    parts = [ref]
    req_labelled = req_unlabelled = 0
    if requests is not None:
        req, req_unlabelled = _read_labelled(requests)
        req["source"] = "requests"
        req_labelled = len(req)
        parts.append(req)
    frame = pd.concat(parts, ignore_index=True) if len(parts) > 1 else ref
    frame[LABEL] = frame[LABEL].astype(np.int64)
    return LabelledData(frame, reference, requests, len(ref), ref_unlabelled, req_labelled, req_unlabelled,
                        content_hash(frame), notes)


def content_hash(frame: pd.DataFrame) -> str:
    """SHA-256 of the labelled rows exactly as trained on (features, label, ts, in order)."""
    digest = hashlib.sha256()
    digest.update(np.ascontiguousarray(frame[[*FEATURES, "ts"]].to_numpy(np.float64)).tobytes())
    digest.update(np.ascontiguousarray(frame[LABEL].to_numpy(np.int64)).tobytes())
    return digest.hexdigest()


def split_rows(frame: pd.DataFrame, method: str, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Row positions (train, evaluation).

    time: the last `test_fraction` of the rows, in their time order, is the evaluation set.
    stratified: a random split keeping the fraud rate equal in both parts.
    """
    n = len(frame)
    n_eval = max(1, math.ceil(n * test_fraction)) if n else 0
    if method == "time":
        positions = np.arange(n)
        return positions[: n - n_eval], positions[n - n_eval:]
    from sklearn.model_selection import train_test_split

    labels = frame[LABEL].to_numpy()
    stratify = labels if np.bincount(labels, minlength=2).min() >= 2 else None
    train, evaluation = train_test_split(np.arange(n), test_size=n_eval, random_state=seed, stratify=stratify)
    return np.sort(train), np.sort(evaluation)


def check_supports_model(y_all: np.ndarray, y_train: np.ndarray, y_eval: np.ndarray, params: TrainParams,
                         data: LabelledData) -> None:
    """Raise TrainingRefused when the labelled data cannot support an honest model."""
    sources = describe(data.reference) + (f" and {describe(data.requests)}" if data.requests else "")
    if len(y_all) == 0:
        raise TrainingRefused(f"no labelled rows in {sources} ({data.excluded_unlabelled} unlabelled rows excluded)")
    classes = np.unique(y_all)
    if len(classes) < 2:
        only = "fraud" if classes[0] == 1 else "legitimate"
        raise TrainingRefused(f"all {len(y_all)} labelled rows are {only}; a classifier needs both classes")
    for part, y, minimum, option in (("training", y_train, params.min_train_frauds, "min_train_frauds"),
                                     ("evaluation", y_eval, params.min_eval_frauds, "min_eval_frauds")):
        frauds = int(y.sum())
        if frauds < minimum:
            raise TrainingRefused(f"the {part} part ({params.split} split) has {frauds} frauds in {len(y)} rows; at "
                                  f"least {minimum} are needed ({option})")
        if frauds == len(y):
            raise TrainingRefused(f"the {part} part ({params.split} split) has no legitimate rows")


# --- fitting ----------------------------------------------------------------------------------------


def _max_features(value: str):
    text = str(value).strip().lower()
    if text in ("sqrt", "log2"):
        return text
    if text in ("none", "all", ""):
        return None
    try:
        number = float(text)
    except ValueError:
        raise TrainingError(f"max_features must be sqrt, log2, none, a fraction in (0, 1] or a count; got "
                            f"{value!r}") from None
    if number.is_integer() and number > 1:
        return int(number)
    if 0.0 < number <= 1.0:
        return number
    raise TrainingError(f"max_features must be sqrt, log2, none, a fraction in (0, 1] or a count; got {value!r}")


def fit_forest(X: pd.DataFrame, y: np.ndarray, params: TrainParams, say: Callable[[str], None]):
    """Grow the forest in one `fit`, tree by tree with scikit-learn's own progress lines, then score
    each training row out of bag.

    One `fit` rather than warm-start chunks: chunk boundaries leave a core idle while the chunk's
    last tree finishes, which cost about 2 s of a full-size fit here.

    Returns:
        (fitted forest, out-of-bag fraud probability per training row, NaN where a row was in
        every tree's bootstrap sample).
    """
    from sklearn.ensemble import RandomForestClassifier

    # verbose=2: "building tree i of n" per tree, and joblib's elapsed-time lines on stderr.
    model = RandomForestClassifier(**params.forest_kwargs(), verbose=2)
    started = time.perf_counter()
    model.fit(X, y)
    model.set_params(verbose=0)  # or every predict_proba of the served model would print progress
    say(f"fitted {len(model.estimators_)} trees in {time.perf_counter() - started:.1f}s")
    oob = out_of_bag_proba(model, X, params.n_jobs)
    say(f"scored {int(np.isfinite(oob).sum())} training rows out of bag ({time.perf_counter() - started:.1f}s)")
    return model, oob


def out_of_bag_proba(model, X: pd.DataFrame | np.ndarray, n_jobs: int = -1) -> np.ndarray:
    """Each training row's fraud probability, averaged over the trees that did not see it.

    The same numbers as scikit-learn's `oob_decision_function_[:, 1]` (a test holds them equal),
    computed faster: every tree scores all rows at once, trees in parallel, and each tree's
    in-bag rows are masked out, where scikit-learn copies each tree's out-of-bag rows and scores
    them one tree after another. NaN marks rows that were in every tree's bootstrap sample.

    Args:
        model: a forest fitted with bootstrap samples on exactly these rows, without sample weights.
        X: the training rows, in the order they were fitted.
        n_jobs: threads; -1 for one per CPU.
    """
    # Private, so pinned by the equality test: the bootstrap indices of each tree, from its seed.
    from sklearn.ensemble._forest import _generate_unsampled_indices

    rows = np.ascontiguousarray(X, dtype=np.float32)  # the trees' own input type
    n = len(rows)
    # The documented rule for max_samples: a float is a fraction, rounded, at least one row.
    fraction = model.max_samples
    n_bootstrap = n if fraction is None else (fraction if isinstance(fraction, int) else max(round(n * fraction), 1))
    fraud = list(model.classes_).index(1)

    def score(tree) -> tuple[np.ndarray, np.ndarray]:
        out_of_bag = np.zeros(n, dtype=bool)
        out_of_bag[_generate_unsampled_indices(tree.random_state, n, n_bootstrap, None)] = True
        return out_of_bag, tree.predict_proba(rows, check_input=False)[:, fraud]

    sums, counts = np.zeros(n), np.zeros(n, dtype=np.int64)
    workers = (os.cpu_count() or 1) if n_jobs < 0 else max(1, n_jobs)
    trees = model.estimators_
    with ThreadPoolExecutor(max_workers=workers) as pool:
        # A few trees per worker at a time, so at most that many full-length score vectors wait.
        for start in range(0, len(trees), 4 * workers):
            for out_of_bag, p in pool.map(score, trees[start:start + 4 * workers]):
                sums += np.where(out_of_bag, p, 0.0)
                counts += out_of_bag
    result = np.full(n, np.nan)
    np.divide(sums, counts, out=result, where=counts > 0)
    return result


# --- tracking ---------------------------------------------------------------------------------------


@contextmanager
def _tracking(uri: str) -> Iterator[None]:
    """Point MLflow's fluent API at `uri` for the block, then restore what the caller had."""
    import mlflow
    from mlflow.tracking import _tracking_service
    from mlflow.tracking._model_registry import utils as registry_utils

    saved_env = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    saved = (_tracking_service.utils._tracking_uri, registry_utils._registry_uri)
    registry.configure_tracking(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(saved[0])
        mlflow.set_registry_uri(saved[1])
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


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


def _tag_value(value) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


# --- the step ---------------------------------------------------------------------------------------


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
    data = load_labelled(reference, requests, notes)
    frame = data.frame
    say(f"loaded {len(frame)} labelled rows ({int(frame[LABEL].sum())} frauds): {data.reference_rows} reference, "
        f"{data.request_labelled} request-log with feedback; excluded {data.excluded_unlabelled} unlabelled")
    train_pos, eval_pos = split_rows(frame, params.split, params.test_fraction, params.seed)
    y_all = frame[LABEL].to_numpy()
    try:
        check_supports_model(y_all, y_all[train_pos], y_all[eval_pos], params, data)
    except TrainingRefused as exc:
        _tag_refusal(uri, str(exc))
        raise

    with _tracking(uri), _active_run(params.experiment, uri, say) as run:
        run_id, experiment_id = run.info.run_id, run.info.experiment_id
        result = _train_in_run(params, data, train_pos, eval_pos, model_name, uri, run_id, say)
    seconds = time.perf_counter() - started
    say(f"done in {seconds:.1f}s: {model_name} version {result['version']} is in Staging (alias challenger)")
    return TrainResult(run_id=run_id, experiment_id=experiment_id, tracking_uri=uri, model_name=model_name,
                       version=result["version"], model_uri=f"models:/{model_name}/{result['version']}",
                       threshold=result["threshold"], threshold_method=params.threshold_method,
                       metrics=result["metrics"], seconds=seconds, artifacts=tuple(result["artifacts"]))


def _progress(progress: Callable[[str], None] | None, started: float) -> Callable[[str], None]:
    def say(message: str) -> None:
        line = f"[train {time.perf_counter() - started:6.1f}s] {message}"
        if progress is None:
            print(line, flush=True)
        else:
            progress(line)
    return say


def _tag_refusal(uri: str, reason: str) -> None:
    """Under `mlflow run` a run already exists: say on it why nothing was trained."""
    run_id = os.environ.get("MLFLOW_RUN_ID")
    if run_id:
        registry.client(uri).set_tag(run_id, "refused", reason[:5000])


@contextmanager
def _active_run(experiment: str, uri: str, say: Callable[[str], None]):
    import mlflow

    active = mlflow.active_run()
    if active is not None:
        yield active
        return
    run_id = os.environ.get("MLFLOW_RUN_ID")
    if run_id:
        with mlflow.start_run(run_id=run_id) as run:
            chosen = registry.client(uri).get_experiment(run.info.experiment_id).name
            if chosen != experiment:
                say(f"note: this run is in experiment {chosen!r}, chosen by `mlflow run` "
                    f"(use --experiment-name {experiment} to put it in {experiment!r})")
            yield run
        return
    experiment_id = registry.ensure_experiment(experiment, uri)
    with mlflow.start_run(experiment_id=experiment_id) as run:
        yield run


def _train_in_run(params: TrainParams, data: LabelledData, train_pos: np.ndarray, eval_pos: np.ndarray,
                  model_name: str, uri: str, run_id: str, say: Callable[[str], None]) -> dict:
    import mlflow

    frame = data.frame
    features = list(FEATURES)
    X_train, y_train = frame.loc[train_pos, features], frame[LABEL].to_numpy()[train_pos]
    X_eval, y_eval = frame.loc[eval_pos, features], frame[LABEL].to_numpy()[eval_pos]
    commit, dirty = git_commit()
    # `mlflow run` has already logged the parameters as given; params cannot change, so only the
    # missing ones are added, and resolved values go under their own keys.
    given = mlflow.get_run(run_id).data.params
    mlflow.log_params({k: v for k, v in dataclasses.asdict(params).items() if k not in given})
    mlflow.log_params({
        "data_source": describe(data.reference),
        "requests_source": describe(data.requests) if data.requests else "none",
        "registered_model_name": model_name,
        "reference_rows": data.reference_rows,
        "request_labelled_rows": data.request_labelled,
        "excluded_unlabelled_rows": data.excluded_unlabelled,
        "data_sha256": data.sha256,
        "threshold_source": "out-of-bag",
    })
    mlflow.set_tags({
        "git_commit": commit,
        "git_dirty": str(dirty).lower(),
        "data_source_reference": describe(data.reference),
        "data_source_requests": describe(data.requests) if data.requests else "none",
        "data_sha256": data.sha256,
        "split": params.split,
        THRESHOLD_METHOD_TAG: params.threshold_method,
        "model_name": model_name,
        **({"data_notes": "; ".join(data.notes)} if data.notes else {}),
    })
    say(f"split ({params.split}): train {len(train_pos)} rows ({int(y_train.sum())} frauds), evaluation "
        f"{len(eval_pos)} rows ({int(y_eval.sum())} frauds)")

    artifacts_dir = Path(tempfile.mkdtemp(prefix="train-artifacts-"))
    try:
        say(f"fitting {params.n_estimators} trees on {len(train_pos)} rows")
        fit_started = time.perf_counter()
        # Work that does not need the model runs beside the fit, on a thread of its own: it fills the
        # idle moments at chunk boundaries instead of adding to the run's length afterwards.
        with ThreadPoolExecutor(max_workers=1) as pool:
            prepared = pool.submit(_prepare_while_fitting, artifacts_dir, frame, train_pos, eval_pos, params.seed)
            model, oob = fit_forest(X_train, y_train, params, say)
            training_seconds = time.perf_counter() - fit_started
            prepared.result()
        return _finish(params, data, model, oob, X_train, y_train, X_eval, y_eval, train_pos, eval_pos,
                       training_seconds, model_name, uri, run_id, artifacts_dir, say)
    finally:
        shutil.rmtree(artifacts_dir, ignore_errors=True)


def _prepare_while_fitting(root: Path, frame: pd.DataFrame, train_pos: np.ndarray, eval_pos: np.ndarray,
                           seed: int) -> None:
    """Write the data artifacts, and import what the steps after the fit use (about 3 s of imports)."""
    # log_model checks the input example by loading the model through mlflow.pyfunc.
    import mlflow.models.utils
    import mlflow.pyfunc
    import mlflow.sklearn  # noqa: F401
    import onnxruntime  # noqa: F401
    import skl2onnx  # noqa: F401
    import skops.io  # noqa: F401

    import training.plots  # noqa: F401 - matplotlib

    (root / "data").mkdir(parents=True, exist_ok=True)
    frame.loc[eval_pos, [*FEATURES, LABEL, "ts", "source"]].to_parquet(root / EVALUATION_ARTIFACT, index=False)
    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(train_pos, size=min(TRAINING_SAMPLE_ROWS, len(train_pos)), replace=False))
    frame.loc[sample, list(FEATURES)].to_parquet(root / TRAINING_FEATURES_ARTIFACT, index=False)


def _finish(params: TrainParams, data: LabelledData, model, oob: np.ndarray, X_train: pd.DataFrame,
            y_train: np.ndarray, X_eval: pd.DataFrame, y_eval: np.ndarray, train_pos: np.ndarray,
            eval_pos: np.ndarray, training_seconds: float, model_name: str, uri: str, run_id: str,
            artifacts_dir: Path, say: Callable[[str], None]) -> dict:
    import mlflow

    from training import plots

    choice = ev.choose_threshold(y_train, oob, params.threshold_method, params.cost_ratio)
    say(f"threshold {choice.threshold:.4f} by {choice.description}")
    say(f"evaluating on {len(eval_pos)} held-out rows")
    p_eval = model.predict_proba(X_eval)[:, 1]
    evaluation = ev.evaluate_scores(y_eval, p_eval, choice.threshold)
    usable = np.isfinite(oob)
    oob_ap = float(average_precision_score(y_train[usable], oob[usable]))
    say("evaluation: " + ", ".join(f"{k}={evaluation[k]:.4g}" for k in
                                   ("average_precision", "roc_auc", "precision", "recall", "f1")))

    say("exporting ONNX and checking parity with scikit-learn; drawing the plots meanwhile")
    importances = model.feature_importances_
    with ThreadPoolExecutor(max_workers=1) as pool:
        drawn = pool.submit(plots.write_plots, artifacts_dir / "plots", y_eval, p_eval, choice.threshold, evaluation,
                            FEATURES, importances)
        onnx_bytes = export_onnx(model)
        logged = log_fraud_model(model, X_eval.to_numpy(), choice.threshold, params.threshold_method,
                                 reference_proba=p_eval, onnx_bytes=onnx_bytes,
                                 extra_metadata={"cost_ratio": choice.cost_ratio, "threshold_source": "out-of-bag"})
        drawn.result()
    say(f"logged the model; ONNX max |Δp| = {logged.onnx_max_abs_diff:.2g} on {len(eval_pos)} rows")

    metrics = {
        **{k: v for k, v in evaluation.items() if k not in ("rows", "frauds", "fraud_rate")},
        "eval_rows": evaluation["rows"],
        "eval_frauds": evaluation["frauds"],
        "eval_fraud_rate": evaluation["fraud_rate"],
        "train_rows": len(train_pos),
        "train_frauds": int(y_train.sum()),
        "oob_average_precision": oob_ap,
        "oob_scored_rows": int(usable.sum()),
        "threshold": choice.threshold,
        "training_seconds": training_seconds,
        "model_size_bytes": logged.model_size_bytes or 0,
        "onnx_size_bytes": logged.onnx_size_bytes,
        "onnx_max_abs_diff": logged.onnx_max_abs_diff,
        "reference_rows": data.reference_rows,
        "request_labelled_rows": data.request_labelled,
        "excluded_unlabelled_rows": data.excluded_unlabelled,
    }
    mlflow.log_metrics({k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(float(v))})

    say("logging plots, evaluation JSON and data artifacts")
    artifacts = _log_artifacts(artifacts_dir, params, data, train_pos, eval_pos, choice, metrics, run_id)

    say(f"registering {model_name}")
    version = _register(model_name, logged.model_uri, run_id, choice, metrics, uri)
    return {"version": version, "threshold": choice.threshold, "metrics": metrics, "artifacts": artifacts}


def _log_artifacts(root: Path, params: TrainParams, data: LabelledData, train_pos: np.ndarray,
                   eval_pos: np.ndarray, choice: ev.ThresholdChoice, metrics: dict, run_id: str) -> list[str]:
    """Add the evaluation JSON to `root` (which holds the data artifacts and plots) and log it all."""
    import mlflow

    from training import plots

    frame = data.frame
    train_ts, eval_ts = frame["ts"].to_numpy()[train_pos], frame["ts"].to_numpy()[eval_pos]
    report = {
        "run_id": run_id,
        "metrics": {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()},
        "threshold": {**dataclasses.asdict(choice), "rule": "p >= threshold is fraud",
                      "chosen_on": "out-of-bag predictions of the training rows"},
        "split": {"method": params.split, "test_fraction": params.test_fraction,
                  "train_rows": len(train_pos), "eval_rows": len(eval_pos),
                  "train_ts": [float(train_ts.min()), float(train_ts.max())],
                  "eval_ts": [float(eval_ts.min()), float(eval_ts.max())],
                  "eval_sources": frame.loc[eval_pos, "source"].value_counts().to_dict()},
        "data": {"reference": describe(data.reference),
                 "requests": describe(data.requests) if data.requests else None,
                 "reference_rows": data.reference_rows, "request_labelled_rows": data.request_labelled,
                 "excluded_unlabelled_rows": data.excluded_unlabelled, "sha256": data.sha256,
                 "notes": list(data.notes)},
        "params": dataclasses.asdict(params),
        "artifacts": {"model": "model (registered)", "onnx": ONNX_ARTIFACT, "evaluation": EVALUATION_ARTIFACT,
                      "training_features": TRAINING_FEATURES_ARTIFACT, "plots": list(plots.PLOT_FILES)},
    }
    (root / EVALUATION_JSON).write_text(json.dumps(report, indent=2, default=str) + "\n")
    mlflow.log_artifacts(str(root))
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def _register(model_name: str, model_uri: str, run_id: str, choice: ev.ThresholdChoice, metrics: dict,
              uri: str) -> str:
    """Register the logged model as a new version in Staging; on any failure, remove that version."""
    import mlflow

    tags = {THRESHOLD_TAG: repr(choice.threshold), THRESHOLD_METHOD_TAG: choice.method,
            **({"cost_ratio": _tag_value(choice.cost_ratio)} if choice.cost_ratio else {}),
            **{name: _tag_value(metrics[name]) for name in VERSION_TAG_METRICS}}
    mlflow_client = registry.client(uri)
    version = mlflow.register_model(model_uri, model_name, tags=tags).version
    try:
        mlflow_client.update_model_version(
            model_name, version,
            description=(f"RandomForest from run {run_id}: average precision {metrics['average_precision']:.4f}, "
                         f"recall {metrics['recall']:.3f} at precision {metrics['precision']:.3f} "
                         f"(threshold {choice.threshold:.4f}, {choice.method}) on {metrics['eval_rows']} "
                         "held-out rows."))
        registry.move_to_stage(mlflow_client, model_name, version, "Staging")
    except BaseException:
        mlflow_client.delete_model_version(model_name, version)
        raise
    return str(version)


# --- CLI --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training.train", description=__doc__.splitlines()[0])
    defaults = TrainParams()
    types = {f.name: f.type for f in dataclasses.fields(TrainParams)}
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
        "min_train_frauds": "refuse when the training part has fewer frauds",
        "min_eval_frauds": "refuse when the evaluation part has fewer frauds",
    }
    converters = {"int": int, "float": float, "str": str}
    for f in dataclasses.fields(TrainParams):
        kind = types[f.name] if isinstance(types[f.name], str) else types[f.name].__name__
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
