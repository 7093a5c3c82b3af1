"""Crash-safe promotions: a gate killed (SIGKILL) after each step of a promotion or a rollback
leaves the service on a version that is Production and champion, and the next gate repairs the
registry, says so, and records it; a registry split by hand is repaired the same way."""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from mlflow.exceptions import MlflowException

from common import registry
from common.paths import REPO_ROOT
from monitoring import gate, promotion
from monitoring.reference import read_reference_metadata
from service.metrics import Metrics
from service.watcher import ModelWatcher
from tests.helpers.builders import MlflowStore
from tests.helpers.processes import clean_env, run

GENEROUS = {"max_average_precision_drop": 1.0, "max_recall_drop": 1.0, "floor_average_precision": 0.0,
            "floor_recall": 0.0}


@dataclass(frozen=True)
class World:
    """A private copy of the serving registry (v1 Production, v2 Staging) and the gate's files."""

    store: MlflowStore
    name: str
    env: dict[str, str]
    root: Path

    @property
    def client(self):
        return self.store.client()

    @property
    def reference_file(self) -> Path:
        return self.root / "drift_reference.parquet"

    def gate_args(self, *args: str) -> list[str]:
        return [*args, "--reference-file", str(self.reference_file), "--output-dir", str(self.root / "out")]

    def stages(self) -> dict[str, str]:
        with registry.stages_api():
            return {str(v.version): v.current_stage for v in self.client.search_model_versions(f"name = '{self.name}'")}

    def alias(self, alias: str) -> str | None:
        holder = registry.version_with_alias(self.client, self.name, alias)
        return None if holder is None else str(holder.version)

    def intent(self) -> dict | None:
        raw = self.client.get_registered_model(self.name).tags.get(promotion.INTENT_TAG)
        return None if raw is None else json.loads(raw)

    def served(self) -> str:
        """The version a service's watcher loads from this registry now."""
        watcher = ModelWatcher(Metrics(), tracking_uri=lambda: self.store.tracking_uri, model_name=self.name)
        watcher.check()
        assert watcher.current is not None, watcher.status()
        return watcher.current.version

    def repair_runs(self) -> list:
        experiment = self.client.get_experiment_by_name(registry.PROMOTION_EXPERIMENT)
        return self.client.search_runs([experiment.experiment_id], "tags.decision = 'repaired'")


@pytest.fixture
def world(serving_registry, tmp_path, use_env, monkeypatch) -> World:
    store = serving_registry.copy(tmp_path / "registry")
    config = tmp_path / "promotion.json"
    config.write_text(json.dumps(GENEROUS))
    env = {**store.env(), **serving_registry.data.env(), "MODEL_NAME": serving_registry.name,
           "LATEST_DB": str(tmp_path / "requests.db"), "PROMOTION_CONFIG": str(config)}
    use_env(env)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.delenv(promotion.CRASH_AFTER_VARIABLE, raising=False)
    return World(store, serving_registry.name, env, tmp_path)


def _killed_gate(world: World, step: str, *args: str) -> str:
    """Run the gate in a process of its own that kills itself with SIGKILL after `step`; return
    the id of the gate run it left behind."""
    result = run([sys.executable, "-m", "monitoring.gate", *world.gate_args(*args)], cwd=REPO_ROOT, expect=-9,
                 env=clean_env(**world.env, **{promotion.CRASH_AFTER_VARIABLE: step}), timeout=300)
    assert "gate:" not in result.stdout  # it never got to print its decision
    intent = world.intent()
    assert intent is not None and intent["run_id"]
    return intent["run_id"]


def _assert_settled(world: World, champion: str, previous: str, killed_run: str, out: str) -> None:
    stages = world.stages()
    assert [v for v, stage in stages.items() if stage == "Production"] == [champion], stages
    assert world.alias("champion") == champion and world.alias("previous") == previous
    assert world.alias("challenger") != champion
    assert world.intent() is None
    assert world.client.get_run(killed_run).info.status == "KILLED"
    assert world.client.get_run(killed_run).data.tags["decision"] == "interrupted"
    assert re.fullmatch(r"gate · (rollback to )?v\d+ interrupted", world.client.get_run(killed_run).info.run_name)
    (repair,) = world.repair_runs()
    assert repair.info.run_name == "gate · repair"
    assert repair.data.tags["repairs"] in out.replace("gate: repaired: ", "")  # printed, and recorded
    assert f"run {killed_run} marked KILLED" in repair.data.tags["repairs"]
    assert read_reference_metadata(world.reference_file)["model_version"] == champion
    assert world.served() == champion


@pytest.mark.slow
def test_a_promotion_killed_after_the_stage_change_is_undone_and_the_next_gate_promotes(world, capsys):
    killed = _killed_gate(world, "stage", "--version", "2", "--reason", "manual")
    # Two Production versions, champion still on v1: the service stays on v1.
    assert world.stages() == {"1": "Production", "2": "Production"} and world.alias("champion") == "1"
    assert world.served() == "1"

    assert gate.main(world.gate_args("--version", "2", "--reason", "manual")) == gate.EXIT_PASSED
    out = capsys.readouterr().out
    assert "gate: repaired: the promote to v2 (MLflow run " in out
    assert "was interrupted before alias champion moved: undone, v2 is back in stage Staging" in out
    assert "note: repaired first: the promote to v2" in out  # in the decision too (promotion_result.json)
    _assert_settled(world, champion="2", previous="1", killed_run=killed, out=out)


@pytest.mark.slow
@pytest.mark.parametrize("step", ["alias", "reference"])
def test_a_promotion_killed_after_the_alias_moved_is_completed_by_the_next_gate(world, capsys, step):
    killed = _killed_gate(world, step, "--version", "2", "--reason", "manual")
    assert world.alias("champion") == "2" and world.served() == "2"
    if step == "alias":  # v1 is not archived yet, `previous` not set, the reference not refreshed
        assert world.stages() == {"1": "Production", "2": "Production"} and world.alias("previous") is None
        assert not world.reference_file.exists()
    else:  # the registry change and the reference are done; the decision was never logged
        assert world.stages() == {"1": "Archived", "2": "Production"} and world.alias("previous") == "1"
        assert read_reference_metadata(world.reference_file)["model_version"] == "2"

    # The same command again: the promotion it asked for is complete, so there is nothing to decide.
    assert gate.main(world.gate_args("--version", "2", "--reason", "manual")) == gate.EXIT_USAGE
    captured = capsys.readouterr()
    assert "was interrupted after alias champion moved to v2: completed" in captured.out
    assert "v2 is already Production (after repairing an interrupted promotion first)" in captured.err
    if step == "alias":
        assert "v1 was in stage Production beside the champion v2: archived" in captured.out
        assert "alias previous was on no version: moved to v1, the version v2 replaced" in captured.out
        assert "drift reference refreshed for v2" in captured.out
    _assert_settled(world, champion="2", previous="1", killed_run=killed, out=captured.out)
    tags = world.client.get_model_version(world.name, "2").tags
    assert tags["promotion_run_id"] == killed and tags["replaced_version"] == "1"


@pytest.mark.slow
def test_a_rollback_killed_after_the_stage_change_is_undone_and_the_next_gate_rolls_back(world, capsys):
    assert gate.main(world.gate_args("--version", "2", "--reason", "manual")) == gate.EXIT_PASSED
    killed = _killed_gate(world, "stage", "--rollback", "true")
    assert world.stages() == {"1": "Production", "2": "Production"} and world.served() == "2"

    assert gate.main(world.gate_args("--rollback", "true")) == gate.EXIT_PASSED
    out = capsys.readouterr().out
    assert "the rollback to v1 (MLflow run " in out and "undone, v1 is back in stage Archived" in out
    _assert_settled(world, champion="1", previous="2", killed_run=killed, out=out)


def test_a_registry_split_by_hand_is_repaired_by_the_next_gate_and_recorded(world, capsys):
    client = world.client
    # Production and champion on different versions, v2 in Production too, and `previous` on the champion.
    with registry.stages_api():
        client.transition_model_version_stage(world.name, "2", "Production")
        client.transition_model_version_stage(world.name, "1", "Archived")
    client.set_registered_model_alias(world.name, "previous", "1")
    assert world.alias("champion") == "1" and world.served() == "1"  # the service follows the alias

    assert gate.main(world.gate_args("--rollback", "true")) == gate.EXIT_USAGE  # nothing to roll back to
    captured = capsys.readouterr()
    for line in ("alias champion was on v1 in stage Archived: v1 made Production",
                 "v2 was in stage Production beside the champion v1: archived",
                 "alias previous was on the champion v1 itself: removed"):
        assert f"gate: repaired: {line}" in captured.out
    assert "has no version with alias 'previous' to roll back to" in captured.err
    assert world.stages() == {"1": "Production", "2": "Archived"}
    assert world.alias("champion") == "1" and world.alias("previous") is None
    (repair,) = world.repair_runs()
    assert "v2 was in stage Production beside the champion v1: archived" in repair.data.tags["repairs"]

    assert gate.main(world.gate_args("--version", "2", "--reason", "manual")) == gate.EXIT_PASSED
    assert "repaired" not in capsys.readouterr().out  # consistent now: nothing more to repair
    assert len(world.repair_runs()) == 1


def test_a_registry_without_alias_champion_gets_it_on_its_production_version(world, capsys):
    world.client.delete_registered_model_alias(world.name, "champion")
    assert world.served() == "1"  # no alias: the newest Production version
    assert gate.main(world.gate_args("--version", "2", "--reason", "manual")) == gate.EXIT_PASSED
    out = capsys.readouterr().out
    assert "gate: repaired: no version had alias champion: set on v1, the newest Production version" in out
    assert world.alias("champion") == "2" and world.alias("previous") == "1"


def test_an_unreadable_alias_lookup_is_an_error_not_a_missing_alias(world):
    with pytest.raises(MlflowException, match="Invalid alias name"):
        registry.version_with_alias(world.client, world.name, "not an alias!")
