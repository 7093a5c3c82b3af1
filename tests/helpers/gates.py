"""The promotion gate as its own process, over a private copy of the serving registry: gates started
together, gates killed in the middle of a promotion, and what the registry says afterwards.

`GateWorld` is a copy of the serving registry (v1 Production, v2 Staging), its environment for a gate
and the gate's files. `start_gate` starts one gate process; `GateWorld.killed_gate` runs one that
kills itself with SIGKILL after a step (monitoring.promotion's GATE_TEST_CRASH_AFTER hook).
tests/monitoring (the lock, the crash repairs) and tests/reliability (the same under load, for
rounds) both drive the gate through these.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from common import registry
from common.paths import REPO_ROOT
from monitoring import promotion
from tests.helpers.builders import MlflowStore
from tests.helpers.processes import Server, clean_env, run, start
from tests.helpers.service import ServingRegistry

# Wide margins: two tiny forests of different seeds differ by more than the shipped ones, and these
# tests are about who promotes and what a crash leaves, not about quality.
GENEROUS = {"max_average_precision_drop": 1.0, "max_recall_drop": 1.0, "floor_average_precision": 0.0,
            "floor_recall": 0.0}
GATE = [sys.executable, "-m", "monitoring.gate"]


def start_gate(name: str, env: dict[str, str], out: Path, *args: str, reference_file: Path | None = None) -> Server:
    """Start `python -m monitoring.gate *args` writing its result to `out` (its log: `<out>/<name>.log`);
    its drift reference is `reference_file`, by default one of its own in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    reference = reference_file or out / "drift_reference.parquet"
    return start(name, [*GATE, "--output-dir", str(out), "--reference-file", str(reference), *args],
                 env=env, cwd=REPO_ROOT, log_dir=out)


def wait_for_output(server: Server, text: str, timeout: float = 120) -> None:
    """Wait until a running gate has said `text`; AssertionError with its output if it exits first."""
    deadline = time.monotonic() + timeout
    while text not in server.output():
        if server.process.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"{server.name} never said {text!r}:\n{server.output()}")
        time.sleep(0.1)


@dataclass(frozen=True)
class GateWorld:
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

    def apply(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Set this world's environment for a gate run in the test's own process (`gate.main`)."""
        for key, value in self.env.items():
            monkeypatch.setenv(key, value)
        monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
        monkeypatch.delenv(promotion.CRASH_AFTER_VARIABLE, raising=False)

    def gate_args(self, *args: str, out: str = "out") -> list[str]:
        return [*args, "--reference-file", str(self.reference_file), "--output-dir", str(self.root / out)]

    def stages(self) -> dict[str, str]:
        with registry.stages_api():
            return {str(v.version): v.current_stage for v in self.client.search_model_versions(f"name = '{self.name}'")}

    def production(self) -> list[str]:
        """The versions in stage Production, oldest first."""
        return [str(v.version) for v in registry.production_versions(self.client, self.name)]

    def alias(self, alias: str) -> str | None:
        holder = registry.version_with_alias(self.client, self.name, alias)
        return None if holder is None else str(holder.version)

    def intent(self) -> dict | None:
        raw = self.client.get_registered_model(self.name).tags.get(promotion.INTENT_TAG)
        return None if raw is None else json.loads(raw)

    def served(self) -> str:
        """The version a service's watcher loads from this registry now."""
        from service.metrics import Metrics
        from service.watcher import ModelWatcher

        watcher = ModelWatcher(Metrics(), tracking_uri=lambda: self.store.tracking_uri, model_name=self.name)
        watcher.check()
        assert watcher.current is not None, watcher.status()
        return watcher.current.version

    def repair_runs(self) -> list:
        experiment = self.client.get_experiment_by_name(registry.PROMOTION_EXPERIMENT)
        return self.client.search_runs([experiment.experiment_id], "tags.decision = 'repaired'")

    def killed_gate(self, step: str, *args: str) -> str:
        """Run the gate in a process of its own that kills itself with SIGKILL after `step`; return
        the id of the gate run it left behind (its intent's)."""
        result = run([*GATE, *self.gate_args(*args)], cwd=REPO_ROOT, expect=-9,
                     env=clean_env(**self.env, **{promotion.CRASH_AFTER_VARIABLE: step}), timeout=300)
        assert "gate:" not in result.stdout  # it never got to print its decision
        intent = self.intent()
        assert intent is not None and intent["run_id"], f"the gate killed after {step!r} left no intent"
        return intent["run_id"]


def gate_world(serving: ServingRegistry, root: Path, request_log: str | None = None) -> GateWorld:
    """A copy of `serving`'s registry under `root`, a config with GENEROUS margins, and the gate's
    environment; the request log (the gate lock's home) is `request_log`, by default a SQLite file
    under `root`."""
    store = serving.copy(root / "registry")
    config = root / "promotion.json"
    config.write_text(json.dumps(GENEROUS))
    env = {**store.env(), **serving.data.env(), "MODEL_NAME": serving.name,
           "LATEST_DB": request_log or str(root / "requests.db"), "PROMOTION_CONFIG": str(config)}
    return GateWorld(store, serving.name, env, root)
