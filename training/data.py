"""The labelled data a model is trained on: its sources, its rows, its hash, the split, and whether
it can support an honest model.

Only rows with a true label are read: the reference database (every row has `Class`) and
request-log rows labelled through the feedback endpoint. Unlabelled rows are counted, never used;
a label is never derived from a model score.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from common import settings
from common.schema import FEATURES, LABEL
from common.store import RequestStore, StoreUnavailable, describe
from common.text import first_line
from training.params import TrainingError, TrainingRefused, TrainParams


@dataclass(frozen=True)
class LabelledData:
    """Labelled rows in time order (reference first, then the request log) and their provenance."""

    frame: pd.DataFrame  # FEATURES + Class + ts + source
    reference: str
    requests: str | None
    reference_rows: int
    reference_unlabelled: int
    request_labelled: int
    request_unlabelled: int
    sha256: str
    notes: tuple[str, ...] = ()

    @property
    def excluded_unlabelled(self) -> int:
        return self.reference_unlabelled + self.request_unlabelled

    def sources(self) -> str:
        """The sources for a message: "reference" or "reference and request log"."""
        return describe(self.reference) + (f" and {describe(self.requests)}" if self.requests else "")

    def features(self, positions: np.ndarray) -> pd.DataFrame:
        """The FEATURES columns of the rows at `positions`, in that order."""
        return self.frame.loc[positions, list(FEATURES)]

    def labels(self, positions: np.ndarray) -> np.ndarray:
        """The labels (0/1) of the rows at `positions`."""
        return self.frame[LABEL].to_numpy()[positions]


@dataclass(frozen=True)
class Split:
    """Row positions in `LabelledData.frame` of the training and evaluation parts, each ascending."""

    method: str
    train: np.ndarray
    evaluation: np.ndarray


def _location(value: str) -> str:
    """A user-given path resolved against the working directory; URLs unchanged."""
    return value if "://" in value else str(Path(value).expanduser().resolve())


def _is_missing_file(location: str) -> bool:
    return "://" not in location and not Path(location).is_file()


def resolve_sources(params: TrainParams) -> tuple[str, str | None, tuple[str, ...]]:
    """(reference, request log or None, notes) for the parameters and environment.

    Raises:
        TrainingError: the reference database or an explicitly named request log does not exist.
    """
    reference = _location(params.data) if params.data else settings.reference_db_url()
    if _is_missing_file(reference):
        raise TrainingError(f"reference database {reference} does not exist; generate and import data first "
                            "(make data, or mlflow run . -e generate then -e import_csv)")
    notes: list[str] = []
    if params.requests.lower() == "none":
        requests = None
    elif params.requests:
        requests = _location(params.requests)
        if _is_missing_file(requests):
            raise TrainingError(f"request log {requests} does not exist")
    else:
        requests = settings.request_log_url()
        if _is_missing_file(requests):
            notes.append(f"no request log at {requests} (LATEST_DB); training on the reference data only")
            requests = None
    if requests is not None and describe(requests) == describe(reference):
        raise TrainingError(f"the request log and the reference database are the same ({describe(reference)})")
    return reference, requests, tuple(notes)


def _read_labelled(location: str) -> tuple[pd.DataFrame, int]:
    import sqlalchemy as sa

    columns = (*FEATURES, LABEL, "ts")
    store = RequestStore(location, create=False)
    try:
        values = store.read_columns(columns, dtype=np.float64, labelled=True)
        unlabelled = store.count(labelled=False)
    except sa.exc.SQLAlchemyError as exc:
        raise StoreUnavailable(f"cannot read the requests table of {describe(location)}: {first_line(exc)}") from None
    finally:
        store.dispose()
    frame = pd.DataFrame(dict(zip(columns, values, strict=True)))
    if not frame["ts"].is_monotonic_increasing:
        frame = frame.sort_values("ts", kind="stable", ignore_index=True)
    return frame, unlabelled


def load_labelled(reference: str, requests: str | None, notes: tuple[str, ...] = ()) -> LabelledData:
    """Read the labelled rows of both sources, time-ordered within each, reference first.

    Raises:
        common.store.StoreUnavailable: a database cannot be read.
    """
    ref, ref_unlabelled = _read_labelled(reference)
    ref["source"] = "reference"
    parts = [ref]
    req_labelled = req_unlabelled = 0
    if requests is not None:
        req, req_unlabelled = _read_labelled(requests)
        req["source"] = "requests"
        req_labelled = len(req)
        parts.append(req)
    frame = pd.concat(parts, ignore_index=True) if len(parts) > 1 else ref
    frame[LABEL] = frame[LABEL].astype(np.int64)
    return LabelledData(frame, reference, requests, len(ref), ref_unlabelled, req_labelled, req_unlabelled,
                        content_hash(frame), notes)


def content_hash(frame: pd.DataFrame) -> str:
    """SHA-256 of the labelled rows exactly as trained on (features, label, ts, in order)."""
    digest = hashlib.sha256()
    digest.update(np.ascontiguousarray(frame[[*FEATURES, "ts"]].to_numpy(np.float64)).tobytes())
    digest.update(np.ascontiguousarray(frame[LABEL].to_numpy(np.int64)).tobytes())
    return digest.hexdigest()


def split_rows(frame: pd.DataFrame, method: str, test_fraction: float, seed: int) -> Split:
    """The training and evaluation parts.

    time: the last `test_fraction` of the rows, in their time order, is the evaluation set.
    stratified: a random split keeping the fraud rate equal in both parts.
    """
    n = len(frame)
    n_eval = max(1, math.ceil(n * test_fraction)) if n else 0
    if method == "time":
        positions = np.arange(n)
        return Split(method, positions[: n - n_eval], positions[n - n_eval:])
    from sklearn.model_selection import train_test_split

    labels = frame[LABEL].to_numpy()
    stratify = labels if np.bincount(labels, minlength=2).min() >= 2 else None
    train, evaluation = train_test_split(np.arange(n), test_size=n_eval, random_state=seed, stratify=stratify)
    return Split(method, np.sort(train), np.sort(evaluation))


def check_supports_model(data: LabelledData, split: Split, params: TrainParams) -> None:
    """Raise TrainingRefused when the labelled data cannot support an honest model."""
    y_all = data.frame[LABEL].to_numpy()
    if len(y_all) == 0:
        raise TrainingRefused(f"no labelled rows in {data.sources()} ({data.excluded_unlabelled} unlabelled rows "
                              "excluded)")
    classes = np.unique(y_all)
    if len(classes) < 2:
        only = "fraud" if classes[0] == 1 else "legitimate"
        raise TrainingRefused(f"all {len(y_all)} labelled rows are {only}; a classifier needs both classes")
    for part, positions, minimum, option in (
            ("training", split.train, params.min_train_frauds, "min_train_frauds"),
            ("evaluation", split.evaluation, params.min_eval_frauds, "min_eval_frauds")):
        y = y_all[positions]
        frauds = int(y.sum())
        if frauds < minimum:
            raise TrainingRefused(f"the {part} part ({split.method} split) has {frauds} frauds in {len(y)} rows; at "
                                  f"least {minimum} are needed ({option})")
        if frauds == len(y):
            raise TrainingRefused(f"the {part} part ({split.method} split) has no legitimate rows")
