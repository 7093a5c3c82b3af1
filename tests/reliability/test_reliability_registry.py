"""Registry trouble with a real `mlflow server` as the tracking URI: versions that cannot be served
promoted by hand (no gate), then the server gone."""

from __future__ import annotations

import pytest

from benchmarks.reliability import registry_trouble
from common.model import load_bundle
from service.app import create_app, service_of
from service.scoring import ServingModel


@pytest.mark.slow
def test_bad_promotions_and_a_dead_tracking_server_leave_the_loaded_model_serving_and_reported(world, tmp_path):
    result = registry_trouble(world, tmp_path, clients=3, seconds=5)
    assert result.ok, result.explain()
    assert result.faults == 3 and result.errors == 0 and result.rows_lost == 0


def test_the_scikit_learn_fallback_answers_batches_as_the_onnx_flavor_does(world, tmp_path):
    # A registry that times out while a worker downloads the ONNX artifact leaves that worker serving
    # the forest itself (seen in the scenario above under load); its answers must not break then.
    registry = world.registry
    app = create_app({"tokens": ("t",), "request_log": str(tmp_path / "requests.db"), "watch_model": False,
                      "feature_config": str(registry.data.feature_config)})
    try:
        answers = {}
        for flavor in ("onnx", "sklearn"):
            bundle = load_bundle(registry.store.client(), registry.name, registry.v1.version, flavor=flavor)
            service_of(app).watcher.current = ServingModel(bundle, bundle.threshold, "model", 0.0)
            response = app.test_client().post("/predict", json={"data": world.rows[:3]},
                                              headers={"Authorization": "Bearer t"})
            assert response.status_code == 200, response.get_data(as_text=True)
            answers[flavor] = response.get_json()["fraud_probability"]
        assert answers["sklearn"] == pytest.approx(answers["onnx"], abs=1e-5)
    finally:
        service_of(app).close()
