"""How the served model follows the registry: promotion, hot swap under load, no model yet, an
unreachable registry, a version that cannot be loaded, and an ONNX artifact that failed to download."""

from __future__ import annotations

import logging
import shutil
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

from common.model import ONNX_ARTIFACT, load_bundle
from common.registry import move_to_stage
from common.store import RequestStore
from service.app import service_of
from tests.helpers.builders import promote_by_hand
from tests.helpers.service import AUTH, corrupt_copy_of, parse_metrics, wait_for


def metrics_of(client) -> dict:
    return parse_metrics(client.get("/metrics", headers=AUTH).get_data(as_text=True))


def test_promotion_swaps_the_model_while_requests_run_and_no_request_fails(make_app, private_registry,
                                                                          serving_registry, sample_rows):
    registry_client = private_registry.client()
    bundles = {v: load_bundle(registry_client, serving_registry.name, v) for v in ("1", "2")}
    # Rows the two versions score differently, so that each response shows which version scored it.
    everything = np.array(sample_rows)
    differ = np.flatnonzero(np.abs(bundles["1"].predict_proba(everything) - bundles["2"].predict_proba(everything))
                            > 1e-6)
    assert len(differ) > 0, "the two versions must be told apart by their scores"
    rows = everything[differ[:3]].tolist()
    expected = {v: bundle.predict_proba(np.array(rows)) for v, bundle in bundles.items()}
    app = make_app(tracking_uri=private_registry.tracking_uri)
    results: list[tuple[float, float, int, dict]] = []
    stop = threading.Event()

    def client_loop():
        client = app.test_client()
        while not stop.is_set():
            started = time.monotonic()
            response = client.post("/predict", json={"data": rows}, headers=AUTH)
            results.append((started, time.monotonic(), response.status_code, response.get_json()))

    threads = [threading.Thread(target=client_loop) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        wait_for(lambda: len(results) > 20, "requests served by version 1")
        move_to_stage(registry_client, serving_registry.name, "2", "Production")
        wait_for(lambda: any(r[3].get("model_version") == "2" for r in list(results)), "version 2 to be served")
        first_v2_done = min(r[1] for r in list(results) if r[3].get("model_version") == "2")
        wait_for(lambda: sum(1 for r in list(results) if r[0] > first_v2_done) > 20, "more requests after the swap")
    finally:
        stop.set()
        for thread in threads:
            thread.join()

    assert {status for _, _, status, _ in results} == {200}
    assert {body["model_version"] for *_, body in results} == {"1", "2"}
    for started, _, _, body in results:
        version = body["model_version"]
        # Each request is scored and reported by exactly one version ...
        np.testing.assert_allclose(body["fraud_probability"], expected[version], atol=1e-12)
        # ... and once a response came from version 2, every later request gets version 2.
        if started > first_v2_done:
            assert version == "2"
    logged = RequestStore(service_of(app).config.request_log).read_frame(("request_id", "model_version"))
    by_id = dict(zip(logged["request_id"], logged["model_version"], strict=True))
    assert all(by_id[rid] == body["model_version"] for *_, body in results for rid in body["request_id"])
    samples = metrics_of(app.test_client())
    assert samples[("fraud_model_reloads_total", (("result", "loaded"),))] == 2
    assert samples[("fraud_model_info", (("flavor", "onnx"), ("model_name", "fraud-detector"),
                                         ("model_version", "1")))] == 0
    assert samples[("fraud_model_info", (("flavor", "onnx"), ("model_name", "fraud-detector"),
                                         ("model_version", "2")))] == 1


def test_without_a_production_version_it_answers_503_then_serves_the_first_promoted(make_app, private_registry,
                                                                                   serving_registry, sample_rows):
    registry_client = private_registry.client()
    move_to_stage(registry_client, serving_registry.name, "1", "Archived")
    client = make_app(tracking_uri=private_registry.tracking_uri).test_client()
    ready = client.get("/ready")
    assert ready.status_code == 503
    body = ready.get_json()
    assert body["status"] == "not_ready" and body["model"] is None
    assert body["error"]["code"] == "model_unavailable"
    assert body["problem"] == "no version of 'fraud-detector' has alias champion or is in stage Production"
    assert body["registry"]["reachable"] is True
    assert client.post("/predict", json={"data": sample_rows[:1]}, headers=AUTH).status_code == 503
    assert metrics_of(client)[("fraud_model_loaded", ())] == 0

    move_to_stage(registry_client, serving_registry.name, "2", "Production")
    wait_for(lambda: client.get("/ready").status_code == 200, "the promoted version to load")
    response = client.post("/predict", json={"data": sample_rows[:1]}, headers=AUTH)
    assert response.status_code == 200 and response.get_json()["model_version"] == "2"


def test_an_unreachable_registry_keeps_the_loaded_model_serving_and_says_so(make_app, private_registry,
                                                                           sample_rows, caplog):
    database = private_registry.root / "mlflow.db"
    backup = private_registry.root / "backup.db"
    shutil.copyfile(database, backup)
    client = make_app(tracking_uri=private_registry.tracking_uri).test_client()
    assert client.get("/ready").get_json()["registry"]["reachable"] is True

    with caplog.at_level(logging.ERROR, logger="service"):
        corrupt_copy_of(database)
        details = wait_for(lambda: (d := client.get("/ready").get_json())["registry"]["reachable"] is False and d,
                           "the poller to notice the registry is gone")
    assert details["status"] == "ready" and details["model"]["version"] == "1"
    assert "file is not a database" in details["registry"]["error"]
    assert "model registry unreachable" in caplog.text
    assert metrics_of(client)[("fraud_registry_reachable", ())] == 0
    response = client.post("/predict", json={"data": sample_rows[:2]}, headers=AUTH)
    assert response.status_code == 200 and response.get_json()["model_version"] == "1"

    shutil.copyfile(backup, database)
    wait_for(lambda: client.get("/ready").get_json()["registry"]["reachable"] is True, "the registry to be back")
    assert metrics_of(client)[("fraud_registry_reachable", ())] == 1


def test_a_version_that_cannot_be_loaded_is_refused_and_the_old_model_keeps_serving(make_app, private_registry,
                                                                                   serving_registry, sample_rows,
                                                                                   tmp_path, caplog):
    registry_client = private_registry.client()
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "MLmodel").write_text("flavors: [this is not\n")
    bad = str(registry_client.create_model_version(serving_registry.name, source=str(broken), run_id=None).version)
    client = make_app(tracking_uri=private_registry.tracking_uri).test_client()

    with caplog.at_level(logging.ERROR, logger="service"):
        move_to_stage(registry_client, serving_registry.name, bad, "Production")
        details = wait_for(lambda: (d := client.get("/ready").get_json())["refused"] and d, "the refusal")
    assert details["status"] == "ready" and details["model"]["version"] == "1"
    assert details["refused"]["version"] == bad
    assert "model artifact is missing or unreadable" in details["refused"]["error"]
    assert f"model load refused: fraud-detector version {bad}" in caplog.text
    response = client.post("/predict", json={"data": sample_rows[:1]}, headers=AUTH)
    assert response.status_code == 200 and response.get_json()["model_version"] == "1"
    samples = metrics_of(client)
    assert samples[("fraud_model_reloads_total", (("result", "refused"),))] == 1
    assert samples[("fraud_model_refused_version", ())] == int(bad)

    time.sleep(1.0)  # several polls: the refused version is not retried on every one
    assert metrics_of(client)[("fraud_model_reloads_total", (("result", "refused"),))] == 1

    move_to_stage(registry_client, serving_registry.name, "2", "Production")
    wait_for(lambda: client.get("/version").get_json()["model_version"] == "2", "the next good version")


def test_a_model_uri_naming_nothing_leaves_the_service_unready_with_the_reason(make_app):
    client = make_app(model_uri="models:/fraud-detector@no-such-alias").test_client()
    body = client.get("/ready").get_json()
    assert body["status"] == "not_ready"
    assert body["problem"].startswith("MODEL_URI models:/fraud-detector@no-such-alias names no model version")
    assert body["registry"]["target"] == "models:/fraud-detector@no-such-alias"


def test_an_onnx_artifact_that_failed_to_download_is_retried_in_the_background_until_it_serves(
        make_app, make_mlflow_store, train_tiny_model, sample_rows):
    # A model of its own: this test takes its ONNX artifact away for a moment.
    store = make_mlflow_store()
    model = train_tiny_model(store)
    promote_by_hand(store.client(), model.name, model.version)
    artifact_root = urlparse(store.client().get_run(model.run_id).info.artifact_uri).path
    onnx = Path(artifact_root) / ONNX_ARTIFACT
    hidden = onnx.with_name("hidden.onnx")
    onnx.rename(hidden)  # the artifact store fails the worker's first download
    try:
        client = make_app(tracking_uri=store.tracking_uri, model_name=model.name).test_client()
        ready = client.get("/ready").get_json()
    finally:
        hidden.rename(onnx)
    assert ready["status"] == "ready" and ready["model"]["flavor"] == "sklearn"
    assert ready["onnx"]["retrying"] is True and ready["onnx"]["attempts"] >= 1
    assert "ONNX artifact onnx/model.onnx is missing" in ready["onnx"]["problem"]
    samples = metrics_of(client)
    assert samples[("fraud_model_onnx_retrying", ())] == 1
    assert samples[("fraud_model_info", (("flavor", "sklearn"), ("model_name", model.name),
                                         ("model_version", model.version)))] == 1
    sklearn_scores = client.post("/predict", json={"data": sample_rows[:5]}, headers=AUTH).get_json()

    wait_for(lambda: client.get("/version").get_json()["flavor"] == "onnx", "the ONNX flavor")
    ready = client.get("/ready").get_json()
    assert ready["model"]["flavor"] == "onnx" and ready["onnx"] is None
    samples = metrics_of(client)
    assert samples[("fraud_model_onnx_retrying", ())] == 0
    assert samples[("fraud_model_info", (("flavor", "sklearn"), ("model_name", model.name),
                                         ("model_version", model.version)))] == 0
    assert samples[("fraud_model_info", (("flavor", "onnx"), ("model_name", model.name),
                                         ("model_version", model.version)))] == 1
    onnx_scores = client.post("/predict", json={"data": sample_rows[:5]}, headers=AUTH).get_json()
    assert onnx_scores["model_version"] == sklearn_scores["model_version"] == model.version
    np.testing.assert_allclose(onnx_scores["fraud_probability"], sklearn_scores["fraud_probability"], atol=1e-5)
