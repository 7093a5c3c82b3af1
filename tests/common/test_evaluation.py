"""The evaluation training and the promotion gate share: metric names the MLflow UI compares runs by."""

from __future__ import annotations

import numpy as np

from common.evaluation import METRIC_NAMES, evaluate_scores


def test_metric_names_are_stable():
    metrics = evaluate_scores(np.array([0, 0, 1, 1]), np.array([0.1, 0.6, 0.4, 0.9]), 0.5)
    assert tuple(metrics) == METRIC_NAMES
