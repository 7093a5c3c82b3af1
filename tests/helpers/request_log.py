"""Request logs written as the service writes them, for drift and training tests."""

from __future__ import annotations

import time

import numpy as np
import pandas as pd

from common.schema import FEATURES
from common.store import RequestStore


def write_requests(location: str, frame: pd.DataFrame, *, scores: np.ndarray | None = None,
                   model_version: str | np.ndarray = "1", ts: np.ndarray | None = None, prefix: str = "r") -> None:
    """Append rows to a request log as the service logs them (features, score, version, ts)."""
    n = len(frame)
    scores = np.random.default_rng(n).beta(0.5, 30, n) if scores is None else scores
    ts = time.time() - n + np.arange(n) if ts is None else ts
    out = frame[list(FEATURES)].copy()
    out.insert(0, "request_id", [f"{prefix}-{i}" for i in range(n)])
    out.insert(1, "ts", ts)
    out["score"] = scores
    out["decision"] = (scores >= 0.5).astype(int)
    out["threshold"] = 0.5
    out["model_name"] = "fraud-detector"
    out["model_version"] = model_version
    store = RequestStore(location)
    try:
        store.insert_frame(out)
    finally:
        store.dispose()
