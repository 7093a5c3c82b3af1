"""The model contract (common.model): what training logs is what the service and the gate can load."""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path
from urllib.parse import urlparse

import mlflow
import numpy as np
import pandas as pd
import pytest
from sklearn.ensemble import RandomForestClassifier

from common import registry
from common.model import (
    ONNX_ARTIFACT,
    PARITY_TOLERANCE,
    SKOPS_TRUSTED_TYPES,
    ModelLoadError,
    load_bundle,
    load_bundle_from_uri,
    probe_rows,
    sklearn_proba,
    with_onnx,
)
from common.schema import FEATURES


def _run_artifact_file(store, run_id: str, path: str) -> Path:
    root = urlparse(store.client().get_run(run_id).info.artifact_uri).path
    return Path(root) / path


def test_uri_forms_resolve_to_the_same_version(trained_model):
    client = trained_model.store.client()
    by_number = load_bundle_from_uri(f"models:/{trained_model.name}/{trained_model.version}", client)
    by_alias = load_bundle_from_uri(f"models:/{trained_model.name}@challenger", client)
    by_stage = load_bundle_from_uri(f"models:/{trained_model.name}/Staging", client)
    assert by_number.version == by_alias.version == by_stage.version == trained_model.version
    assert by_alias.stage == "Staging" and "challenger" in by_alias.aliases
    assert by_alias.run_id == trained_model.run_id


@pytest.mark.parametrize("uri", ["runs:/abc/model", "models:/", "fraud-detector", "models:/a/b/c"])
def test_malformed_uri_is_a_model_load_error(uri, trained_model):
    with pytest.raises(ModelLoadError, match="is not models:/"):
        load_bundle_from_uri(uri, trained_model.store.client())


@pytest.mark.parametrize("suffix", ["/999", "@nobody", "/Production"])
def test_uri_naming_nothing_is_a_model_load_error(suffix, trained_model):
    with pytest.raises(ModelLoadError):
        load_bundle_from_uri(f"models:/{trained_model.name}{suffix}", trained_model.store.client())


@pytest.mark.parametrize("flavor", ["onnx", "sklearn"])
def test_single_rows_score_like_the_batch_and_like_scikit_learn(trained_model, flavor):
    client = trained_model.store.client()
    bundle = load_bundle(client, trained_model.name, trained_model.version, flavor=flavor)
    assert bundle.flavor == flavor
    forest = mlflow.sklearn.load_model(client.get_model_version_download_uri(trained_model.name, trained_model.version))
    X = probe_rows(64) * 0.7
    batch = bundle.predict_proba(X)
    singles = np.array([bundle.predict_proba(X[i:i + 1])[0] for i in range(len(X))])
    ones = [bundle.predict_one(X[i:i + 1]) for i in range(len(X))]
    assert all(type(p) is float for p in ones)  # the service's single-row path hands on Python floats
    np.testing.assert_allclose(singles, batch, atol=0)
    np.testing.assert_allclose(ones, batch, atol=0)
    assert len(np.unique(batch)) > 5  # the probe reaches both classes: the comparison means something
    np.testing.assert_allclose(batch, sklearn_proba(forest, X), atol=1e-5)
    assert forest.verbose == 0  # the fit's progress output must not follow the model into serving
    if flavor == "onnx":
        assert bundle.parity_max_abs_diff <= 1e-5


def slice_scorer(columns: int = 2):
    """A real ONNX session of a one-node model whose `probabilities` are the first `columns` features."""
    import onnx
    from onnx import TensorProto, helper

    from common.model import N_FEATURES, ONNX_INPUT, ONNX_OUTPUT, _OnnxScorer, onnx_session

    starts, ends, axes = (helper.make_tensor(n, TensorProto.INT64, [1], [v]) for n, v in
                          (("starts", 0), ("ends", columns), ("axes", 1)))
    graph = helper.make_graph(
        [helper.make_node("Slice", [ONNX_INPUT, "starts", "ends", "axes"], [ONNX_OUTPUT])], "first-columns",
        [helper.make_tensor_value_info(ONNX_INPUT, TensorProto.FLOAT, [None, N_FEATURES])],
        [helper.make_tensor_value_info(ONNX_OUTPUT, TensorProto.FLOAT, [None, columns])], [starts, ends, axes])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return _OnnxScorer(onnx_session(model.SerializeToString()))


def test_onnx_probabilities_just_outside_0_and_1_are_clamped_for_single_rows_and_batches():
    """ONNX Runtime sums the trees' votes in float32, so a probability can come out as 1.0000001.
    Both scoring paths clamp."""
    from common.model import N_FEATURES

    scorer = slice_scorer()
    X = np.zeros((3, N_FEATURES))
    X[:, 1] = [1.0000001, -1e-7, 0.25]
    assert np.float32(X[0, 1]) > 1 and np.float32(X[1, 1]) < 0  # the float32 input keeps them outside
    assert scorer(X).tolist() == [1.0, 0.0, 0.25]
    assert [scorer.one(X[i:i + 1]) for i in range(3)] == [1.0, 0.0, 0.25]


def test_single_rows_of_a_model_whose_output_the_binding_does_not_fit_are_scored_by_run():
    """Single rows write into a bound (1, 2) output. A model with another output shape would fail
    there: it is found at load and scored through `run` instead, with the same answers."""
    bound, unbound = slice_scorer(2), slice_scorer(3)
    assert bound.bound and not unbound.bound
    X = probe_rows(20)
    for scorer in (bound, unbound):
        assert [scorer.one(X[i:i + 1]) for i in range(len(X))] == scorer(X).tolist()


def test_concurrent_single_row_scoring_matches_sequential(trained_model):
    bundle = load_bundle(trained_model.store.client(), trained_model.name, trained_model.version)
    X = probe_rows(200)
    expected = bundle.predict_proba(X)
    results = np.full(len(X), np.nan)

    def work(offset: int) -> None:
        for i in range(offset, len(X), 4):
            results[i] = bundle.predict_one(X[i:i + 1])  # each thread scores through its own row buffer

    assert bundle._scorer.bound  # the forest's single rows take the bound path
    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    np.testing.assert_array_equal(results, expected)


def test_bundle_rejects_wrong_shapes_and_is_immutable(trained_model):
    bundle = load_bundle(trained_model.store.client(), trained_model.name, trained_model.version)
    with pytest.raises(ValueError, match=r"shape \(n, 29\)"):
        bundle.predict_proba(np.zeros((2, 28)))
    with pytest.raises(ValueError, match=r"shape \(n, 29\)"):
        bundle.predict_proba(np.zeros(29))
    for shape in ((2, 29), (29,), (1, 1), (1, 30)):
        with pytest.raises(ValueError, match=r"shape \(1, 29\)"):
            bundle.predict_one(np.zeros(shape))
    with pytest.raises(dataclasses.FrozenInstanceError):
        bundle.threshold = 0.1
    assert bundle.decide(np.array([bundle.threshold, np.nextafter(bundle.threshold, -1)])).tolist() == [True, False]


@pytest.fixture
def own_model(make_mlflow_store, train_tiny_model):
    """A model in a store of its own, so a test may damage its artifacts."""
    return train_tiny_model(make_mlflow_store(), n_estimators=3)


def test_missing_onnx_falls_back_to_sklearn_unless_onnx_is_required(own_model):
    _run_artifact_file(own_model.store, own_model.run_id, ONNX_ARTIFACT).unlink()
    client = own_model.store.client()
    bundle = load_bundle(client, own_model.name, own_model.version)
    assert bundle.flavor == "sklearn"
    assert "missing" in bundle.onnx_problem
    X = probe_rows(16)
    assert bundle.predict_proba(X).shape == (16,)
    with pytest.raises(ModelLoadError, match="ONNX artifact"):
        load_bundle(client, own_model.name, own_model.version, flavor="onnx")


def test_an_onnx_artifact_that_failed_to_download_is_tried_again_on_the_loaded_bundle(own_model):
    onnx = _run_artifact_file(own_model.store, own_model.run_id, ONNX_ARTIFACT)
    hidden = onnx.with_name("hidden.onnx")
    onnx.rename(hidden)
    client = own_model.store.client()
    try:
        bundle = load_bundle(client, own_model.name, own_model.version)
        assert (bundle.flavor, bundle.onnx_retryable) == ("sklearn", True)
        still = with_onnx(client, bundle)
        assert (still.flavor, still.onnx_retryable) == ("sklearn", True) and "missing" in still.onnx_problem
    finally:
        hidden.rename(onnx)
    upgraded = with_onnx(client, bundle)
    assert (upgraded.flavor, upgraded.onnx_retryable, upgraded.onnx_problem) == ("onnx", False, None)
    assert upgraded.parity_max_abs_diff <= PARITY_TOLERANCE
    X = probe_rows(16)
    np.testing.assert_allclose(upgraded.predict_proba(X), bundle.predict_proba(X), atol=PARITY_TOLERANCE)
    assert with_onnx(client, upgraded) is upgraded


def test_an_onnx_artifact_that_arrives_corrupt_is_not_tried_again(own_model):
    _run_artifact_file(own_model.store, own_model.run_id, ONNX_ARTIFACT).write_bytes(b"not an onnx model")
    bundle = load_bundle(own_model.store.client(), own_model.name, own_model.version)
    assert (bundle.flavor, bundle.onnx_retryable) == ("sklearn", False)


def test_corrupt_onnx_falls_back_to_sklearn_with_the_reason(own_model):
    _run_artifact_file(own_model.store, own_model.run_id, ONNX_ARTIFACT).write_bytes(b"not an onnx model")
    bundle = load_bundle(own_model.store.client(), own_model.name, own_model.version)
    assert bundle.flavor == "sklearn"
    assert "cannot be loaded" in bundle.onnx_problem


def test_onnx_of_another_model_fails_parity_and_is_not_used(own_model, train_tiny_model):
    other = train_tiny_model(own_model.store, n_estimators=5, seed=9)
    source = _run_artifact_file(other.store, other.run_id, ONNX_ARTIFACT)
    _run_artifact_file(own_model.store, own_model.run_id, ONNX_ARTIFACT).write_bytes(source.read_bytes())
    bundle = load_bundle(own_model.store.client(), own_model.name, own_model.version)
    assert bundle.flavor == "sklearn"
    assert "disagrees" in bundle.onnx_problem and bundle.parity_max_abs_diff > 1e-5
    with pytest.raises(ModelLoadError, match="disagrees"):
        load_bundle(own_model.store.client(), own_model.name, own_model.version, flavor="onnx")


def test_deleted_model_files_are_a_model_load_error(own_model):
    client = own_model.store.client()
    model_dir = Path(urlparse(client.get_model_version_download_uri(own_model.name, own_model.version)).path)
    (model_dir / "model.skops").unlink()
    with pytest.raises(ModelLoadError, match="cannot be loaded"):
        load_bundle(client, own_model.name, own_model.version)


def _register_plain(store, name: str, n_features: int, *, signature: bool, tags: dict | None = None) -> str:
    """A model logged without the contract's care: to check that loading refuses it clearly."""
    rng = np.random.default_rng(0)
    columns = [f"f{i}" for i in range(n_features)] if n_features != len(FEATURES) else list(FEATURES)
    X = pd.DataFrame(rng.normal(size=(200, n_features)), columns=columns)
    y = (X.iloc[:, 0] > 0).astype(int)
    forest = RandomForestClassifier(n_estimators=2, random_state=0).fit(X, y)
    with pytest.MonkeyPatch.context() as mp:
        for key, value in store.env().items():
            mp.setenv(key, value)
        with registry.use_tracking(store.tracking_uri):
            with mlflow.start_run(experiment_id=registry.ensure_experiment("plain", store.tracking_uri)):
                info = mlflow.sklearn.log_model(forest, name="model", skops_trusted_types=SKOPS_TRUSTED_TYPES,
                                                input_example=X.iloc[:2] if signature else None,
                                                pip_requirements=["scikit-learn"])
            return str(mlflow.register_model(info.model_uri, name, tags=tags).version)


def test_model_with_the_wrong_feature_count_is_refused(make_mlflow_store):
    store = make_mlflow_store()
    version = _register_plain(store, "wrong-width", 28, signature=True, tags={"threshold": "0.5"})
    with pytest.raises(ModelLoadError, match="expected the 29 FEATURES"):
        load_bundle(store.client(), "wrong-width", version)


def test_model_without_a_signature_is_refused(make_mlflow_store):
    store = make_mlflow_store()
    version = _register_plain(store, "no-signature", 29, signature=False, tags={"threshold": "0.5"})
    with pytest.raises(ModelLoadError, match="no input signature"):
        load_bundle(store.client(), "no-signature", version)


def test_model_without_a_threshold_is_refused(make_mlflow_store):
    store = make_mlflow_store()
    version = _register_plain(store, "no-threshold", 29, signature=True)
    with pytest.raises(ModelLoadError, match="no decision threshold"):
        load_bundle(store.client(), "no-threshold", version)
