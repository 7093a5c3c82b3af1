"""Evaluation shared by training and the promotion gate: metrics with stable names, and the threshold.

Every metric a run logs comes from `evaluate_scores`, so two models compared by the promotion gate
are measured by exactly the code that measured them at training time. The names are stable: the
MLflow UI compares runs by them, and the registry tags carry them.

Decision rule: probability >= threshold is fraud (`common.model.is_fraud`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.metrics import (
    average_precision_score,
    brier_score_loss,
    log_loss,
    precision_recall_curve,
    roc_auc_score,
)

from common.model import is_fraud

# Recall at this precision is logged as `recall_at_precision_90`.
TARGET_PRECISION = 0.9
THRESHOLD_METHODS = ("f1", "cost")
# Default for threshold_method="cost": a missed fraud costs as much as this many false alarms
# (a chargeback of a typical fraud amount against a few minutes of an analyst's review).
DEFAULT_COST_RATIO = 20.0

# The metrics `evaluate_scores` returns, in a stable order.
METRIC_NAMES = (
    "average_precision", "roc_auc", "precision", "recall", "f1", "tp", "fp", "tn", "fn",
    "recall_at_precision_90", "brier_score", "log_loss", "rows", "frauds", "fraud_rate",
)


@dataclass(frozen=True)
class ThresholdChoice:
    threshold: float
    method: str
    cost_ratio: float | None
    rows: int
    frauds: int
    description: str


def evaluate_scores(y_true: np.ndarray, p: np.ndarray, threshold: float) -> dict[str, float]:
    """Metrics of fraud probabilities `p` against true labels, at a decision threshold.

    Ranking metrics (`average_precision` = PR-AUC, `roc_auc`, `recall_at_precision_90`) do not
    depend on the threshold; `precision`, `recall`, `f1` and the confusion counts do. Undefined
    values (e.g. ROC AUC with one class present) are NaN rather than an exception.

    Args:
        y_true: labels 0/1, shape (n,).
        p: fraud probabilities in [0, 1], shape (n,).
        threshold: decision threshold; p >= threshold is fraud.

    Returns:
        A dict with exactly the keys of METRIC_NAMES.

    Raises:
        ValueError: shapes differ, labels are not 0/1, or probabilities are outside [0, 1].
    """
    y = np.asarray(y_true).astype(np.int64).ravel()
    p = np.asarray(p, dtype=np.float64).ravel()
    if y.shape != p.shape:
        raise ValueError(f"{len(y)} labels but {len(p)} probabilities")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("labels must be 0 or 1")
    if len(p) and (not np.isfinite(p).all() or p.min() < 0.0 or p.max() > 1.0):
        raise ValueError("probabilities must be finite and within [0, 1]")
    predicted = is_fraud(p, threshold)
    tp = int(np.sum(predicted & (y == 1)))
    fp = int(np.sum(predicted & (y == 0)))
    fn = int(np.sum(~predicted & (y == 1)))
    tn = int(np.sum(~predicted & (y == 0)))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    both_classes = 0 < y.sum() < len(y)
    return {
        "average_precision": float(average_precision_score(y, p)) if both_classes else float("nan"),
        "roc_auc": float(roc_auc_score(y, p)) if both_classes else float("nan"),
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
        "recall_at_precision_90": recall_at_precision(y, p, TARGET_PRECISION) if both_classes else float("nan"),
        "brier_score": float(brier_score_loss(y, p, pos_label=1)) if len(y) else float("nan"),
        "log_loss": float(log_loss(y, np.clip(p, 1e-15, 1 - 1e-15), labels=[0, 1])) if len(y) else float("nan"),
        "rows": len(y),
        "frauds": int(y.sum()),
        "fraud_rate": float(y.mean()) if len(y) else float("nan"),
    }


def recall_at_precision(y_true: np.ndarray, p: np.ndarray, min_precision: float) -> float:
    """The highest recall any threshold reaches while precision stays >= min_precision (0 if none)."""
    precision, recall, _ = precision_recall_curve(y_true, p)
    reachable = recall[precision >= min_precision]
    return float(reachable.max()) if reachable.size else 0.0


def choose_threshold(y_true: np.ndarray, p: np.ndarray, method: str = "f1",
                     cost_ratio: float = DEFAULT_COST_RATIO) -> ThresholdChoice:
    """Pick the decision threshold on scores the trees were not fitted on (e.g. out-of-bag).

    Methods:
        f1: the threshold with the highest F1 (ties: the highest threshold).
        cost: the threshold with the lowest expected cost, `cost_ratio` x missed frauds + false
            alarms (ties: the highest threshold).

    Rows whose score is NaN (never out of bag) are ignored.

    Raises:
        ValueError: unknown method, a cost ratio <= 0, or no fraud among the usable rows.
    """
    if method not in THRESHOLD_METHODS:
        raise ValueError(f"threshold_method must be one of {THRESHOLD_METHODS}, got {method!r}")
    if not cost_ratio > 0:
        raise ValueError(f"cost_ratio must be above 0, got {cost_ratio}")
    y = np.asarray(y_true).astype(np.int64).ravel()
    p = np.asarray(p, dtype=np.float64).ravel()
    usable = np.isfinite(p)
    y, p = y[usable], p[usable]
    frauds = int(y.sum())
    if frauds == 0:
        raise ValueError("cannot choose a threshold: no fraud among the scored rows")
    # Candidate thresholds are the distinct scores: at threshold t, every row with p >= t is fraud.
    order = np.argsort(-p, kind="stable")
    p_sorted, y_sorted = p[order], y[order]
    tp = np.cumsum(y_sorted)
    fp = np.cumsum(1 - y_sorted)
    last_of_value = np.r_[p_sorted[1:] != p_sorted[:-1], True]
    tp, fp, candidates = tp[last_of_value], fp[last_of_value], p_sorted[last_of_value]
    fn = frauds - tp
    if method == "f1":
        objective = 2 * tp / (2 * tp + fp + fn)  # F1 without dividing by zero: tp + fn = frauds > 0
        best = int(np.argmax(objective))  # first maximum = highest threshold
        description = f"max F1 ({objective[best]:.4f}) on {len(y)} out-of-bag scores"
        ratio = None
    else:
        objective = -(cost_ratio * fn + fp)
        best = int(np.argmax(objective))
        description = (f"min expected cost ({-objective[best]:.0f} = {cost_ratio:g} x missed frauds + "
                       f"false alarms) on {len(y)} out-of-bag scores")
        ratio = float(cost_ratio)
        # Flagging (almost) nothing can be cheapest: then only p = 1 is fraud.
        if cost_ratio * frauds <= -objective[best]:
            return ThresholdChoice(1.0, method, ratio, len(y), frauds, description + "; flagging nothing is cheaper")
    return ThresholdChoice(float(candidates[best]), method, ratio, len(y), frauds, description)
