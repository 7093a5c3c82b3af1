"""Registry trouble with a real `mlflow server` as the tracking URI: versions that cannot be served
promoted by hand (no gate), then the server gone."""

from __future__ import annotations

import json
import time

import pytest

from common.model import load_bundle
from common.registry import move_to_stage
from service.app import create_app, service_of
from service.scoring import ServingModel
from tests.helpers.gunicorn import START_SECONDS, WORKERS, Service
from tests.helpers.load import Load, reconcile, summary
from tests.helpers.tracking_server import corrupt_version, incompatible_version

# Load keeps running until the faults' effects are seen, at most this much longer.
SLACK_SECONDS = 120.0


def check_refusal(service: Service, name: str, kind: str, bad: str, old: str) -> None:
    """Every worker refused version `bad` and serves `old`, and says so in metrics, /ready and its log."""
    samples = service.metrics()
    assert samples[("fraud_model_refused_version", ())] == int(bad), (
        f"fraud_model_refused_version is {samples[('fraud_model_refused_version', ())]}, not {bad}")
    assert service.versions_served() == {old: WORKERS}, (
        f"after the {kind} version: workers serve {service.versions_served()}")
    for _ in range(2 * WORKERS):  # /ready answers from either worker; both must say it
        status, ready = service.ready()
        refusal = ready.get("refused") or {}
        assert (status == 200 and ready["model"]["version"] == old and refusal.get("version") == bad
                and refusal.get("error")), f"/ready after the {kind} version {bad}: {status} {json.dumps(ready)[:400]}"
    assert f"model load refused: {name} version {bad}" in service.output(), (
        f"the log does not say version {bad} was refused")


@pytest.mark.slow
@pytest.mark.scenario("registry: bad versions, outage")
def test_bad_promotions_and_a_dead_tracking_server_leave_the_loaded_model_serving_and_reported(
        serve, tracking_server, serving_registry, sample_rows, size, scenario, tmp_path):
    """The service's registry is a real `mlflow server`.

    1. A corrupt and then an incompatible version are promoted by hand (move_to_stage, no gate):
       every worker refuses each, keeps version 1, and says so in /ready, its log and its metrics.
    2. The tracking server dies (SIGKILL): scoring goes on with version 1, and /ready and the
       fraud_registry_reachable gauge say the registry is unreachable. With `--registry-restart`,
       it comes back and the service notices.
    Throughout, every request succeeds with version 1 and every row reported as scored is logged.
    """
    clients, seconds = size.fault_clients, size.fault_seconds
    name, old = serving_registry.name, serving_registry.v1.version
    # The tracking server is still starting: the workers poll until it answers.
    service = serve("registry", tracking_uri=tracking_server.url)
    tracking_server.wait()
    scenario.step("tracking server and service up")
    registry = tracking_server.store.client()
    with Load(service.url, sample_rows, clients=clients, seconds=seconds + SLACK_SECONDS) as load:
        refused = 0
        for kind, make in (("corrupt", corrupt_version), ("incompatible", incompatible_version)):
            bad = make(tracking_server.store, name, old, tmp_path / kind)
            move_to_stage(registry, name, bad, "Production")
            scenario.step(f"{kind} version {bad} promoted by hand")
            refused += WORKERS
            service.wait_for(lambda n=refused: service.metrics().get(
                ("fraud_model_reloads_total", (("result", "refused"),)), 0) >= n,
                f"every worker to refuse the {kind} version {bad}")
            scenario.step(f"{kind} version {bad} refused by every worker")
            check_refusal(service, name, kind, bad, old)
            scenario.faults += 1

        before_outage = len(service.output())
        tracking_server.kill()
        scenario.step("tracking server killed")
        service.wait_for(lambda: service.metrics()[("fraud_registry_reachable", ())] == 0,
                         "the service to notice the registry is down")
        status, ready = service.wait_for(lambda: (r := service.ready())[1]["registry"]["reachable"] is False and r,
                                         "/ready to say the registry is unreachable")
        assert status == 200 and ready["model"]["version"] == old, (
            f"with the registry down, /ready is {status} serving {ready.get('model')}")
        assert ready["registry"]["error"], "/ready gives no reason for the unreachable registry"
        scenario.faults += 1
        noticed = time.monotonic()
        scenario.step("the service says the registry is unreachable")
        assert "model registry unreachable" in service.output()[before_outage:], (
            "the service log does not say the registry became unreachable")
        load.wait_for(lambda o: sum(x.ok and x.started > noticed for x in o) >= clients,
                      "scoring while the registry is down")
        if size.registry_restart:
            tracking_server.start()
            service.wait_for(lambda: service.metrics()[("fraud_registry_reachable", ())] == 1,
                             "the service to reach the registry again", timeout=START_SECONDS)
            scenario.step("tracking server back, and the service reaches it")
        load.sleep_until(load.started + seconds)
        outcomes = load.stop()
    ledger = reconcile(outcomes, service.logged_ids())
    scenario.took(load)
    scenario.rows_lost = len(ledger.lost)

    failures = [o for o in outcomes if not o.ok]
    assert not failures, f"{len(failures)} requests failed: {summary(failures)}"
    versions = {o.version for o in outcomes if o.ok}
    assert versions == {old}, f"versions answered {versions}; only {old} may serve"
    ledger.check(exact=True)


def test_the_scikit_learn_fallback_answers_batches_as_the_onnx_flavor_does(serving_registry, sample_rows, tmp_path):
    # A registry that times out while a worker downloads the ONNX artifact leaves that worker serving
    # the forest itself (seen in the scenario above under load); its answers must not break then.
    registry = serving_registry
    app = create_app({"tokens": ("t",), "request_log": str(tmp_path / "requests.db"), "watch_model": False,
                      "feature_config": str(registry.data.feature_config)})
    try:
        answers = {}
        for flavor in ("onnx", "sklearn"):
            bundle = load_bundle(registry.store.client(), registry.name, registry.v1.version, flavor=flavor)
            service_of(app).watcher.current = ServingModel(bundle, bundle.threshold, "model", 0.0)
            response = app.test_client().post("/predict", json={"data": sample_rows[:3]},
                                              headers={"Authorization": "Bearer t"})
            assert response.status_code == 200, response.get_data(as_text=True)
            answers[flavor] = response.get_json()["fraud_probability"]
        assert answers["sklearn"] == pytest.approx(answers["onnx"], abs=1e-5)
    finally:
        service_of(app).close()
