"""The training step's parameters, their validation, and the errors the step raises.

The field names are those of the MLproject `train` entry point and of the CLI (`training.train`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from common import evaluation, registry

SPLITS = ("arrival", "time", "stratified")
THRESHOLD_ROWS = ("recent", "all")
CLASS_WEIGHTS = ("none", "balanced", "balanced_subsample")


class TrainingError(RuntimeError):
    """Training could not run: a data source is missing or the parameters are invalid."""


class TrainingRefused(TrainingError):
    """The labelled data cannot support an honest model; nothing was registered."""


@dataclass(frozen=True)
class TrainParams:
    """Training parameters; the names are those of the MLproject `train` entry point and the CLI.

    `data`/`requests` are SQLite paths or SQLAlchemy URLs. `data=""` means REFERENCE_DB;
    `requests=""` means LATEST_DB when it exists and `requests="none"` uses no request log.
    `max_depth=0` means unlimited. `model_name=""` means MODEL_NAME.
    """

    data: str = ""
    requests: str = ""
    n_estimators: int = 100
    max_depth: int = 0
    min_samples_leaf: int = 1
    max_features: str = "sqrt"
    # Each tree's bootstrap sample holds half the training rows: on the generated data the forest
    # ranks as well as with full-size samples, in a little over half the fitting time.
    max_samples: float = 0.5
    # Each tree weighs the classes equally in its own bootstrap sample: a few labels of a new fraud pattern
    # count, and the trees stay small (docs/decisions/022-balanced-class-weights.md).
    class_weight: str = "balanced_subsample"
    test_fraction: float = 0.2
    # arrival: evaluate on labels that arrived after the served model was trained (half of them; the
    # other half trains), else on the newest rows; see training/data.py `split_rows`.
    split: str = "arrival"
    seed: int = 0
    model_name: str = ""
    experiment: str = registry.TRAINING_EXPERIMENT
    # cost: the threshold that costs least when a missed fraud costs `cost_ratio` false alarms. F1 weighs
    # the two alike and, chosen on a few recent frauds, swings widely from one forest to the next
    # (docs/decisions/036-a-cost-threshold-and-recent-weights-off.md).
    threshold_method: str = "cost"
    cost_ratio: float = evaluation.DEFAULT_COST_RATIO
    # recent: the threshold is chosen on the out-of-bag scores of the training rows whose labels arrived
    # since the served model was trained, when they hold `min_threshold_frauds` frauds, else on every
    # training row (docs/decisions/023-threshold-on-recent-labels.md).
    threshold_rows: str = "recent"
    min_threshold_frauds: int = 20
    # Each training row whose label arrived since the served model was trained weighs this much in the fit (the
    # others 1). Off by default (docs/decisions/036-a-cost-threshold-and-recent-weights-off.md).
    recent_weight: float = 1.0
    min_train_frauds: int = 20
    min_eval_frauds: int = 10
    n_jobs: int = -1

    def validate(self) -> None:
        """Raises TrainingError naming the first invalid parameter."""
        checks = [
            (self.n_estimators >= 1, f"n_estimators must be at least 1, got {self.n_estimators}"),
            (self.max_depth >= 0, f"max_depth must be 0 (unlimited) or more, got {self.max_depth}"),
            (self.min_samples_leaf >= 1, f"min_samples_leaf must be at least 1, got {self.min_samples_leaf}"),
            (0.0 < self.max_samples <= 1.0, f"max_samples must be within (0, 1], got {self.max_samples}"),
            (self.class_weight in CLASS_WEIGHTS, f"class_weight must be one of {CLASS_WEIGHTS}, got "
                                                 f"{self.class_weight!r}"),
            (0.0 < self.test_fraction < 1.0, f"test_fraction must be within (0, 1), got {self.test_fraction}"),
            (self.split in SPLITS, f"split must be one of {SPLITS}, got {self.split!r}"),
            (self.threshold_method in evaluation.THRESHOLD_METHODS,
             f"threshold_method must be one of {evaluation.THRESHOLD_METHODS}, got {self.threshold_method!r}"),
            (self.cost_ratio > 0, f"cost_ratio must be above 0, got {self.cost_ratio}"),
            (self.threshold_rows in THRESHOLD_ROWS,
             f"threshold_rows must be one of {THRESHOLD_ROWS}, got {self.threshold_rows!r}"),
            (self.min_threshold_frauds >= 1,
             f"min_threshold_frauds must be at least 1, got {self.min_threshold_frauds}"),
            (math.isfinite(self.recent_weight) and self.recent_weight >= 1.0,
             f"recent_weight must be at least 1, got {self.recent_weight}"),
            (self.min_train_frauds >= 1, f"min_train_frauds must be at least 1, got {self.min_train_frauds}"),
            (self.min_eval_frauds >= 1, f"min_eval_frauds must be at least 1, got {self.min_eval_frauds}"),
            (self.experiment.strip() != "", "experiment must not be empty"),
        ]
        for ok, message in checks:
            if not ok:
                raise TrainingError(message)
        parse_max_features(self.max_features)


def parse_max_features(value: str) -> str | int | float | None:
    """`max_features` as scikit-learn takes it: "sqrt", "log2", None (all), a count or a fraction.

    Raises:
        TrainingError: the value is none of these.
    """
    text = str(value).strip().lower()
    if text in ("sqrt", "log2"):
        return text
    if text in ("none", "all", ""):
        return None
    try:
        number = float(text)
    except ValueError:
        raise TrainingError(f"max_features must be sqrt, log2, none, a fraction in (0, 1] or a count; got "
                            f"{value!r}") from None
    if number.is_integer() and number > 1:
        return int(number)
    if 0.0 < number <= 1.0:
        return number
    raise TrainingError(f"max_features must be sqrt, log2, none, a fraction in (0, 1] or a count; got {value!r}")
