"""`make model` (`python -m monitoring.bootstrap`): make sure the registry has a Production model to
serve, building the first one if not.

Idempotent: with a Production version (or MODEL_URI set) it does nothing. Otherwise it promotes the
newest Staging candidate, training one first when there is none, through the same promotion gate
CI uses, so even the first model has to pass the gate's absolute quality floor. It lives beside the
gate it drives: monitoring uses training, never the other way round.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from common import registry, settings
from monitoring.gate import GateError, GateParams, GateUsageError, promote
from training.train import TrainingError, TrainParams, train


def bootstrap() -> int:
    """Ensure a Production version exists. Returns a process exit code (0 when one exists)."""
    if settings.model_uri():
        print(f"MODEL_URI={settings.model_uri()} is set: the service serves that, nothing to bootstrap")
        return 0
    uri = registry.configure_tracking()
    mlflow_client = registry.client(uri)
    name = settings.model_name()
    production = registry.production_version(mlflow_client, name)
    if production is not None:
        print(f"{name} v{production.version} is in Production ({uri})")
        return 0
    candidate = registry.version_in_stage(mlflow_client, name, "Staging")
    if candidate is None:
        print(f"no version of {name} yet: training the first model on {settings.reference_db_url()}")
        try:
            candidate_version = train(TrainParams(), progress=print).version
        except TrainingError as exc:
            print(f"bootstrap: training refused: {exc}", file=sys.stderr)
            return 2
    else:
        candidate_version = candidate.version
        print(f"promoting the Staging candidate {name} v{candidate_version}")
    with tempfile.TemporaryDirectory() as scratch:
        try:
            decision = promote(GateParams(version=candidate_version, reason="manual", output_dir=Path(scratch)))
        except (GateError, GateUsageError) as exc:
            print(f"bootstrap: the promotion gate could not run: {exc}", file=sys.stderr)
            return 2
    if not decision.passed:
        print(f"bootstrap: the gate refused {name} v{candidate_version}:", file=sys.stderr)
        for reason in decision.reasons:
            print(f"  - {reason}", file=sys.stderr)
        return 1
    print(f"{name} v{candidate_version} promoted to Production (alias champion)")
    return 0


if __name__ == "__main__":
    sys.exit(bootstrap())
