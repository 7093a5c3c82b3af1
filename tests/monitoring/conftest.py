"""Fixtures for monitoring: reference databases and request logs built from the drift simulator."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from common.features import AmountScaler, save_feature_config
from common.schema import FEATURES, LABEL
from common.store import RequestStore
from tests.helpers.builders import MlflowStore, new_mlflow_store
from training import scenarios
from training.generate import generate_frame

REFERENCE_ROWS = 4_000


@dataclass(frozen=True)
class DriftWorld:
    """A reference database and a feature config for drift checks (no model involved)."""

    root: Path
    reference_db: Path
    feature_config: Path
    scaler: AmountScaler

    def env(self) -> dict[str, str]:
        return {"REFERENCE_DB": str(self.reference_db), "FEATURE_CONFIG": str(self.feature_config)}

    def batch(self, rows: int, month: int, seed: int) -> pd.DataFrame:
        """`rows` of month `month` of a covariate drift large enough for the drift check's effect-size
        floor from month 3 ($400 and 2 sd on V1..V5, reached over three months); month 0 is the
        reference's distribution."""
        return scenarios.inputs(scenarios.named("covariate", seed=seed, amount_shift=400.0, v_shift=2.0), month,
                                self.scaler, rows)




@pytest.fixture(scope="session")
def drift_world(tmp_path_factory) -> DriftWorld:
    root = tmp_path_factory.mktemp("drift-world")
    raw = generate_frame(REFERENCE_ROWS, seed=11)
    scaler = AmountScaler.fit(raw["Amount"].to_numpy(), fitted_on="tests")
    config = save_feature_config(scaler, root / "feature_config.json")
    reference = scenarios.inputs(scenarios.named("stable", seed=11), 0, scaler, REFERENCE_ROWS)
    frame = reference[[*FEATURES, LABEL]].copy()
    frame.insert(0, "request_id", [f"ref-{i}" for i in range(len(frame))])
    frame.insert(1, "ts", np.arange(len(frame), dtype=float))
    store = RequestStore(str(root / "reference.db"))
    try:
        store.insert_frame(frame)
    finally:
        store.dispose()
    return DriftWorld(root, root / "reference.db", config, scaler)


@pytest.fixture(scope="session")
def drift_store(tmp_path_factory) -> MlflowStore:
    """One MLflow store for the drift-stage tests (without models); each test finds its own run by id."""
    return new_mlflow_store(tmp_path_factory.mktemp("drift-mlflow"))


@pytest.fixture
def drift_env(tmp_path, drift_world, drift_store, use_env, monkeypatch) -> dict:
    """Apply the shared MLflow store, the reference DB and a request log path under tmp_path."""
    env = {**drift_store.env(), **drift_world.env(), "LATEST_DB": str(tmp_path / "requests.db"),
           "DRIFT_REFERENCE": str(tmp_path / "drift_reference.parquet")}
    use_env(env)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    return {**env, "store": drift_store, "log": str(tmp_path / "requests.db"), "out": tmp_path / "out"}
