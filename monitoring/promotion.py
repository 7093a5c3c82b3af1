"""A promotion's registry change in crash-safe steps, and the repair of one that was interrupted.

The promotion gate (monitoring.gate) makes a version Production, on promotion and on rollback
alike, in this order, one registry write at a time:

1. the intent: the registered model's tag `promotion_in_progress` names the gate run, the action,
   the version, the version it replaces, and the stage it leaves; and the version's gate record
   (`record_gate`), which replicas require before they serve it (common.provenance);
2. the version's stage becomes Production (step "stage");
3. alias `champion` moves to it (step "alias"): the commit point, from which the service serves it
   (common.registry.production_version);
4. the replaced version is archived and gets alias `previous`; `challenger` leaves the new version;
   the new version gets its promotion tags;
5. the gate refreshes the drift reference (step "reference") and logs its decision;
6. the intent is cleared (`finish`).

A gate killed anywhere in between leaves the intent behind. The next gate calls `repair` while it
holds the gate lock (monitoring.gate_lock), before it decides anything. Before the commit point,
the repair undoes the stage change: the version goes back to the stage it left, and the served
version never changed. After it, the repair completes steps 4 to 6. Either way it marks the
interrupted run KILLED, records what it did in an MLflow run of its own (experiment `promotions`,
run name `repair`), and returns it as lines to print. It also mends what no intent explains (a
registry changed by hand, or by an older gate): a champion not in stage Production, a second
Production version, `challenger` on the champion, Production without `champion`, and `previous`
on another version than the one the champion replaced.
"""

from __future__ import annotations

import json
import os
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from mlflow.exceptions import MlflowException

from common import provenance, registry
from common.model import ModelLoadError, load_bundle
from common.text import first_line
from monitoring.reference import ReferenceError, commit_reference_file, read_reference_metadata, stage_refresh
from monitoring.runs import PROMOTED_AT_TAG, log, start_run

INTENT_TAG = "promotion_in_progress"
REPLACED_TAG = "replaced_version"
# Test hook: the crash tests (tests/monitoring/test_gate_crash.py) set it to a step's name.
CRASH_AFTER_VARIABLE = "GATE_TEST_CRASH_AFTER"


def crash_point(step: str) -> None:
    """For tests only: SIGKILL this process right after `step` ("stage", "alias", "reference") when
    GATE_TEST_CRASH_AFTER names it, so that a test can interrupt a promotion at that step. Without
    the variable, as everywhere but those tests, it does nothing."""
    if os.environ.get(CRASH_AFTER_VARIABLE) == step:
        os.kill(os.getpid(), signal.SIGKILL)


@dataclass(frozen=True)
class Intent:
    """What a gate run set out to do; the registered model's tag INTENT_TAG, as JSON."""

    run_id: str | None
    action: str  # "promote" or "rollback"
    version: str
    replaced: str | None
    stage_before: str
    started_at: float


def record_gate(mlflow_client, name: str, version: str | int, run_id: str, digests: dict[str, str]) -> None:
    """Write the gate's record on `version`: its run and the sha256 of each artifact file it checked
    (`digests`, from the bundle it loaded: common.model.ModelBundle.digests).

    Raises:
        ValueError: no run id, or no model file among the digests.
    """
    mlflow_client.set_model_version_tag(name, str(version), provenance.GATE_RECORD_TAG,
                                        provenance.record(name, version, run_id, digests))


def make_production(mlflow_client, name: str, version: str, *, run_id: str | None, action: str,
                    tags: dict[str, str], digests: dict[str, str]) -> None:
    """Steps 1 to 4: record the intent and the gate record (`record_gate`), move `version` to
    Production (common.registry.move_to_stage) and tag it with `tags`. The caller refreshes the
    reference, logs, and then calls `finish`."""
    version = str(version)
    current = registry.production_version(mlflow_client, name)
    with registry.stages_api():
        stage_before = mlflow_client.get_model_version(name, version).current_stage or "None"
    intent = Intent(run_id, action, version, str(current.version) if current is not None else None, stage_before,
                    time.time())
    mlflow_client.set_registered_model_tag(name, INTENT_TAG, json.dumps(asdict(intent)))
    record_gate(mlflow_client, name, version, run_id or "", digests)
    registry.move_to_stage(mlflow_client, name, version, "Production", after_step=crash_point)
    for key, value in tags.items():
        mlflow_client.set_model_version_tag(name, version, key, value)


def finish(mlflow_client, name: str) -> None:
    """Step 6: the promotion is complete; clear its intent."""
    mlflow_client.delete_registered_model_tag(name, INTENT_TAG)


def repair(mlflow_client, name: str, reference_path: Path, uri: str | None = None) -> list[str]:
    """Finish or undo an interrupted promotion and mend a split registry. See the module docstring.

    Returns:
        One line per repair, empty when the registry was consistent.

    Raises:
        MlflowException: the registry cannot be read or written.
    """
    try:
        model = mlflow_client.get_registered_model(name)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return []
        raise
    notes: list[str] = []
    intent = _intent(model.tags.get(INTENT_TAG), notes)
    champion = registry.version_with_alias(mlflow_client, name, registry.STAGE_ALIASES["Production"])
    committed = intent is not None and champion is not None and str(champion.version) == intent.version
    if intent is not None:
        notes.append(_settle(mlflow_client, name, intent, committed))
    notes += _mend(mlflow_client, name, intent.replaced if committed else None)
    if committed:
        notes += _complete(mlflow_client, name, intent, reference_path)
    if INTENT_TAG in model.tags:
        finish(mlflow_client, name)
    if notes:
        _record(mlflow_client, notes, uri)
    return notes


def _intent(raw: str | None, notes: list[str]) -> Intent | None:
    if raw is None:
        return None
    try:
        return Intent(**json.loads(raw))
    except (TypeError, ValueError):
        notes.append(f"tag {INTENT_TAG} was not readable ({raw[:200]!r}): removed")
        return None


def _settle(mlflow_client, name: str, intent: Intent, committed: bool) -> str:
    """Undo an uncommitted promotion's stage change; mark the interrupted run. Returns what it did."""
    what = f"the {intent.action} to v{intent.version} (MLflow run {intent.run_id}) was interrupted"
    if committed:
        line = f"{what} after alias champion moved to v{intent.version}: completed"
    else:
        with registry.stages_api():
            stage = mlflow_client.get_model_version(name, intent.version).current_stage
        if stage == "Production":
            registry.move_to_stage(mlflow_client, name, intent.version, intent.stage_before)
            line = (f"{what} before alias champion moved: undone, v{intent.version} is back in stage "
                    f"{intent.stage_before}")
        else:
            line = f"{what} before it changed the registry: nothing to undo"
    if intent.run_id:
        try:
            running = mlflow_client.get_run(intent.run_id).info.status == "RUNNING"
        except MlflowException:
            running = False  # the run is gone; nothing to mark
        if running:
            mlflow_client.set_tag(intent.run_id, "decision", "interrupted")
            what_run = (f"rollback to v{intent.version}" if intent.action == "rollback" else f"v{intent.version}")
            mlflow_client.update_run(intent.run_id, name=f"gate · {what_run} interrupted")
            mlflow_client.set_terminated(intent.run_id, "KILLED")
            line += f"; run {intent.run_id} marked KILLED"
    return line


def _mend(mlflow_client, name: str, replaced: str | None) -> list[str]:
    """Make the stages and aliases agree with alias `champion`. `replaced`: the version the champion
    replaced, when known from an intent (else from the champion's REPLACED_TAG)."""
    notes = []
    productions = registry.production_versions(mlflow_client, name)
    champion = registry.version_with_alias(mlflow_client, name, registry.STAGE_ALIASES["Production"])
    if champion is None:
        if not productions:
            return notes
        champion = productions[-1]
        mlflow_client.set_registered_model_alias(name, registry.STAGE_ALIASES["Production"], champion.version)
        notes.append(f"no version had alias champion: set on v{champion.version}, the newest Production version")
    version = str(champion.version)
    if champion.current_stage != "Production":
        with registry.stages_api():
            mlflow_client.transition_model_version_stage(name, version, "Production",
                                                         archive_existing_versions=False)
        notes.append(f"alias champion was on v{version} in stage {champion.current_stage}: v{version} made Production")
    for other in productions:
        if str(other.version) != version:
            with registry.stages_api():
                mlflow_client.transition_model_version_stage(name, str(other.version), "Archived")
            notes.append(f"v{other.version} was in stage Production beside the champion v{version}: archived")
    challenger = registry.version_with_alias(mlflow_client, name, registry.STAGE_ALIASES["Staging"])
    if challenger is not None and str(challenger.version) == version:
        mlflow_client.delete_registered_model_alias(name, registry.STAGE_ALIASES["Staging"])
        notes.append(f"alias challenger was on the champion v{version}: removed")
    expected = replaced or (champion.tags or {}).get(REPLACED_TAG)
    previous = registry.version_with_alias(mlflow_client, name, registry.PREVIOUS_ALIAS)
    held = None if previous is None else str(previous.version)
    if expected and expected != version and held != expected:
        mlflow_client.set_registered_model_alias(name, registry.PREVIOUS_ALIAS, expected)
        notes.append(f"alias previous was on {f'v{held}' if held else 'no version'}: moved to v{expected}, "
                     f"the version v{version} replaced")
    elif held == version:
        mlflow_client.delete_registered_model_alias(name, registry.PREVIOUS_ALIAS)
        notes.append(f"alias previous was on the champion v{version} itself: removed")
    return notes


def _complete(mlflow_client, name: str, intent: Intent, reference_path: Path) -> list[str]:
    """The steps after the commit point that an interrupted gate may have missed: the version's
    promotion tags, and the drift reference."""
    notes = []
    tags = mlflow_client.get_model_version(name, intent.version).tags or {}
    if tags.get("promotion_run_id") != (intent.run_id or ""):
        completed = {PROMOTED_AT_TAG: repr(intent.started_at), "promotion_run_id": intent.run_id or "",
                     "promotion_action": intent.action,
                     "promotion_reasons": f"completed by a repair after run {intent.run_id} was interrupted"}
        if intent.replaced:
            completed[REPLACED_TAG] = intent.replaced
        for key, value in completed.items():
            mlflow_client.set_model_version_tag(name, intent.version, key, value)
        notes.append(f"v{intent.version} tagged as promoted by run {intent.run_id}")
    try:
        meta = read_reference_metadata(reference_path)
    except ReferenceError:
        meta = None
    if meta is None or meta.get("model_name") != name or str(meta.get("model_version")) != intent.version:
        try:
            bundle = load_bundle(mlflow_client, name, intent.version)
            commit_reference_file(stage_refresh(mlflow_client, bundle, reference_path), reference_path)
            notes.append(f"drift reference refreshed for v{intent.version}: {reference_path}")
        except (ModelLoadError, ReferenceError, OSError) as exc:
            notes.append(f"drift reference not refreshed for v{intent.version}: {first_line(exc)}")
    return notes


def _record(mlflow_client, notes: list[str], uri: str | None) -> None:
    run_id = start_run(mlflow_client, registry.PROMOTION_EXPERIMENT, "gate · repair", {"action": "repair"}, uri)
    log(mlflow_client, run_id, tags={"decision": "repaired", "repairs": "\n".join(notes)})
    mlflow_client.set_terminated(run_id, "FINISHED")
    notes.append(f"recorded in MLflow run {run_id} (experiment {registry.PROMOTION_EXPERIMENT})")
