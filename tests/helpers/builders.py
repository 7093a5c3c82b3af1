"""Builders of the real things tests need, cheaply: MLflow stores, reference data, tiny trained models.

Fixtures in tests/conftest.py call these; a test that needs one more of them (a second registry, a
model with other parameters) calls them directly.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

import pytest

TINY_ROWS = 3_000
TINY_FRAUD_RATE = 0.02
TINY_TREES = 15
TEST_MODEL_NAME = "fraud-detector"


@dataclass(frozen=True)
class MlflowStore:
    root: Path
    tracking_uri: str
    artifact_root: Path

    def env(self) -> dict[str, str]:
        return {"MLFLOW_TRACKING_URI": self.tracking_uri, "MLFLOW_ARTIFACT_ROOT": str(self.artifact_root)}

    def client(self):
        from common.registry import client

        return client(self.tracking_uri)

    def copy(self, dest: Path) -> MlflowStore:
        """A private copy of the registry database; artifacts are shared by path (read-only)."""
        dest.mkdir(parents=True, exist_ok=True)
        source = sqlite3.connect(self.tracking_uri.removeprefix("sqlite:///"))
        target = sqlite3.connect(dest / "mlflow.db")
        with target:
            source.backup(target)
        source.close()
        target.close()
        return MlflowStore(dest, f"sqlite:///{dest / 'mlflow.db'}", self.artifact_root)


@dataclass(frozen=True)
class ReferenceData:
    root: Path
    csv: Path
    db: Path
    feature_config: Path
    rows: int
    frauds: int

    def env(self) -> dict[str, str]:
        return {"REFERENCE_DB": str(self.db), "FEATURE_CONFIG": str(self.feature_config)}


@dataclass(frozen=True)
class TrainedModel:
    store: MlflowStore
    data: ReferenceData
    name: str
    version: str
    run_id: str
    threshold: float
    result: object = field(repr=False)

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"

    def env(self) -> dict[str, str]:
        return {**self.store.env(), **self.data.env(), "MODEL_NAME": self.name}


def new_mlflow_store(root: Path) -> MlflowStore:
    root.mkdir(parents=True, exist_ok=True)
    return MlflowStore(root, f"sqlite:///{root / 'mlflow.db'}", root / "mlruns")


def build_reference_data(root: Path, rows: int = TINY_ROWS, fraud_rate: float = TINY_FRAUD_RATE,
                         seed: int = 7) -> ReferenceData:
    """Generate a CSV and import it with the project's importer into a fresh reference DB."""
    from training.generate import generate
    from training.import_csv import import_csv

    root.mkdir(parents=True, exist_ok=True)
    csv, db, config = root / "creditcard.csv", root / "reference_data.db", root / "feature_config.json"
    generated = generate(rows=rows, seed=seed, out=csv, fraud_rate=fraud_rate)
    import_csv(csv, str(db), config)
    return ReferenceData(root, csv, db, config, generated.rows, generated.frauds)


def train_model(store: MlflowStore, data: ReferenceData, *, extra_env: dict[str, str] | None = None,
                **overrides) -> TrainedModel:
    """Train and register a tiny model with `training.train.train`; env set only during the call.

    `requests` defaults to "none" (LATEST_DB is ignored) unless given.
    """
    from training.train import TrainParams, train

    fields = {"data": str(data.db), "requests": "none", "n_estimators": TINY_TREES, "model_name": TEST_MODEL_NAME,
              "min_train_frauds": 10, "min_eval_frauds": 5, "n_jobs": 1, **overrides}
    env = {**store.env(), **data.env(), **(extra_env or {})}
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        mp.delenv("MLFLOW_RUN_ID", raising=False)
        result = train(TrainParams(**fields), progress=lambda _line: None)
    return TrainedModel(store, data, result.model_name, result.version, result.run_id, result.threshold, result)



def record_as_gate(mlflow_client, name: str, version: str | int) -> str:
    """Write on a version the record the promotion gate writes before it promotes one, through the
    gate's own `monitoring.promotion.record_gate`: the digests of the files `load_bundle` downloads,
    under a run in experiment `promotions`. Replicas then serve the version once it is champion.

    Returns:
        The run id the record names.
    """
    from common import registry
    from common.model import load_bundle
    from monitoring.promotion import record_gate
    from monitoring.runs import start_run

    bundle = load_bundle(mlflow_client, name, version)
    run_id = start_run(mlflow_client, registry.PROMOTION_EXPERIMENT, f"test · v{version} recorded by hand",
                       {"action": "promote"}, mlflow_client.tracking_uri)
    mlflow_client.set_terminated(run_id, "FINISHED")
    record_gate(mlflow_client, name, version, run_id, bundle.digests)
    return run_id


def promote_by_hand(mlflow_client, name: str, version: str | int) -> str:
    """Move a version to Production without the gate's checks, but with its record (`record_as_gate`),
    for tests about something else than who promotes. A test of an ungated version calls
    `common.registry.move_to_stage` alone.

    Returns:
        The run id the record names.
    """
    from common import registry

    run_id = record_as_gate(mlflow_client, name, version)
    registry.move_to_stage(mlflow_client, name, version, "Production")
    return run_id
