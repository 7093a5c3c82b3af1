"""Training: a complete, comparable run on true labels only, registered in Staging; refusals register nothing."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest

from common import registry
from common.evaluation import evaluate_scores
from common.features import load_feature_config
from common.model import ONNX_ARTIFACT, OnnxParityError, load_bundle
from common.paths import REPO_ROOT
from common.schema import FEATURES, LABEL
from common.store import RequestStore
from training import scenarios
from training import train as tr
from training.data import split_rows
from training.forest import fit_forest
from training.generate import generate_frame
from training.plots import PLOT_FILES
from training.registration import EVALUATION_ARTIFACT, EVALUATION_JSON, TRAINING_FEATURES_ARTIFACT

STABLE_METRICS = {
    "average_precision", "roc_auc", "precision", "recall", "f1", "tp", "fp", "tn", "fn", "recall_at_precision_90",
    "brier_score", "log_loss", "eval_rows", "eval_frauds", "train_rows", "train_frauds", "training_seconds",
    "model_size_bytes", "onnx_max_abs_diff", "threshold", "excluded_unlabelled_rows",
}


def _artifact_paths(client, run_id: str, path: str = "") -> set[str]:
    found = set()
    for item in client.list_artifacts(run_id, path):
        found |= _artifact_paths(client, run_id, item.path) if item.is_dir else {item.path}
    return found


def _nothing_registered(store) -> bool:
    return store.client().search_registered_models() == []


# --- the complete run -------------------------------------------------------------------------------


def test_run_logs_params_metrics_and_every_artifact(trained_model):
    client = trained_model.store.client()
    run = client.get_run(trained_model.run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == f"train · ref {trained_model.data.rows:,} · seed 0"
    assert client.get_experiment(run.info.experiment_id).name == registry.TRAINING_EXPERIMENT
    params = run.data.params
    assert params["n_estimators"] == "15"
    assert params["split"] == "arrival"  # with no served model: the newest rows, as "time"
    assert run.data.tags["split_note"] == "no served model to compare with: evaluated on the newest rows"
    assert params["threshold_method"] == "cost" and params["recent_weight"] == "1.0"
    assert params["requests"] == "none" == params["requests_source"]
    assert params["data_source"].endswith(str(trained_model.data.db))
    assert params["registered_model_name"] == trained_model.name
    assert params["reference_rows"] == str(trained_model.data.rows)
    assert len(params["data_sha256"]) == 64
    assert STABLE_METRICS <= set(run.data.metrics)
    assert run.data.metrics["eval_rows"] + run.data.metrics["train_rows"] == trained_model.data.rows
    assert run.data.metrics["onnx_max_abs_diff"] <= 1e-5
    assert run.data.tags["git_commit"]
    assert run.data.tags["data_sha256"] == params["data_sha256"]
    artifacts = _artifact_paths(client, run.info.run_id)
    expected = {ONNX_ARTIFACT, EVALUATION_JSON, EVALUATION_ARTIFACT, TRAINING_FEATURES_ARTIFACT,
                *(f"plots/{name}" for name in PLOT_FILES)}
    assert expected <= artifacts
    local = Path(client.download_artifacts(run.info.run_id, "plots"))
    assert all((local / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for name in PLOT_FILES)
    report = json.loads(Path(client.download_artifacts(run.info.run_id, EVALUATION_JSON)).read_text())
    assert report["threshold"]["threshold"] == trained_model.threshold
    assert report["split"]["method"] == "arrival"


def test_registered_version_is_staging_challenger_with_threshold_and_metric_tags(trained_model):
    client = trained_model.store.client()
    with registry.stages_api():
        version = client.get_model_version(trained_model.name, trained_model.version)
        assert version.current_stage == "Staging"
    assert str(client.get_model_version_by_alias(trained_model.name, "challenger").version) == trained_model.version
    assert float(version.tags["threshold"]) == trained_model.threshold
    assert version.tags["threshold_method"] == "cost"
    assert float(version.tags["average_precision"]) == pytest.approx(trained_model.result.metrics["average_precision"],
                                                                    rel=1e-5)
    assert registry.production_version(client, trained_model.name) is None


def test_the_version_description_carries_the_headline_metrics_and_the_data(trained_model):
    description = trained_model.store.client().get_model_version(trained_model.name, trained_model.version).description
    metrics = trained_model.result.metrics
    assert (f"Average precision {metrics['average_precision']:.4f}, recall {metrics['recall']:.3f} and precision "
            f"{metrics['precision']:.3f} at threshold {trained_model.threshold:.4f} (cost), on "
            f"{int(metrics['eval_rows']):,} held-out rows with {int(metrics['eval_frauds']):,} frauds") in description
    assert f"Data: reference {trained_model.data.rows:,} labelled rows; arrival split" in description
    assert (f"{int(metrics['train_rows']):,} rows trained on and {int(metrics['eval_rows']):,} evaluated on"
            in description)
    assert trained_model.run_id in description


def test_logged_model_has_signature_metadata_and_onnx(trained_model, tmp_path):
    source = trained_model.store.client().get_model_version_download_uri(trained_model.name, trained_model.version)
    info = mlflow.models.Model.load(mlflow.artifacts.download_artifacts(source, dst_path=str(tmp_path)))
    assert info.signature.inputs.input_names() == list(FEATURES)
    assert {spec.type.name for spec in info.signature.inputs.inputs} == {"double"}
    assert info.metadata["threshold"] == trained_model.threshold
    assert info.metadata["onnx_artifact"] == ONNX_ARTIFACT
    assert info.metadata["features"] == list(FEATURES)
    assert info.saved_input_example_info is not None


def test_loaded_model_predicts_and_separates_the_classes(trained_model):
    client = trained_model.store.client()
    bundle = load_bundle(client, trained_model.name, trained_model.version)
    assert bundle.flavor == "onnx"
    assert bundle.threshold == trained_model.threshold
    evaluation = pd.read_parquet(client.download_artifacts(trained_model.run_id, EVALUATION_ARTIFACT))
    p = bundle.predict_proba(evaluation[list(FEATURES)].to_numpy())
    assert p.shape == (len(evaluation),) and ((p >= 0) & (p <= 1)).all()
    metrics = evaluate_scores(evaluation[LABEL].to_numpy(), p, bundle.threshold)
    # The loaded model scores exactly as the run measured it (ONNX is at parity with the forest).
    assert metrics["average_precision"] == pytest.approx(trained_model.result.metrics["average_precision"], abs=1e-6)
    fraud_rate = evaluation[LABEL].mean()
    assert metrics["average_precision"] > max(0.5, 10 * fraud_rate)
    assert metrics["roc_auc"] > 0.9


def test_evaluation_set_is_the_latest_rows_and_training_sample_has_the_features(trained_model):
    client = trained_model.store.client()
    evaluation = pd.read_parquet(client.download_artifacts(trained_model.run_id, EVALUATION_ARTIFACT))
    training = pd.read_parquet(client.download_artifacts(trained_model.run_id, TRAINING_FEATURES_ARTIFACT))
    reference = RequestStore(str(trained_model.data.db), create=False).read_frame(("ts",))
    cutoff = np.sort(reference["ts"].to_numpy())[-len(evaluation)]
    assert evaluation["ts"].min() >= cutoff
    assert list(training.columns) == list(FEATURES)
    assert len(training) == trained_model.result.metrics["train_rows"]
    assert {*FEATURES, LABEL, "ts"} <= set(evaluation.columns)


def test_train_leaves_the_callers_tracking_uri_and_environment_alone(mlflow_store, reference_data, train_tiny_model,
                                                                    make_mlflow_store):
    before_uri, before_env = mlflow.get_tracking_uri(), os.environ.get("MLFLOW_TRACKING_URI")
    store = make_mlflow_store()
    train_tiny_model(store, n_estimators=4)
    assert mlflow.get_tracking_uri() == before_uri
    assert os.environ.get("MLFLOW_TRACKING_URI") == before_env
    assert mlflow.active_run() is None


def test_each_run_registers_a_new_staging_version(make_mlflow_store, train_tiny_model):
    store = make_mlflow_store()
    first = train_tiny_model(store, n_estimators=4)
    second = train_tiny_model(store, n_estimators=6, max_depth=4)
    assert int(second.version) == int(first.version) + 1
    client = store.client()
    assert str(client.get_model_version_by_alias(first.name, "challenger").version) == second.version
    runs = client.search_runs([client.get_run(first.run_id).info.experiment_id])
    assert {r.data.params["n_estimators"] for r in runs} == {"4", "6"}


# --- labels -----------------------------------------------------------------------------------------


def _request_log(path: Path, scaler_path: Path, labelled: int, unlabelled: int) -> dict:
    """A request log as the service writes it: scored rows, some later labelled through feedback."""
    batch = scenarios.inputs(scenarios.named("stable", seed=11, fraud_rate=2.0), 0, load_feature_config(scaler_path),
                             labelled + unlabelled)
    store = RequestStore(str(path))
    rows = batch[list(FEATURES)].copy()
    rows["request_id"] = [f"req-{i}" for i in range(len(rows))]
    rows["ts"] = 1.7e9 + np.arange(len(rows), dtype=float)
    # Unlabelled rows carry confident scores: training must not turn them into labels.
    rows["score"] = 0.99
    rows["decision"] = 1
    store.insert_frame(rows)
    labels = {f"req-{i}": int(batch[LABEL].iloc[i]) for i in range(labelled)}
    store.record_feedback(labels)
    store.dispose()
    return labels


def test_request_log_rows_with_feedback_are_used_and_unlabelled_ones_excluded(tmp_path, make_mlflow_store,
                                                                            train_tiny_model, reference_data):
    log = tmp_path / "requests.db"
    labels = _request_log(log, reference_data.feature_config, labelled=400, unlabelled=250)
    trained = train_tiny_model(make_mlflow_store(), requests=str(log), n_estimators=6)
    metrics = trained.result.metrics
    assert metrics["request_labelled_rows"] == 400
    assert metrics["excluded_unlabelled_rows"] == 250
    assert metrics["train_rows"] + metrics["eval_rows"] == reference_data.rows + 400
    client = trained.store.client()
    run = client.get_run(trained.run_id)
    assert run.info.run_name == f"train · ref {reference_data.rows:,} + feedback 400 · seed 0"
    (feedback,) = [di for di in run.inputs.dataset_inputs if di.dataset.name == "feedback"]
    assert json.loads(feedback.dataset.profile)["num_rows"] == 400
    assert {t.key: t.value for t in feedback.tags}["mlflow.data.context"] == "training"
    assert trained.store.client().get_model_version(trained.name, trained.version).description.count(
        f"reference {reference_data.rows:,} + feedback 400 labelled rows") == 1
    evaluation = pd.read_parquet(client.download_artifacts(trained.run_id, EVALUATION_ARTIFACT))
    # Time order: the request log is newer than the reference data, so it is evaluated on, last.
    from_log = evaluation[evaluation["source"] == "requests"]
    assert len(from_log) == 400
    assert from_log[LABEL].sum() == sum(labels.values())
    assert evaluation["ts"].is_monotonic_increasing


def test_request_log_defaults_to_latest_db(tmp_path, make_mlflow_store, train_tiny_model, reference_data):
    log = tmp_path / "latest.db"
    _request_log(log, reference_data.feature_config, labelled=100, unlabelled=30)
    trained = train_tiny_model(make_mlflow_store(), requests="", n_estimators=4, extra_env={"LATEST_DB": str(log)})
    assert trained.result.metrics["request_labelled_rows"] == 100
    assert trained.result.metrics["excluded_unlabelled_rows"] == 30


# --- refusals ---------------------------------------------------------------------------------------


def _reference_db(tmp_path: Path, frame: pd.DataFrame, scaler_path: Path) -> Path:
    from training.import_csv import to_rows

    db = tmp_path / "ref.db"
    store = RequestStore(str(db))
    if len(frame):
        store.insert_frame(to_rows(frame, load_feature_config(scaler_path)))
    store.dispose()
    return db


REFUSALS = {
    "no_labels": (lambda: generate_frame(10, 0.1, 1).iloc[:0], {}, "no labelled rows"),
    "single_class": (lambda: generate_frame(1_000, 0.0, 1), {}, "all 1000 labelled rows are legitimate"),
    "all_fraud": (lambda: generate_frame(200, 1.0, 1), {}, "all 200 labelled rows are fraud"),
    "few_train_frauds": (lambda: generate_frame(2_000, 0.02, 1), {"min_train_frauds": 500}, "min_train_frauds"),
    "few_eval_frauds": (lambda: generate_frame(2_000, 0.02, 1), {"min_eval_frauds": 100}, "min_eval_frauds"),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_refusal_registers_nothing_and_starts_no_run(case, tmp_path, make_mlflow_store, train_tiny_model,
                                                     reference_data):
    make_frame, overrides, message = REFUSALS[case]
    db = _reference_db(tmp_path, make_frame(), reference_data.feature_config)
    data = dataclasses.replace(reference_data, db=db)
    store = make_mlflow_store()
    with pytest.raises(tr.TrainingRefused, match=message):
        train_tiny_model(store, data, **overrides)
    assert _nothing_registered(store)
    assert store.client().search_runs([e.experiment_id for e in store.client().search_experiments()]) == []


def test_cli_exits_non_zero_on_refusal_and_says_why(tmp_path, make_mlflow_store, reference_data, use_env, capsys):
    db = _reference_db(tmp_path, generate_frame(500, 0.0, 1), reference_data.feature_config)
    store = make_mlflow_store()
    use_env({**store.env(), "FEATURE_CONFIG": str(reference_data.feature_config)})
    code = tr.main(["--data", str(db), "--requests", "none", "--n_estimators", "3"])
    assert code != 0
    assert "refused, nothing registered" in capsys.readouterr().err
    assert _nothing_registered(store)


def test_cli_rejects_a_missing_reference_database(tmp_path, make_mlflow_store, use_env, capsys):
    use_env(make_mlflow_store().env())
    assert tr.main(["--data", str(tmp_path / "absent.db"), "--requests", "none"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "absent.db").exists()


def test_cli_takes_every_parameter_with_underscores_and_with_dashes():
    # MLproject passes --n_estimators; people type --n-estimators. Both must reach TrainParams.
    samples = {"int": "7", "float": "0.25", "str": "sqrt"}
    for field in dataclasses.fields(tr.TrainParams):
        flags = {f"--{field.name}", f"--{field.name.replace('_', '-')}"}
        for flag in flags:
            parsed = vars(tr.build_parser().parse_args([flag, samples[field.type]]))
            assert parsed[field.name] == type(getattr(tr.TrainParams(), field.name))(samples[field.type]), flag
    assert tr.TrainParams(**vars(tr.build_parser().parse_args([]))) == tr.TrainParams()


def test_onnx_disagreement_fails_the_run_and_registers_nothing(make_mlflow_store, train_tiny_model, monkeypatch):
    import common.model

    monkeypatch.setattr(common.model, "PARITY_TOLERANCE", -1.0)  # no export can pass
    store = make_mlflow_store()
    with pytest.raises(OnnxParityError):
        train_tiny_model(store, n_estimators=3)
    assert _nothing_registered(store)
    client = store.client()
    runs = client.search_runs([client.get_experiment_by_name(registry.TRAINING_EXPERIMENT).experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"]


@pytest.mark.parametrize(("field", "value", "message"), [
    ("split", "random", "split must be one of"),
    ("test_fraction", 1.0, "test_fraction"),
    ("max_features", "many", "max_features"),
    ("class_weight", "heavy", "class_weight"),
    ("threshold_method", "accuracy", "threshold_method"),
    ("recent_weight", 0.5, "recent_weight must be at least 1"),
    ("recent_weight", float("nan"), "recent_weight must be at least 1"),
])
def test_invalid_parameters_are_rejected_before_reading_data(field, value, message):
    with pytest.raises(tr.TrainingError, match=message):
        tr.TrainParams(**{field: value}).validate()


# --- splits -----------------------------------------------------------------------------------------


def test_time_split_evaluates_on_the_latest_rows_and_stratified_keeps_the_fraud_rate():
    frame = pd.DataFrame({LABEL: np.r_[np.zeros(950, dtype=int), np.ones(50, dtype=int)], "ts": np.arange(1000.0)})
    split = split_rows(frame, "time", 0.2, seed=0)
    assert len(split.evaluation) == 200 and split.train.max() < split.evaluation.min()
    split = split_rows(frame, "stratified", 0.2, seed=0)
    assert len(split.evaluation) == 200 and not set(split.train) & set(split.evaluation)
    assert frame[LABEL].to_numpy()[split.evaluation].sum() == 10


def test_stratified_split_trains_and_is_logged(make_mlflow_store, train_tiny_model):
    trained = train_tiny_model(make_mlflow_store(), split="stratified", n_estimators=4)
    run = trained.store.client().get_run(trained.run_id)
    assert run.data.params["split"] == "stratified"
    assert run.data.metrics["eval_frauds"] >= 5


# --- mlflow run ---------------------------------------------------------------------------------------


def _mlflow_run_env(tmp_path: Path, reference_data) -> dict[str, str]:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
           "MLFLOW_ARTIFACT_ROOT": str(tmp_path / "mlruns"),
           "FEATURE_CONFIG": str(reference_data.feature_config), "MODEL_NAME": "fraud-detector-cli",
           "LATEST_DB": str(tmp_path / "no-requests.db")}
    env.pop("MLFLOW_RUN_ID", None)
    # Created here, so that its artifacts go under tmp_path: `mlflow run --experiment-name` would
    # create it with MLflow's default location, ./mlruns of the repository.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_ARTIFACT_ROOT", env["MLFLOW_ARTIFACT_ROOT"])
        registry.ensure_experiment(registry.TRAINING_EXPERIMENT, env["MLFLOW_TRACKING_URI"])
    return env


def _mlflow_run_train(env: dict[str, str], *params: str) -> subprocess.CompletedProcess:
    command = [str(Path(sys.executable).parent / "mlflow"), "run", ".", "-e", "train", "--env-manager", "local",
               "--experiment-name", registry.TRAINING_EXPERIMENT]
    for param in params:
        command += ["-P", param]
    return subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_mlflow_run_train_entry_point_registers_a_staging_version(tmp_path, reference_data):
    env = _mlflow_run_env(tmp_path, reference_data)
    run = _mlflow_run_train(env, f"data={reference_data.db}", "n_estimators=6", "min_train_frauds=10",
                            "min_eval_frauds=5", "seed=3")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "building tree 6 of 6" in run.stdout and "fitted 6 trees" in run.stdout
    client = registry.client(env["MLFLOW_TRACKING_URI"])
    staged = registry.version_in_stage(client, "fraud-detector-cli", "Staging")
    assert staged is not None
    runs = client.search_runs([client.get_experiment_by_name(registry.TRAINING_EXPERIMENT).experiment_id])
    # The project's own run was reused: one run, holding both the params and the model.
    assert len(runs) == 1 and runs[0].info.run_id == staged.run_id
    assert runs[0].data.params["n_estimators"] == "6"
    # MLflow named the project's run at random; training names it after its data.
    assert runs[0].info.run_name == f"train · ref {reference_data.rows:,} · seed 3"


@pytest.mark.slow
def test_mlflow_run_refusal_fails_the_run_with_the_reason_and_registers_nothing(tmp_path, reference_data):
    env = _mlflow_run_env(tmp_path, reference_data)
    run = _mlflow_run_train(env, f"data={reference_data.db}", "n_estimators=3", "min_eval_frauds=1000")
    assert run.returncode != 0
    assert "refused, nothing registered" in run.stderr
    client = registry.client(env["MLFLOW_TRACKING_URI"])
    assert client.search_registered_models() == []
    (failed,) = client.search_runs([client.get_experiment_by_name(registry.TRAINING_EXPERIMENT).experiment_id])
    assert failed.info.status == "FAILED"
    assert "min_eval_frauds" in failed.data.tags["refused"]
    assert failed.info.run_name == f"train · ref {reference_data.rows:,} · seed 0 · refused"


# --- out-of-bag scores --------------------------------------------------------------------------------


@pytest.mark.parametrize(("n_estimators", "max_samples"), [(3, None), (3, 0.9), (30, 0.5)])
def test_out_of_bag_scores_average_the_trees_that_left_each_row_out_and_are_nan_for_no_tree(n_estimators,
                                                                                          max_samples):
    frame = generate_frame(1_500, 0.05, seed=4)
    X, y = frame[list(FEATURES[:-1])].assign(Amount_scaled=frame["Amount"] / 100), frame[LABEL].to_numpy()
    params = tr.TrainParams(n_estimators=n_estimators, max_samples=max_samples or 1.0, seed=5, n_jobs=2)
    fitted = fit_forest(X, y, params, say=lambda _line: None)  # warnings are errors here: none may escape
    forest = fitted.model
    in_bag = np.zeros((n_estimators, len(X)), dtype=bool)
    for tree, samples in enumerate(forest.estimators_samples_):
        in_bag[tree, samples] = True
    votes = np.array([tree.predict_proba(X.to_numpy(np.float32))[:, 1] for tree in forest.estimators_])
    left_out = (~in_bag).sum(axis=0)
    expected = np.where(left_out > 0, (votes * ~in_bag).sum(axis=0) / np.maximum(left_out, 1), np.nan)
    np.testing.assert_allclose(fitted.oob_proba, expected, rtol=0, atol=1e-12)
    assert (left_out == 0).any() == (n_estimators == 3)  # with 3 trees some rows are never out of bag
    assert not hasattr(forest, "oob_decision_function_") and forest.verbose == 0


@pytest.mark.postgres
def test_a_postgresql_request_log_without_its_table_yet_counts_as_empty(make_mlflow_store, train_tiny_model,
                                                                        postgres_url):
    from common.store import RequestStore

    store = RequestStore(postgres_url, create=False)
    try:
        assert not store.has_table()
        assert store.count() == 0
        assert store.read_columns(("V1", "score")).shape == (2, 0)
        assert store.window_versions() == {}
    finally:
        store.dispose()
    trained = train_tiny_model(make_mlflow_store(), requests=postgres_url)
    assert trained.result.metrics["train_rows"] + trained.result.metrics["eval_rows"] == trained.data.rows
    run = trained.store.client().get_run(trained.run_id)
    assert run.info.run_name == f"train · ref {trained.data.rows:,} + feedback 0 · seed 0"
    (feedback,) = [di.dataset for di in run.inputs.dataset_inputs if di.dataset.name == "feedback"]
    assert feedback.source_type == "sql" and json.loads(feedback.profile)["num_rows"] == 0
    assert json.loads(feedback.source)["url"].startswith("postgresql+psycopg://")


# --- the arrival split -------------------------------------------------------------------------------


def _arrival_frame(n_old: int, n_new: int, new_frauds: int) -> pd.DataFrame:
    rng = np.random.default_rng(3)
    frame = pd.DataFrame(rng.normal(size=(n_old + n_new, len(FEATURES))), columns=list(FEATURES))
    frame[LABEL] = 0
    frame.loc[: n_old // 10, LABEL] = 1  # old frauds
    frame.loc[n_old: n_old + new_frauds - 1, LABEL] = 1
    frame["ts"] = np.arange(n_old + n_new, dtype=float)
    frame["label_ts"] = np.r_[np.full(n_old, -np.inf), np.full(n_new, 1_000.0)]
    return frame


def test_arrival_split_evaluates_on_half_the_labels_that_arrived_since_the_served_model_was_trained():
    frame = _arrival_frame(n_old=800, n_new=400, new_frauds=60)
    split = split_rows(frame, "arrival", 0.2, seed=0, served_trained_at=500.0, min_eval_frauds=10)
    new = np.arange(800, 1200)
    assert set(split.evaluation) <= set(new)  # nothing the served model could have trained on
    assert len(split.evaluation) == 200 and frame[LABEL].to_numpy()[split.evaluation].sum() == 30
    assert set(split.train) | set(split.evaluation) == set(range(1200)) and not set(split.train) & set(split.evaluation)
    assert "half of the 400 labels (60 frauds)" in split.note
    # The other half of the newest labels trains the candidate.
    assert frame[LABEL].to_numpy()[np.intersect1d(split.train, new)].sum() == 30


def test_arrival_split_falls_back_to_the_newest_rows_without_a_served_model_or_enough_new_frauds():
    frame = _arrival_frame(n_old=800, n_new=400, new_frauds=15)
    for trained_at, why in ((None, "no served model"), (500.0, "15 frauds) arrived")):
        split = split_rows(frame, "arrival", 0.2, seed=0, served_trained_at=trained_at, min_eval_frauds=10)
        assert list(split.evaluation) == list(range(960, 1200)) and why in split.note


# --- the rows that choose the threshold -----------------------------------------------------------------


def test_the_threshold_is_chosen_on_the_training_rows_whose_labels_arrived_since_the_served_model():
    frame = _arrival_frame(n_old=800, n_new=400, new_frauds=60)
    split = split_rows(frame, "arrival", 0.2, seed=0, served_trained_at=500.0, min_eval_frauds=10)
    y_train = frame[LABEL].to_numpy()[split.train]
    rows, which = tr.threshold_rows(tr.TrainParams(), split, y_train)
    assert set(split.train[rows]) == set(np.arange(800, 1200)) - set(split.evaluation)
    assert y_train[rows].sum() == 30 and "arrived since the served model" in which
    # Everywhere else, and when asked, every training row chooses it.
    assert tr.threshold_rows(tr.TrainParams(threshold_rows="all"), split, y_train)[0].all()
    few = tr.threshold_rows(tr.TrainParams(min_threshold_frauds=31), split, y_train)
    assert few[0].all() and "30 frauds; 31 needed" in few[1]
    time_split = split_rows(frame, "arrival", 0.2, seed=0, served_trained_at=None)
    assert tr.threshold_rows(tr.TrainParams(), time_split, frame[LABEL].to_numpy()[time_split.train])[0].all()


def test_a_new_fraud_pattern_that_scores_low_lowers_the_threshold_chosen_on_recent_rows():
    """Old frauds score 0.9, the new pattern's 0.4, and one legitimate row in twenty 0.45: over every
    training row the old frauds decide and the threshold stays above the new pattern; on the recent
    rows it goes below."""
    frame = _arrival_frame(n_old=800, n_new=400, new_frauds=60)
    split = split_rows(frame, "arrival", 0.2, seed=0, served_trained_at=500.0, min_eval_frauds=10)
    y = frame[LABEL].to_numpy()
    position = np.arange(len(y))
    legit = np.where(position % 20 == 0, 0.45, 0.05)
    oob = np.where(y == 1, np.where(position < 800, 0.9, 0.4), legit)[split.train]
    chosen = {}
    for which in ("all", "recent"):
        rows, _ = tr.threshold_rows(tr.TrainParams(threshold_rows=which), split, y[split.train])
        chosen[which] = tr.choose_threshold(y[split.train][rows], oob[rows], "f1").threshold
    assert chosen["recent"] <= 0.4 < chosen["all"]


# --- the weight of recent labels ---------------------------------------------------------------------


def test_the_training_rows_whose_labels_arrived_since_the_served_model_weigh_recent_weight():
    frame = _arrival_frame(n_old=800, n_new=400, new_frauds=60)
    split = split_rows(frame, "arrival", 0.2, seed=0, served_trained_at=500.0, min_eval_frauds=10)
    weights, note = tr.sample_weights(tr.TrainParams(recent_weight=3.0), split)
    recent = np.isin(split.train, np.arange(800, 1200))
    assert recent.sum() == 200 and set(weights[recent]) == {3.0} and set(weights[~recent]) == {1.0}
    assert "the 200 whose labels arrived since the served model was trained weighing 3" in note
    # All alike without a served model, and when asked.
    assert tr.sample_weights(tr.TrainParams(recent_weight=1.0), split) == (None, "")
    assert tr.sample_weights(tr.TrainParams(recent_weight=3.0), split_rows(frame, "arrival", 0.2, seed=0)) == (None, "")


def test_the_forest_is_fitted_with_the_sample_weights():
    """One feature that never splits: each tree is a single leaf, whose fraud probability is the weighted
    share of frauds in its sample, 1/4 unweighted and 3/6 with the frauds weighing 3."""
    X = pd.DataFrame({"x": np.zeros(400)})
    y = np.r_[np.zeros(300, dtype=np.int64), np.ones(100, dtype=np.int64)]
    params = tr.TrainParams(n_estimators=20, max_samples=1.0, class_weight="none", seed=0, n_jobs=1)
    plain = fit_forest(X, y, params, say=lambda _line: None).model.predict_proba(X[:1])[0, 1]
    weighted = fit_forest(X, y, params, say=lambda _line: None,
                          sample_weight=np.where(y == 1, 3.0, 1.0)).model.predict_proba(X[:1])[0, 1]
    assert plain == pytest.approx(0.25, abs=0.05) and weighted == pytest.approx(0.5, abs=0.05)
