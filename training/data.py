"""The labelled data a model is trained on: its sources, its rows, its hash, the split, and whether
it can support an honest model.

Only rows with a true label are read: the reference database (every row has `Class`) and
request-log rows labelled through the feedback endpoint. Unlabelled rows are counted, never used;
a label is never derived from a model score.

Each row keeps when its label arrived (`label_ts`, the feedback's time; a reference row's label came
with the data, before any model): the `arrival` split evaluates a candidate on labels the served
model could not have trained on (docs/decisions/021-evaluate-on-labels-that-arrived-since.md).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from common import settings
from common.archive import count_unlabelled, read_log
from common.schema import FEATURES, LABEL
from common.store import StoreUnavailable, describe
from common.text import first_line
from training.params import TrainingError, TrainingRefused, TrainParams


@dataclass(frozen=True)
class LabelledData:
    """Labelled rows in time order (reference first, then the request log) and their provenance."""

    frame: pd.DataFrame  # FEATURES + Class + ts + label_ts (when the label arrived) + source
    reference: str
    requests: str | None
    reference_rows: int
    reference_unlabelled: int
    request_labelled: int
    request_unlabelled: int
    sha256: str
    notes: tuple[str, ...] = ()
    request_archived: int = 0  # of request_labelled, the rows read from the log's archive (common/archive.py)

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
    note: str = ""  # how the method was applied, e.g. why `arrival` fell back to `time`
    # Positions of the rows whose labels arrived after the served model was trained (`arrival` only).
    arrived: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))


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


def _read_labelled(location: str) -> tuple[pd.DataFrame, int, int]:
    """(labelled rows, unlabelled rows, labelled rows read from the archive) of the live log and its archive."""
    import sqlalchemy as sa

    columns = (*FEATURES, LABEL, "ts", "label_ts")
    try:
        read = read_log(location, columns, dtype=np.float64, labelled=True)
        unlabelled = sum(count_unlabelled(location).values())
    except sa.exc.SQLAlchemyError as exc:
        raise StoreUnavailable(f"cannot read the requests table of {describe(location)}: {first_line(exc)}") from None
    frame = pd.DataFrame(dict(zip(columns, read.values, strict=True)))
    if not frame["ts"].is_monotonic_increasing:
        frame = frame.sort_values("ts", kind="stable", ignore_index=True)
    return frame, unlabelled, read.sources.get("archive", 0)


def load_labelled(reference: str, requests: str | None, notes: tuple[str, ...] = ()) -> LabelledData:
    """Read the labelled rows of both sources, time-ordered within each, reference first.

    Raises:
        common.store.StoreUnavailable: a database cannot be read.
    """
    ref, ref_unlabelled, _ = _read_labelled(reference)
    ref["label_ts"] = -np.inf  # the reference's labels came with the data, before any model was trained
    ref["source"] = "reference"
    parts = [ref]
    req_labelled = req_unlabelled = req_archived = 0
    if requests is not None:
        req, req_unlabelled, req_archived = _read_labelled(requests)
        req["label_ts"] = req["label_ts"].fillna(-np.inf)
        req["source"] = "requests"
        req_labelled = len(req)
        parts.append(req)
    frame = pd.concat(parts, ignore_index=True) if len(parts) > 1 else ref
    frame[LABEL] = frame[LABEL].astype(np.int64)
    return LabelledData(frame, reference, requests, len(ref), ref_unlabelled, req_labelled, req_unlabelled,
                        content_hash(frame), notes, req_archived)


def content_hash(frame: pd.DataFrame) -> str:
    """SHA-256 of the labelled rows exactly as trained on (features, label, ts, in order)."""
    digest = hashlib.sha256()
    digest.update(np.ascontiguousarray(frame[[*FEATURES, "ts"]].to_numpy(np.float64)).tobytes())
    digest.update(np.ascontiguousarray(frame[LABEL].to_numpy(np.int64)).tobytes())
    return digest.hexdigest()


def split_rows(frame: pd.DataFrame, method: str, test_fraction: float, seed: int, *,
               served_trained_at: float | None = None, min_eval_frauds: int = 1) -> Split:
    """The training and evaluation parts.

    arrival: the rows whose labels arrived after the served model was trained (`served_trained_at`,
        epoch seconds), which it cannot have learned from, are split in half at random, keeping the
        fraud rate: one half is the evaluation set, the other trains. The newest labels, the ones a
        changing fraud pattern shows up in first, then both train the candidate and judge it against
        the served model on equal terms. Without a served model, or with fewer than
        2 x `min_eval_frauds` frauds (or no legitimate row) among those labels, it is `time`.
    time: the last `test_fraction` of the rows, in their time order, is the evaluation set.
    stratified: a random split keeping the fraud rate equal in both parts.
    """
    n = len(frame)
    n_eval = max(1, math.ceil(n * test_fraction)) if n else 0
    if method == "arrival":
        note = "no served model to compare with" if served_trained_at is None else ""
        if served_trained_at is not None:
            new = np.flatnonzero(frame["label_ts"].to_numpy(np.float64) > served_trained_at)
            labels = frame[LABEL].to_numpy()[new]
            frauds = int(labels.sum())
            if frauds >= 2 * min_eval_frauds and frauds < len(new):
                evaluation = _stratified_half(new, labels, seed)
                return Split(method, np.setdiff1d(np.arange(n), evaluation), evaluation,
                             f"evaluated on half of the {len(new)} labels ({frauds} frauds) that arrived since the "
                             "served model was trained", arrived=new)
            note = (f"{len(new)} labels ({frauds} frauds) arrived since the served model was trained; "
                    f"{2 * min_eval_frauds} frauds and a legitimate row are needed")
        time_split = split_rows(frame, "time", test_fraction, seed)
        arrived = new if served_trained_at is not None else np.empty(0, dtype=np.int64)
        return Split(method, time_split.train, time_split.evaluation, f"{note}: evaluated on the newest rows",
                     arrived=arrived)
    if method == "time":
        positions = np.arange(n)
        return Split(method, positions[: n - n_eval], positions[n - n_eval:])
    from sklearn.model_selection import train_test_split

    labels = frame[LABEL].to_numpy()
    stratify = labels if np.bincount(labels, minlength=2).min() >= 2 else None
    train, evaluation = train_test_split(np.arange(n), test_size=n_eval, random_state=seed, stratify=stratify)
    return Split(method, np.sort(train), np.sort(evaluation))


def _stratified_half(positions: np.ndarray, labels: np.ndarray, seed: int) -> np.ndarray:
    """A random half of `positions`, with half of its frauds (rounded down) and half of the rest."""
    rng = np.random.default_rng(seed)
    picked = []
    for value in (0, 1):
        group = positions[labels == value]
        picked.append(rng.choice(group, size=len(group) // 2, replace=False))
    return np.sort(np.concatenate(picked))


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
            how = f"{split.method} split" + (f": {split.note}" if split.note else "")
            raise TrainingRefused(f"the {part} part ({how}) has {frauds} frauds in {len(y)} rows; at "
                                  f"least {minimum} are needed ({option})")
        if frauds == len(y):
            raise TrainingRefused(f"the {part} part ({split.method} split) has no legitimate rows")
