"""Crash-safe promotions: a gate killed (SIGKILL) after each step of a promotion or a rollback
leaves the service on a version that is Production and champion, and the next gate repairs the
registry, says so, and records it; a registry split by hand is repaired the same way."""

from __future__ import annotations

import re

import pytest
from mlflow.exceptions import MlflowException

from common import registry
from monitoring import gate
from monitoring.reference import read_reference_metadata
from tests.helpers.gates import GateWorld, gate_world


@pytest.fixture
def world(serving_registry, tmp_path, monkeypatch) -> GateWorld:
    world = gate_world(serving_registry, tmp_path)
    world.apply(monkeypatch)
    return world


def _assert_settled(world: GateWorld, champion: str, previous: str, killed_run: str, out: str) -> None:
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
    killed = world.killed_gate("stage", "--version", "2", "--reason", "manual")
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
    killed = world.killed_gate(step, "--version", "2", "--reason", "manual")
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
    killed = world.killed_gate("stage", "--rollback", "true")
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
