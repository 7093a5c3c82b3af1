"""Only the gate promotes: a replica refuses a champion without the gate's record, or whose artifacts
changed since the gate checked them, and keeps serving the old one (common.provenance,
service.watcher); ALLOW_UNGATED_MODELS=1 serves it anyway and says so."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import mlflow
import pytest

from common.registry import move_to_stage
from tests.helpers.builders import record_as_gate
from tests.helpers.service import AUTH, parse_metrics, wait_for


def _copy_of_version(client, name: str, version: str, dest: Path) -> str:
    """A new version whose model files are a private copy of `version`'s (same run, so same ONNX)."""
    source = client.get_model_version_download_uri(name, version)
    local = mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(dest),
                                                tracking_uri=client.tracking_uri)
    run_id = client.get_model_version(name, version).run_id
    return str(client.create_model_version(name, source=local, run_id=run_id).version)


def _refusal(client) -> dict:
    return wait_for(lambda: (d := client.get("/ready").get_json())["refused"] and d, "the refusal")


def test_a_version_moved_to_production_by_hand_is_refused_and_the_old_one_keeps_serving(
        make_app, private_registry, serving_registry, sample_rows, tmp_path, caplog):
    registry_client = private_registry.client()
    ungated = _copy_of_version(registry_client, serving_registry.name, "2", tmp_path / "copy")
    client = make_app(tracking_uri=private_registry.tracking_uri).test_client()
    assert client.get("/ready").get_json()["gate_check"] == {"required": True, "ungated_allowed": False,
                                                            "served_version_failed": None}

    with caplog.at_level(logging.ERROR, logger="service"):
        move_to_stage(registry_client, serving_registry.name, ungated, "Production")
        details = _refusal(client)
    assert details["status"] == "ready" and details["model"]["version"] == "1"
    assert details["refused"]["version"] == ungated
    assert "has no promotion record from the gate" in details["refused"]["error"]
    assert f"model load refused: fraud-detector version {ungated} has no promotion record" in caplog.text
    response = client.post("/predict", json={"data": sample_rows[:1]}, headers=AUTH)
    assert response.status_code == 200 and response.get_json()["model_version"] == "1"
    samples = parse_metrics(client.get("/metrics", headers=AUTH).get_data(as_text=True))
    assert samples[("fraud_model_reloads_total", (("result", "refused"),))] == 1
    assert samples[("fraud_model_refused_version", ())] == int(ungated)


def test_an_artifact_changed_after_the_gate_recorded_it_is_refused(make_app, private_registry, serving_registry,
                                                                   tmp_path):
    registry_client = private_registry.client()
    name = serving_registry.name
    version = _copy_of_version(registry_client, name, "2", tmp_path / "copy")
    record_as_gate(registry_client, name, version)
    client = make_app(tracking_uri=private_registry.tracking_uri).test_client()

    # Someone with write access to the artifact store swaps in another forest that loads fine.
    source = Path(registry_client.get_model_version(name, version).source)
    other = Path(mlflow.artifacts.download_artifacts(
        artifact_uri=registry_client.get_model_version_download_uri(name, "1"), dst_path=str(tmp_path / "v1"),
        tracking_uri=private_registry.tracking_uri))
    shutil.copyfile(other / "model.skops", source / "model.skops")
    move_to_stage(registry_client, name, version, "Production")

    details = _refusal(client)
    assert details["model"]["version"] == "1" and details["refused"]["version"] == version
    assert "model/model.skops differs from what gate run" in details["refused"]["error"]


def test_allow_ungated_models_serves_an_ungated_champion_and_says_so(make_app, private_registry, serving_registry,
                                                                      tmp_path, caplog):
    registry_client = private_registry.client()
    ungated = _copy_of_version(registry_client, serving_registry.name, "2", tmp_path / "copy")
    with caplog.at_level(logging.ERROR, logger="service"):
        client = make_app(tracking_uri=private_registry.tracking_uri, allow_ungated_models=True).test_client()
        move_to_stage(registry_client, serving_registry.name, ungated, "Production")
        wait_for(lambda: client.get("/version").get_json()["model_version"] == ungated, "the ungated version")
    ready = client.get("/ready").get_json()
    assert ready["refused"] is None
    assert ready["gate_check"]["ungated_allowed"] is True and ready["gate_check"]["required"] is False
    assert "has no promotion record from the gate" in ready["gate_check"]["served_version_failed"]
    assert "ALLOW_UNGATED_MODELS=1: this service serves champions that the promotion gate did not" in caplog.text
    assert f"ALLOW_UNGATED_MODELS=1: serving a version the promotion gate did not approve: fraud-detector " \
           f"version {ungated}" in caplog.text


@pytest.mark.parametrize("value", ["1", "0"])
def test_allow_ungated_models_is_read_from_the_environment(monkeypatch, value):
    from common import settings

    monkeypatch.setenv("ALLOW_UNGATED_MODELS", value)
    assert settings.allow_ungated_models() is (value == "1")
    monkeypatch.setenv("ALLOW_UNGATED_MODELS", "maybe")
    with pytest.raises(settings.SettingsError, match="ALLOW_UNGATED_MODELS='maybe'"):
        settings.allow_ungated_models()
