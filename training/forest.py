"""The forest: TrainParams to a RandomForestClassifier, the fit, and the out-of-bag scores the
decision threshold is chosen on.

Each training row's out-of-bag score comes only from the trees whose bootstrap sample left it
out, so no row used to fit a tree chooses its own threshold, and the evaluation rows stay
untouched until the final measurement.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd
from sklearn.ensemble import RandomForestClassifier

from training.params import TrainParams, parse_max_features


@dataclass(frozen=True)
class FittedForest:
    """A fitted forest and its out-of-bag fraud probability per training row (NaN: never out of bag)."""

    model: RandomForestClassifier
    oob_proba: np.ndarray
    seconds: float  # the fit, out-of-bag scoring included

    @property
    def oob_scored(self) -> np.ndarray:
        """Which training rows have an out-of-bag score."""
        return np.isfinite(self.oob_proba)


def forest_kwargs(params: TrainParams) -> dict:
    """RandomForestClassifier arguments for the parameters: the forest a bare fit would grow.

    Bootstrap is on, as the out-of-bag scores need it; `fit_forest` adds the out-of-bag scoring.
    """
    return {
        "n_estimators": params.n_estimators,
        "max_depth": params.max_depth or None,
        "min_samples_leaf": params.min_samples_leaf,
        "max_features": parse_max_features(params.max_features),
        "class_weight": None if params.class_weight == "none" else params.class_weight,
        "bootstrap": True,
        "max_samples": None if params.max_samples >= 1.0 else params.max_samples,
        "random_state": params.seed,
        "n_jobs": params.n_jobs,
    }


def fit_forest(X: pd.DataFrame, y: np.ndarray, params: TrainParams, say: Callable[[str], None], *,
               sample_weight: np.ndarray | None = None) -> FittedForest:
    """Grow the forest in one `fit`, tree by tree with scikit-learn's own progress lines, scoring
    each training row out of bag (`oob_score=True`). `sample_weight` goes to `fit` as it is.

    One `fit` rather than warm-start chunks: chunk boundaries leave a core idle while the chunk's
    last tree finishes, which cost about 2 s of a full-size fit here.

    The returned model is the forest to log and serve: quiet (`verbose=0`), and without the
    out-of-bag attributes, which would add a score per training row to the logged model.
    """
    # verbose=2: "building tree i of n" per tree, and joblib's elapsed-time lines on stderr.
    model = RandomForestClassifier(**forest_kwargs(params), oob_score=True, verbose=2)
    started = time.perf_counter()
    with warnings.catch_warnings():
        # With few trees some rows are in every tree's bootstrap sample: scikit-learn warns and gives
        # them no score, which `out_of_bag_proba` turns into NaN and the threshold ignores. Only that
        # warning, only during this fit. (catch_warnings swaps the process-wide filter list, so no other
        # thread may enter or leave such a block meanwhile: training imports before it fits, see
        # training/registration.py import_logging_modules.)
        warnings.filterwarnings("ignore", message="Some inputs do not have OOB scores", category=UserWarning,
                                module=r"sklearn\.")
        model.fit(X, y, sample_weight=sample_weight)
    oob = out_of_bag_proba(model)
    del model.oob_decision_function_, model.oob_score_
    model.set_params(oob_score=False, verbose=0)  # or every predict_proba of the served model would print
    seconds = time.perf_counter() - started
    say(f"fitted {len(model.estimators_)} trees in {seconds:.1f}s; {int(np.isfinite(oob).sum())} of {len(oob)} "
        "training rows scored out of bag")
    return FittedForest(model, oob, seconds)


def out_of_bag_proba(model: RandomForestClassifier) -> np.ndarray:
    """Each training row's fraud probability, averaged over the trees that did not see it.

    Args:
        model: a forest fitted with `oob_score=True`.

    Returns:
        scikit-learn's `oob_decision_function_` for class 1, NaN for the rows that were in every
        tree's bootstrap sample (scikit-learn gives those 0 for every class, where a scored row's
        class probabilities sum to 1).
    """
    votes = model.oob_decision_function_
    fraud = list(model.classes_).index(1)
    return np.where(votes.sum(axis=1) > 0, votes[:, fraud], np.nan)
