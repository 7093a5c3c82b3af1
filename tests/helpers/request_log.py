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


def serve_month(location: str, bundle, scenario, month: int, scaler, *, shadow=None,
                prefix: str | None = None) -> pd.DataFrame:
    """Score a scenario's month with a loaded model (and a challenger in the shadow) and log it as the
    service does, each row at its transaction time. Returns the month's rows with their `request_id`."""
    from training import scenarios

    frame = scenarios.month_frame(scenario, month)
    inputs = scenarios.model_inputs(frame, scaler)[list(FEATURES)]
    scores = bundle.predict_proba(inputs.to_numpy())
    out = inputs.copy()
    out.insert(0, "request_id", [f"{prefix or scenario.name}-{month}-{i}" for i in range(len(frame))])
    out.insert(1, "ts", frame["ts"].to_numpy())
    out["score"] = scores
    out["decision"] = (scores >= bundle.threshold).astype(int)
    out["threshold"] = bundle.threshold
    out["model_name"] = bundle.name
    out["model_version"] = bundle.version
    if shadow is not None:
        shadow_scores = shadow.predict_proba(inputs.to_numpy())
        out["shadow_score"] = shadow_scores
        out["shadow_decision"] = (shadow_scores >= shadow.threshold).astype(int)
        out["shadow_version"] = shadow.version
    store = RequestStore(location)
    try:
        store.insert_frame(out)
    finally:
        store.dispose()
    return frame.assign(request_id=out["request_id"].to_numpy())


def deliver_chargebacks(location: str, scenario, months: dict[int, pd.DataFrame], clock: float) -> int:
    """Post, as feedback, the fraud labels of `months` ({month: serve_month's rows}) that the scenario's
    chargeback feed has reported by `clock`; legitimate rows get no label (they mature). Returns how many."""
    from training import scenarios

    labels = {}
    for month, frame in months.items():
        feed = scenarios.labels(scenario, frame, month)
        due = (feed["label"].to_numpy() == 1) & (feed["known_at"].to_numpy() <= clock)
        labels.update(dict.fromkeys(frame["request_id"].to_numpy()[due], 1))
    if labels:
        store = RequestStore(location)
        try:
            store.record_feedback(labels)
        finally:
            store.dispose()
    return len(labels)
