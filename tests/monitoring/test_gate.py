"""The promotion gate: every branch against a real registry with tiny trained models, and rollback."""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest
from mlflow.exceptions import MlflowException

from common import registry
from common.schema import FEATURES, LABEL
from monitoring import gate
from monitoring.reference import read_reference_file, read_reference_metadata
from tests.helpers.builders import (
    MlflowStore,
    ReferenceData,
    TrainedModel,
    new_mlflow_store,
    promote_by_hand,
    train_model,
)


@dataclass(frozen=True)
class GateRegistry:
    """Five Staging versions: 1 and 2 good (the same training), 3 a one-stump forest, 4 with a corrupt ONNX,
    5 a smaller forest a little worse than 1."""

    store: MlflowStore
    data: ReferenceData
    good: TrainedModel
    other: TrainedModel
    stump: TrainedModel
    broken: TrainedModel
    weaker: TrainedModel

    def copy(self, dest: Path) -> MlflowStore:
        """A private copy of the registry database; artifacts are shared by path (read-only)."""
        return self.store.copy(dest)


def _corrupt_onnx(store: MlflowStore, run_id: str) -> None:
    artifact_uri = store.client().get_run(run_id).info.artifact_uri
    path = Path(urlparse(artifact_uri).path) / "onnx" / "model.onnx"
    path.write_bytes(b"not an onnx model" * 64)


@pytest.fixture(scope="module")
def gate_registry(tmp_path_factory, reference_data) -> GateRegistry:
    store = new_mlflow_store(tmp_path_factory.mktemp("gate-registry"))
    good = train_model(store, reference_data, seed=0)
    # A retrain on the same data with the same seed: the same forest, so equal metrics. Two tiny
    # forests with different seeds differ by a fraud or two on ~600 evaluation rows, more than the margins.
    other = train_model(store, reference_data, seed=0)
    stump = train_model(store, reference_data, seed=2, n_estimators=1, max_depth=1, max_features="2")
    broken = train_model(store, reference_data, seed=3)
    _corrupt_onnx(store, broken.run_id)
    weaker = train_model(store, reference_data, seed=2, n_estimators=4)
    return GateRegistry(store, reference_data, good, other, stump, broken, weaker)


@dataclass(frozen=True)
class GateWorld:
    store: MlflowStore
    registry: GateRegistry
    reference_file: Path
    out: Path
    request_log: Path

    @property
    def name(self) -> str:
        return self.registry.good.name

    def client(self):
        return self.store.client()

    def stage_of(self, version: str) -> str:
        with registry.stages_api():
            return self.client().get_model_version(self.name, version).current_stage

    def alias(self, alias: str) -> str | None:
        """The version holding `alias`, or None when no version does; any other error fails the test."""
        try:
            return str(self.client().get_model_version_by_alias(self.name, alias).version)
        except MlflowException as exc:
            # MLflow 3 has no error code of its own for it (common.registry.is_missing_alias).
            if exc.error_code == "INVALID_PARAMETER_VALUE" and f"alias {alias} not found" in exc.message:
                return None
            raise

    def promote(self, *args: str) -> int:
        return gate.main([*args, "--reference-file", str(self.reference_file), "--output-dir", str(self.out)])

    def result(self) -> dict:
        return json.loads((self.out / gate.RESULT_FILE).read_text())

    def run(self):
        run = self.client().get_run(self.result()["run_id"])
        assert self.client().get_experiment(run.info.experiment_id).name == registry.PROMOTION_EXPERIMENT
        return run

    def make_production(self, version: str) -> None:
        """Put a version in Production directly, promoted now (as if by an earlier gate run)."""
        registry.move_to_stage(self.client(), self.name, version, "Production")
        self.client().set_model_version_tag(self.name, version, "promoted_at", repr(time.time()))

    def log_drift_run(self, detected: str = "true") -> str:
        experiment = registry.ensure_experiment(registry.DRIFT_EXPERIMENT, self.store.tracking_uri)
        run = self.client().create_run(experiment, tags={"drift_detected": detected, "drifted_features": "V1"})
        self.client().set_terminated(run.info.run_id)
        return run.info.run_id

    def log_performance_run(self, degraded: str = "true") -> str:
        experiment = registry.ensure_experiment(registry.PERFORMANCE_EXPERIMENT, self.store.tracking_uri)
        run = self.client().create_run(experiment, tags={"performance_degraded": degraded,
                                                         "reason": "recall 0.41 is below its hold-out 0.82 - 0.1"})
        self.client().set_terminated(run.info.run_id)
        return run.info.run_id


@pytest.fixture
def world(gate_registry, tmp_path, use_env, monkeypatch) -> GateWorld:
    store = gate_registry.copy(tmp_path / "registry")
    use_env({**store.env(), **gate_registry.data.env(), "MODEL_NAME": gate_registry.good.name,
             "LATEST_DB": str(tmp_path / "requests.db")})  # the gate lock goes beside it
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    return GateWorld(store, gate_registry, tmp_path / "drift_reference.parquet", tmp_path / "out",
                     tmp_path / "requests.db")


def test_first_model_passes_the_floor_and_becomes_production_with_tags_and_a_fresh_reference(world):
    version = world.registry.good.version
    assert world.promote("--version", version) == gate.EXIT_PASSED
    assert world.stage_of(version) == "Production" and world.alias("champion") == version
    assert world.alias("challenger") != version
    tags = world.client().get_model_version(world.name, version).tags
    run = world.run()
    assert tags["promotion_run_id"] == run.info.run_id and float(tags["promoted_at"]) <= time.time()
    assert "floor" in tags["promotion_reasons"]
    assert run.data.tags["decision"] == "promoted"
    assert run.info.run_name == f"gate · v{version} → Production"
    assert "candidate.average_precision" in run.data.metrics and "production.average_precision" not in run.data.metrics
    meta = read_reference_metadata(world.reference_file)
    assert meta["model_version"] == version and meta["run_id"] == world.registry.good.run_id
    reference = read_reference_file(world.reference_file)
    assert reference.scores is not None and reference.rows == len(reference.scores) > 0
    assert not [p for p in world.reference_file.parent.iterdir() if p.name.endswith(".tmp")]


def test_first_model_below_the_floor_is_refused(world, tmp_path):
    config = tmp_path / "promotion.json"
    config.write_text(json.dumps({"floor_average_precision": 0.99, "floor_recall": 0.99}))
    assert world.promote("--version", world.registry.stump.version, "--config", str(config)) == gate.EXIT_REFUSED
    assert registry.production_version(world.client(), world.name) is None
    assert "floor" in " ".join(world.result()["reasons"])
    assert not world.reference_file.exists()


def test_candidate_without_drift_or_reason_is_refused_and_production_is_untouched(world, capsys):
    world.log_drift_run("true")  # before the promotion below: it must not count
    world.make_production(world.registry.good.version)
    world.log_drift_run("false")
    assert world.promote("--version", world.registry.other.version) == gate.EXIT_REFUSED
    assert world.stage_of(world.registry.good.version) == "Production"
    assert world.alias("champion") == world.registry.good.version
    assert world.stage_of(world.registry.other.version) == "Staging"
    result = world.result()
    assert result["decision"] == "refused" and any("no drift or performance run" in r for r in result["reasons"])
    assert "no drift or performance run" in capsys.readouterr().out
    run = world.run()
    assert run.data.tags["decision"] == "refused" and "FAIL" in run.data.tags["check.cause"]
    assert run.info.run_name == f"gate · v{world.registry.other.version} refused"


def test_drift_found_after_promotion_lets_a_good_candidate_through_with_both_models_metrics(world):
    world.make_production(world.registry.good.version)
    drift_run = world.log_drift_run("true")
    candidate = world.registry.other.version
    assert world.promote("--version", candidate) == gate.EXIT_PASSED, world.result()["reasons"]
    assert world.stage_of(candidate) == "Production" and world.alias("champion") == candidate
    assert world.stage_of(world.registry.good.version) == "Archived"
    assert world.alias("previous") == world.registry.good.version
    metrics = world.run().data.metrics
    for name in ("average_precision", "recall"):
        assert {f"candidate.{name}", f"production.{name}", f"delta.{name}"} <= set(metrics)
        assert metrics[f"delta.{name}"] == pytest.approx(metrics[f"candidate.{name}"] - metrics[f"production.{name}"])
    assert drift_run in world.client().get_model_version(world.name, candidate).tags["promotion_reasons"]
    assert read_reference_metadata(world.reference_file)["model_version"] == candidate


def test_explicit_reason_is_enough_and_is_recorded(world):
    world.make_production(world.registry.good.version)
    candidate = world.registry.other.version
    assert world.promote("--version", candidate, "--reason", "manual") == gate.EXIT_PASSED
    run = world.run()
    assert run.data.params["reason"] == "manual"
    assert "manual" in world.client().get_model_version(world.name, candidate).tags["promotion_reasons"]


def test_default_candidate_is_the_newest_staging_version(world):
    world.make_production(world.registry.good.version)
    assert world.promote("--reason", "scheduled") in (gate.EXIT_PASSED, gate.EXIT_REFUSED)
    assert world.result()["candidate_version"] == world.registry.weaker.version


def test_worse_candidate_is_refused_on_the_same_evaluation_rows(world):
    world.make_production(world.registry.good.version)
    assert world.promote("--version", world.registry.stump.version, "--reason", "manual") == gate.EXIT_REFUSED
    assert world.stage_of(world.registry.good.version) == "Production"
    result = world.result()
    assert any(r.startswith("quality: candidate worse") for r in result["reasons"])
    metrics = result["metrics"]
    assert metrics["candidate.rows"] == metrics["production.rows"]  # the same rows, both models
    assert metrics["candidate.average_precision"] < metrics["production.average_precision"]


def test_broken_candidate_is_refused_and_production_is_untouched(world):
    world.make_production(world.registry.good.version)
    assert world.promote("--version", world.registry.broken.version, "--reason", "manual") == gate.EXIT_REFUSED
    assert world.stage_of(world.registry.good.version) == "Production"
    assert world.stage_of(world.registry.broken.version) == "Staging"
    assert any(r.startswith("integrity:") and "ONNX" in r for r in world.result()["reasons"])
    assert not world.reference_file.exists()


def test_rollback_restores_the_previous_version_with_alias_bookkeeping(world):
    first, second = world.registry.good.version, world.registry.other.version
    assert world.promote("--version", first) == gate.EXIT_PASSED
    assert world.promote("--version", second, "--reason", "manual") == gate.EXIT_PASSED
    assert world.promote("--rollback", "true") == gate.EXIT_PASSED
    assert world.stage_of(first) == "Production" and world.alias("champion") == first
    assert world.stage_of(second) == "Archived" and world.alias("previous") == second
    assert world.run().data.tags["decision"] == "rolled_back"
    assert world.run().info.run_name == f"gate · rollback to v{first}"
    assert read_reference_metadata(world.reference_file)["model_version"] == first
    assert world.client().get_model_version(world.name, first).tags["promotion_action"] == "rollback"


def test_rollback_without_a_previous_version_is_a_usage_error(world):
    assert world.promote("--rollback", "true") == gate.EXIT_USAGE


def test_already_production_or_unknown_versions_and_bad_reasons_are_usage_errors(world):
    world.make_production(world.registry.good.version)
    assert world.promote("--version", world.registry.good.version) == gate.EXIT_USAGE
    assert world.promote("--version", "999") == gate.EXIT_USAGE
    assert world.promote("--version", world.registry.other.version, "--reason", "because") == gate.EXIT_USAGE


def test_running_service_serves_the_newly_promoted_version_without_a_restart(world, tmp_path):
    from service.app import create_app, service_of

    first, second = world.registry.good.version, world.registry.other.version
    promote_by_hand(world.client(), world.name, first)  # with the gate's record, which the service requires
    token = "gate-test-token-0123"
    app = create_app({
        "tokens": (token,), "request_log": str(tmp_path / "requests.db"), "tracking_uri": world.store.tracking_uri,
        "model_name": world.name, "model_uri": None, "fraud_threshold": None, "poll_seconds": 0.2,
        "feature_config": str(world.registry.data.feature_config),
    })
    try:
        client = app.test_client()
        headers = {"Authorization": f"Bearer {token}"}
        assert client.get("/version", headers=headers).get_json()["model_version"] == first
        assert world.promote("--version", second, "--reason", "manual") == gate.EXIT_PASSED
        deadline = time.monotonic() + 30
        served = first
        while served != second and time.monotonic() < deadline:
            time.sleep(0.1)
            served = client.get("/version", headers=headers).get_json()["model_version"]
        assert served == second
        ready = client.get("/ready").get_json()
        assert ready["refused"] is None and ready["gate_check"]["required"] is True
        answer = client.post("/predict", json={"data": [[0.0] * 29]}, headers=headers).get_json()
        assert answer["model_version"] == second
    finally:
        service_of(app).close()


def test_candidate_without_its_evaluation_rows_is_refused(world):
    artifact_uri = world.client().get_run(world.registry.stump.run_id).info.artifact_uri
    evaluation = Path(urlparse(artifact_uri).path) / gate.EVALUATION_ARTIFACT
    hidden = evaluation.with_name("hidden.parquet")
    evaluation.rename(hidden)
    try:
        assert world.promote("--version", world.registry.stump.version) == gate.EXIT_REFUSED
    finally:
        hidden.rename(evaluation)
    assert registry.production_version(world.client(), world.name) is None
    assert any(r.startswith("quality: not measured") and "evaluation.parquet" in r for r in world.result()["reasons"])


# --- the margins, on models that are not perfect ------------------------------------------------------


@pytest.fixture(scope="module")
def drops(gate_registry, tmp_path_factory) -> dict[str, float]:
    """How far `weaker` falls below `good` on its evaluation rows, as the gate measures it."""
    root = tmp_path_factory.mktemp("gate-drops")
    store = gate_registry.copy(root / "registry")
    name, good, weaker = gate_registry.good.name, gate_registry.good.version, gate_registry.weaker.version
    registry.move_to_stage(store.client(), name, good, "Production")
    config = root / "generous.json"
    config.write_text(json.dumps({"max_average_precision_drop": 1.0, "max_recall_drop": 1.0}))
    with pytest.MonkeyPatch.context() as mp:
        for key, value in {**store.env(), **gate_registry.data.env(), "MODEL_NAME": name,
                           "LATEST_DB": str(root / "requests.db")}.items():
            mp.setenv(key, value)
        mp.delenv("MLFLOW_RUN_ID", raising=False)
        code = gate.main(["--version", weaker, "--reason", "manual", "--config", str(config),
                          "--reference-file", str(root / "ref.parquet"), "--output-dir", str(root)])
    assert code == gate.EXIT_PASSED
    metrics = json.loads((root / gate.RESULT_FILE).read_text())["metrics"]
    found = {m: metrics[f"production.{m}"] - metrics[f"candidate.{m}"] for m in gate.COMPARED}
    # The generated data is hard enough that neither model is perfect, and the smaller forest is worse
    # on both metrics: otherwise the margins below would test nothing.
    assert metrics["production.average_precision"] < 0.99 and metrics["production.recall"] < 1.0, metrics
    assert found["average_precision"] > 0.005 and found["recall"] > 0.005, found
    return found


def _margins(world: GateWorld, tmp_path: Path, **margins: float) -> str:
    config = tmp_path / "margins.json"
    config.write_text(json.dumps({**dataclasses.asdict(gate.GateConfig()), **margins}))
    return str(config)


@pytest.mark.parametrize(("metric", "inside"), [("average_precision", True), ("average_precision", False),
                                                 ("recall", True), ("recall", False)])
def test_a_candidate_just_inside_a_margin_passes_and_just_outside_it_is_refused(world, drops, tmp_path, metric,
                                                                               inside):
    """The other metric's margin is wide open, so each case tests one margin alone."""
    other = next(m for m in gate.COMPARED if m != metric)
    drop = drops[metric]
    margin = drop * (1.05 if inside else 0.95)
    names = {"average_precision": "max_average_precision_drop", "recall": "max_recall_drop"}
    config = _margins(world, tmp_path, **{names[metric]: margin, names[other]: 1.0})
    world.make_production(world.registry.good.version)
    code = world.promote("--version", world.registry.weaker.version, "--reason", "manual", "--config", config)
    reasons = " ".join(world.result()["reasons"])
    if inside:
        assert code == gate.EXIT_PASSED, reasons
        assert world.stage_of(world.registry.weaker.version) == "Production"
    else:
        assert code == gate.EXIT_REFUSED, reasons
        assert f"candidate worse than Production: {metric}" in reasons
        assert world.stage_of(world.registry.good.version) == "Production"


def test_gate_config_defaults_are_the_shipped_promotion_config():
    shipped = gate.GateConfig.load(Path(__file__).resolve().parents[2] / "data" / "promotion_config.json")
    assert shipped == gate.GateConfig()


# --- live evidence: performance verdicts and shadow scores ---------------------------------------------


def test_reason_performance_needs_a_performance_run_that_found_degradation(world):
    world.make_production(world.registry.good.version)
    candidate = world.registry.other.version
    world.log_performance_run("false")
    assert world.promote("--version", candidate, "--reason", "performance") == gate.EXIT_REFUSED
    assert "no performance run since" in " ".join(world.result()["reasons"])
    run_id = world.log_performance_run("true")
    assert world.promote("--version", candidate, "--reason", "performance") == gate.EXIT_PASSED
    tags = world.client().get_model_version(world.name, candidate).tags
    assert run_id in tags["promotion_reasons"] and "degradation" in tags["promotion_reasons"]
    assert world.run().data.params["reason"] == "performance"


def test_a_degradation_verdict_is_a_cause_without_a_reason(world):
    world.make_production(world.registry.good.version)
    world.log_drift_run("false")
    run_id = world.log_performance_run("true")
    assert world.promote("--version", world.registry.other.version) == gate.EXIT_PASSED
    assert any(run_id in r for r in world.result()["reasons"])


def _live_rows(world: GateWorld, *, candidate_misses: float, rows: int = 4_000) -> None:
    """Rows Production served while the candidate scored them in the shadow, labelled through feedback.

    The champion's scores are its own; the candidate's are its own too, except on a share
    `candidate_misses` of the frauds, where it scored 0 (the pattern it never learned)."""
    from common.features import load_feature_config
    from common.model import load_bundle
    from common.store import RequestStore
    from training import scenarios

    production, candidate = world.registry.good, world.registry.other
    frame = scenarios.inputs(scenarios.named("stable", fraud_rate=2.0, seed=5), 1,
                             load_feature_config(world.registry.data.feature_config), rows)
    X = frame[list(FEATURES)].to_numpy()
    champ = load_bundle(world.client(), world.name, production.version)
    chall = load_bundle(world.client(), world.name, candidate.version)
    shadow = chall.predict_proba(X)
    fraud = np.flatnonzero(frame[LABEL].to_numpy() == 1)
    shadow[fraud[: int(len(fraud) * candidate_misses)]] = 0.0
    score = champ.predict_proba(X)
    out = frame[list(FEATURES)].copy()
    out.insert(0, "request_id", [f"live-{i}" for i in range(rows)])
    out.insert(1, "ts", time.time() - 3600 + np.arange(rows) / 10)
    out = out.assign(score=score, decision=(score >= champ.threshold).astype(int), threshold=champ.threshold,
                     model_name=world.name, model_version=production.version, shadow_score=shadow,
                     shadow_decision=(shadow >= chall.threshold).astype(int), shadow_version=candidate.version)
    store = RequestStore(str(world.request_log))
    try:
        store.insert_frame(out)
        store.record_feedback(dict(zip(out["request_id"], frame[LABEL].astype(int), strict=True)))
    finally:
        store.dispose()


def test_a_candidate_as_good_on_the_hold_out_but_worse_on_live_shadow_rows_is_refused(world):
    world.make_production(world.registry.good.version)
    _live_rows(world, candidate_misses=0.5)
    code = world.promote("--version", world.registry.other.version, "--reason", "manual")
    result = world.result()
    assert code == gate.EXIT_REFUSED, result["reasons"]
    checks = {c["name"]: c for c in result["checks"]}
    assert checks["quality"]["passed"] and not checks["live"]["passed"]
    assert "recall" in checks["live"]["detail"] and "live rows" in checks["live"]["detail"]
    metrics = world.run().data.metrics
    assert metrics["live.candidate.recall"] < metrics["live.production.recall"] - 0.3
    assert {"candidate.recall", "production.recall"} <= set(metrics)  # both comparisons are in the run
    assert world.stage_of(world.registry.good.version) == "Production"


def test_a_candidate_as_good_on_live_shadow_rows_passes_with_both_comparisons_recorded(world):
    world.make_production(world.registry.good.version)
    _live_rows(world, candidate_misses=0.0)
    assert world.promote("--version", world.registry.other.version, "--reason", "manual") == gate.EXIT_PASSED
    checks = {c["name"]: c for c in world.result()["checks"]}
    assert checks["live"]["passed"] and checks["quality"]["passed"]
    assert world.run().data.metrics["live.candidate.frauds"] >= 20


def test_too_few_live_frauds_leave_the_hold_out_to_decide_and_say_so(world):
    world.make_production(world.registry.good.version)
    _live_rows(world, candidate_misses=1.0, rows=300)  # 6 frauds: not evidence
    assert world.promote("--version", world.registry.other.version, "--reason", "manual") == gate.EXIT_PASSED
    result = world.result()
    assert "live" not in {c["name"] for c in result["checks"]}
    assert any("min_live_frauds=20" in note for note in result["notes"])
