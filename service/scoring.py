"""The pure core of the service: a loaded model and rows in, probabilities and decisions out."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from common.model import ModelBundle, is_fraud


@dataclass(frozen=True)
class ServingModel:
    """What a worker serves: one registered version and the threshold it decides with.

    Immutable, so a worker swaps models by assigning one reference, and a request that read the
    reference once scores, decides and reports with one consistent version and threshold.
    """

    bundle: ModelBundle
    threshold: float
    threshold_source: str  # "model" or "FRAUD_THRESHOLD"
    loaded_at: float

    @property
    def name(self) -> str:
        return self.bundle.name

    @property
    def version(self) -> str:
        return self.bundle.version


@dataclass(frozen=True)
class Predictions:
    """One request's scores. For a single row the sequences are lists of one Python float and one
    bool; for more rows they are numpy arrays. Both index, iterate and serialise alike."""

    probabilities: Sequence[float]  # (n,) in [0, 1]: float64 array, or [float] for one row
    is_fraud: Sequence[bool]  # (n,) probability >= threshold: bool array, or [bool] for one row
    threshold: float
    model_name: str
    model_version: str

    def __len__(self) -> int:
        return len(self.probabilities)


def score(rows: np.ndarray, model: ServingModel) -> Predictions:
    """Score (n, 29) rows in FEATURES order with `model` and decide at its threshold.

    Raises:
        ValueError: rows is not an (n, 29) array.
    """
    if len(rows) == 1:  # single row: Python scalars from here on (docs/decisions/007-single-row-fast-path.md)
        p = model.bundle.predict_one(rows)
        decision = p >= model.threshold  # common.model.is_fraud's rule, on a float
        return Predictions([p], [decision], model.threshold, model.name, model.version)
    # Contiguous: the scikit-learn flavor returns a column view of predict_proba's (n, 2) array,
    # which orjson refuses to serialise (every /predict of 2+ rows would answer 500).
    probabilities = np.ascontiguousarray(model.bundle.predict_proba(rows), dtype=np.float64)
    return Predictions(probabilities, is_fraud(probabilities, model.threshold), model.threshold,
                       model.name, model.version)


def disagreements(champion: Predictions, challenger: Predictions) -> int:
    """Rows on which two models' decisions differ, each decided at its own threshold."""
    if len(champion) == 1:
        return int(champion.is_fraud[0] != challenger.is_fraud[0])
    return int(np.count_nonzero(np.asarray(champion.is_fraud) != np.asarray(challenger.is_fraud)))
