"""Shadow scoring: the challenger (the registry's Staging version) scores every request beside the
champion, its scores are logged in the same row, and nothing it does reaches the client."""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest

from common.registry import move_to_stage
from common.store import RequestStore
from service.app import service_of
from tests.helpers.gunicorn import start_service
from tests.helpers.service import AUTH, parse_metrics


def logged(app, columns=("request_id", "model_version", "score", "decision", "shadow_score", "shadow_decision",
                         "shadow_version")):
    store = RequestStore(service_of(app).config.request_log, create=False)
    try:
        return store.read_frame(columns)
    finally:
        store.dispose()


def wait_for_challenger(app, version: str | None, timeout: float = 30.0) -> None:
    watcher = service_of(app).challenger
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        current = watcher.current
        if (current.version if current is not None else None) == version:
            return
        time.sleep(0.05)
    raise AssertionError(f"the challenger is {watcher.current}, not version {version}: {watcher.status()}")


def metric(client, name: str, **labels) -> float:
    samples = parse_metrics(client.get("/metrics", headers=AUTH).get_data(as_text=True))
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_the_challenger_scores_every_row_and_is_logged_beside_the_champion(make_app, serving_registry, sample_rows):
    app = make_app()
    wait_for_challenger(app, serving_registry.v2.version)
    client = app.test_client()
    one = client.post("/predict", json={"data": sample_rows[:1]}, headers=AUTH)
    batch = client.post("/predict", json={"data": sample_rows[:20]}, headers=AUTH)
    assert one.status_code == batch.status_code == 200
    assert batch.get_json()["model_version"] == serving_registry.v1.version  # the answer is the champion's
    rows = logged(app)
    assert len(rows) == 21
    assert (rows["model_version"] == serving_registry.v1.version).all()
    assert (rows["shadow_version"] == serving_registry.v2.version).all()
    assert rows["shadow_score"].between(0, 1).all() and rows["shadow_decision"].isin([0, 1]).all()
    # The same rows scored by the challenger alone give the logged shadow scores.
    challenger = service_of(app).challenger.current
    expected = challenger.bundle.predict_proba(np.asarray(sample_rows[:20]))
    np.testing.assert_allclose(rows["shadow_score"].to_numpy()[1:], expected, rtol=1e-6)
    assert (rows["shadow_decision"].to_numpy()[1:] == (expected >= challenger.threshold)).all()
    disagree = int((rows["decision"] != rows["shadow_decision"]).sum())
    assert metric(client, "fraud_shadow_rows_total") == 21
    assert metric(client, "fraud_shadow_disagreements_total") == disagree


def test_version_and_ready_show_both_models(make_app, serving_registry):
    app = make_app()
    wait_for_challenger(app, serving_registry.v2.version)
    client = app.test_client()
    version = client.get("/version").get_json()
    assert version["model_version"] == serving_registry.v1.version and version["shadow"] == "on"
    assert version["challenger"]["model_version"] == serving_registry.v2.version
    assert version["challenger"]["stage"] == "Staging"
    ready = client.get("/ready").get_json()
    assert ready["role"] == "champion" and ready["model"]["version"] == serving_registry.v1.version
    assert ready["challenger"]["role"] == "challenger"
    assert ready["challenger"]["model"]["version"] == serving_registry.v2.version


def test_shadow_off_loads_no_challenger_and_logs_no_shadow_score(make_app, sample_rows):
    app = make_app(shadow=False)
    client = app.test_client()
    assert client.post("/predict", json={"data": sample_rows[:3]}, headers=AUTH).status_code == 200
    assert service_of(app).challenger is None
    assert client.get("/version").get_json()["shadow"] == "off"
    assert client.get("/ready").get_json()["challenger"] is None
    assert logged(app)["shadow_score"].isna().all()
    assert metric(client, "fraud_shadow_skipped_rows_total", reason="none") == 0


def test_a_challenger_that_raises_changes_no_answer_and_is_counted(make_app, serving_registry, sample_rows, tmp_path):
    reference = make_app(shadow=False, request_log=str(tmp_path / "reference.db")).test_client().post(
        "/predict", json={"data": sample_rows[:5]}, headers=AUTH)
    app = make_app()
    wait_for_challenger(app, serving_registry.v2.version)
    watcher = service_of(app).challenger
    watcher.stop()  # no poll may restore the working model while the test runs

    class Broken:
        def __call__(self, _rows):
            raise RuntimeError("the challenger's session died")

        def one(self, _rows):
            raise RuntimeError("the challenger's session died")

    watcher.current = dataclasses.replace(watcher.current, bundle=dataclasses.replace(watcher.current.bundle,
                                                                                      _scorer=Broken()))
    client = app.test_client()
    answer = client.post("/predict", json={"data": sample_rows[:5]}, headers=AUTH)
    single = client.post("/predict", json={"data": sample_rows[:1]}, headers=AUTH)
    assert answer.status_code == single.status_code == 200
    drop = ("request_id",)
    assert {k: v for k, v in answer.get_json().items() if k not in drop} == \
        {k: v for k, v in reference.get_json().items() if k not in drop}
    assert logged(app)["shadow_score"].isna().all() and len(logged(app)) == 6
    assert metric(client, "fraud_shadow_skipped_rows_total", reason="error") == 6


def test_no_staging_version_means_no_challenger_and_the_rows_say_why(make_app, private_registry, serving_registry,
                                                                     sample_rows):
    move_to_stage(private_registry.client(), serving_registry.name, serving_registry.v2.version, "Archived")
    app = make_app(tracking_uri=private_registry.tracking_uri)
    client = app.test_client()
    assert client.post("/predict", json={"data": sample_rows[:4]}, headers=AUTH).status_code == 200
    assert service_of(app).challenger.current is None
    assert logged(app)["shadow_score"].isna().all()
    assert metric(client, "fraud_shadow_skipped_rows_total", reason="none") == 4
    assert "Staging" in client.get("/ready").get_json()["challenger"]["problem"]


@pytest.mark.slow
def test_on_gunicorn_a_promotion_swaps_both_roles_without_a_restart(private_registry, serving_registry, tmp_path,
                                                                   sample_rows):
    registry = dataclasses.replace(serving_registry, store=private_registry)
    service = start_service(registry, tmp_path, name="shadow")
    try:
        def post(rows: int) -> dict:
            answer = service.http.post(f"{service.url}/predict", json={"data": sample_rows[:rows]}, headers=AUTH,
                                       timeout=30)
            assert answer.status_code == 200, answer.text
            return answer.json()

        v1, v2 = serving_registry.v1.version, serving_registry.v2.version
        service.wait_for(lambda: all(s["challenger"]["model_version"] == v2 for s in (
            service.http.get(f"{service.url}/version", timeout=10).json() for _ in range(6))
            if s["challenger"]), "every worker shadow-scoring with v2")
        for _ in range(10):
            assert post(3)["model_version"] == v1
        before = service.logged(("model_version", "shadow_version", "shadow_score"))
        assert len(before) == 30 and (before["shadow_version"] == v2).all() and before["shadow_score"].notna().all()

        # The challenger is promoted: it answers, and nothing is in Staging to shadow it.
        move_to_stage(private_registry.client(), registry.name, v2, "Production")
        service.wait_for(lambda: service.versions_served() == {v2: 2}, "both workers serving v2")
        service.wait_for(lambda: service.metrics().get(("fraud_shadow_model_info", (
            ("flavor", "onnx"), ("model_name", registry.name), ("model_version", v2)))) == 0,
            "both workers dropping v2 as challenger")
        for _ in range(10):
            assert post(2)["model_version"] == v2
        after = service.logged(("model_version", "shadow_version", "shadow_score")).iloc[30:]
        assert (after["model_version"] == v2).all() and after["shadow_score"].isna().all()

        # The former champion comes back as the challenger: the roles have swapped.
        move_to_stage(private_registry.client(), registry.name, v1, "Staging")
        service.wait_for(lambda: service.metrics().get(("fraud_shadow_model_info", (
            ("flavor", "onnx"), ("model_name", registry.name), ("model_version", v1)))) == 2,
            "both workers shadow-scoring with v1")
        for _ in range(10):
            assert post(1)["model_version"] == v2
        last = service.logged(("model_version", "shadow_version")).iloc[-10:]
        assert (last["model_version"] == v2).all() and (last["shadow_version"] == v1).all()
    finally:
        service.stop()
