"""The drift reference: the rows a drift check compares the current window against.

Sources, in the order `load_reference(kind="auto")` tries them:

1. the drift reference file (DRIFT_REFERENCE, default `data/drift_reference.parquet`) when it belongs
   to the current Production version: that version's training features plus its own scores on them,
   with the model's name and version in the file's metadata. The promotion gate rewrites it after
   every promotion or rollback, atomically (a temporary file in the same folder, fsynced, then
   `os.replace`), so a reader sees the old file or the new one, never half of one;
2. the training features of the current Production version, from its training run's artifact
   `data/training_features.parquet`, scored by that version;
3. the reference database (REFERENCE_DB), scored by the Production version when there is one.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from common import settings
from common.schema import FEATURES, SCORE
from common.store import RequestStore, describe
from common.text import first_line

TRAINING_FEATURES_ARTIFACT = "data/training_features.parquet"
METADATA_KEY = b"drift_reference"
KINDS = ("auto", "file", "production", "db")


class ReferenceError(RuntimeError):
    """No usable reference: a file is missing or malformed, or a source is unavailable."""


@dataclass(frozen=True)
class Reference:
    """Reference rows as a feature-major (len(FEATURES), n) array, and the model's scores on them."""

    columns: np.ndarray
    scores: np.ndarray | None
    source: str
    model_name: str | None = None
    model_version: str | None = None

    @property
    def rows(self) -> int:
        return int(self.columns.shape[1])


# --- the file --------------------------------------------------------------------------------------


def write_reference_file(features: pd.DataFrame, scores: np.ndarray | None, path: Path, *, model_name: str,
                         model_version: str, run_id: str | None, source: str) -> Path:
    """Write features (FEATURES columns) and scores as the drift reference, atomically.

    Raises:
        ValueError: features lack a FEATURES column, or scores do not match the rows.
    """
    staged = stage_reference_file(features, scores, path, model_name=model_name, model_version=model_version,
                                  run_id=run_id, source=source)
    return commit_reference_file(staged, path)


def stage_reference_file(features: pd.DataFrame, scores: np.ndarray | None, path: Path, *, model_name: str,
                         model_version: str, run_id: str | None, source: str) -> Path:
    """Write the new reference to a temporary file beside `path` (fsynced) and return it.

    `commit_reference_file` renames it over `path`; `discard_staged` removes it. Staging first lets
    the gate do all the slow, fallible work before it touches the registry.
    """
    path = Path(path)
    missing = [f for f in FEATURES if f not in features.columns]
    if missing:
        raise ValueError(f"reference features lack columns {missing}")
    data = {f: features[f].to_numpy(np.float64) for f in FEATURES}
    if scores is not None:
        scores = np.asarray(scores, dtype=np.float64)
        if scores.shape != (len(features),):
            raise ValueError(f"{len(scores)} scores for {len(features)} reference rows")
        data[SCORE] = scores
    meta = {"model_name": model_name, "model_version": str(model_version), "run_id": run_id, "source": source,
            "rows": len(features), "written_at": time.time()}
    table = pa.table(data).replace_schema_metadata({METADATA_KEY: json.dumps(meta).encode()})
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            pq.write_table(table, fh)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp)


def commit_reference_file(staged: Path, path: Path) -> Path:
    """Atomically replace `path` with a staged file: readers see the old file or the new one."""
    path = Path(path)
    os.replace(staged, path)
    _fsync_dir(path.parent)
    return path


def discard_staged(staged: Path | None) -> None:
    if staged is not None:
        Path(staged).unlink(missing_ok=True)


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_reference_metadata(path: Path) -> dict | None:
    """The file's metadata (model_name, model_version, run_id, source, rows, written_at), or None if absent.

    Raises:
        ReferenceError: the file exists but is not a drift reference.
    """
    path = Path(path)
    if not path.is_file():
        return None
    try:
        raw = pq.read_schema(path).metadata or {}
        return json.loads(raw[METADATA_KEY])
    except (OSError, KeyError, ValueError, pa.ArrowException) as exc:
        raise ReferenceError(f"{path} is not a drift reference file: {exc}") from None


def read_reference_file(path: Path) -> Reference:
    """Load a drift reference file written by `write_reference_file`.

    Raises:
        ReferenceError: it is missing, unreadable, or lacks FEATURES columns.
    """
    path = Path(path)
    meta = read_reference_metadata(path)
    if meta is None:
        raise ReferenceError(f"drift reference file {path} does not exist")
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as exc:
        raise ReferenceError(f"drift reference file {path} cannot be read: {exc}") from None
    missing = [f for f in FEATURES if f not in table.column_names]
    if missing:
        raise ReferenceError(f"drift reference file {path} lacks columns {missing}")
    columns = np.stack([table.column(f).to_numpy().astype(np.float32) for f in FEATURES])
    scores = table.column(SCORE).to_numpy().astype(np.float32) if SCORE in table.column_names else None
    return Reference(columns, scores, f"file {path} (model {meta.get('model_name')} v{meta.get('model_version')})",
                     meta.get("model_name"), meta.get("model_version"))


# --- the other sources -----------------------------------------------------------------------------


def training_features(mlflow_client, run_id: str) -> pd.DataFrame:
    """The training-feature sample a run logged as `data/training_features.parquet`.

    Raises:
        ReferenceError: the run has no such artifact or it lacks FEATURES columns.
    """
    with tempfile.TemporaryDirectory(prefix="drift-reference-") as tmp:
        try:
            local = mlflow_client.download_artifacts(run_id, TRAINING_FEATURES_ARTIFACT, tmp)
            frame = pd.read_parquet(local)
        except Exception as exc:  # MlflowException, OSError, Arrow errors: all mean "not available"
            raise ReferenceError(f"run {run_id} has no readable {TRAINING_FEATURES_ARTIFACT}: "
                                 f"{first_line(exc)}") from None
    missing = [f for f in FEATURES if f not in frame.columns]
    if missing:
        raise ReferenceError(f"run {run_id}'s {TRAINING_FEATURES_ARTIFACT} lacks columns {missing}")
    return frame[list(FEATURES)]


def _score(bundle, rows: np.ndarray, chunk: int = 50_000) -> np.ndarray:
    """The bundle's fraud probabilities for (n, F) rows, in chunks to bound memory."""
    return np.concatenate([bundle.predict_proba(rows[i:i + chunk]) for i in range(0, len(rows), chunk)]
                          or [np.empty(0)])


def _scores_or_note(load: Callable[[], object] | None, rows: np.ndarray, notes: list[str]):
    """(scores, bundle) from the lazily loaded Production bundle, or (None, None) with a note why not."""
    if load is None:
        return None, None
    try:
        bundle = load()
    except Exception as exc:  # a model that cannot load must not stop the feature test
        notes.append(f"no reference scores: the Production model cannot be loaded: {first_line(exc)}")
        return None, None
    return _score(bundle, rows).astype(np.float32), bundle


def from_production_run(mlflow_client, production, load: Callable[[], object] | None = None,
                        notes: list[str] | None = None) -> Reference:
    """The Production version's training features, scored by it when `load` gives its bundle.

    Raises:
        ReferenceError: the version has no run or its run has no training features.
    """
    notes = notes if notes is not None else []
    if not production.run_id:
        raise ReferenceError(f"{production.name} v{production.version} has no training run")
    frame = training_features(mlflow_client, production.run_id)
    rows = frame.to_numpy(np.float64)
    scores, _ = _scores_or_note(load, rows, notes)
    return Reference(np.ascontiguousarray(rows.T, dtype=np.float32), scores,
                     f"training features of {production.name} v{production.version} (run {production.run_id})",
                     production.name, str(production.version))


def from_database(location: str, load: Callable[[], object] | None = None,
                  notes: list[str] | None = None) -> Reference:
    """All rows of a reference database, scored by the bundle `load` gives, when given.

    Raises:
        ReferenceError: the database is missing or empty.
        common.store.StoreUnavailable: it cannot be read.
    """
    notes = notes if notes is not None else []
    if "://" not in location and not Path(location).is_file():
        raise ReferenceError(f"reference database {location} does not exist (REFERENCE_DB)")
    store = RequestStore(location, create=False)
    try:
        columns = store.read_columns(list(FEATURES), dtype=np.float32)
    finally:
        store.dispose()
    if columns.shape[1] == 0:
        raise ReferenceError(f"reference database {describe(location)} has no rows")
    scores, bundle = _scores_or_note(load, np.ascontiguousarray(columns.T, dtype=np.float64), notes)
    return Reference(columns, scores, f"reference database {describe(location)}",
                     bundle.name if bundle else None, str(bundle.version) if bundle else None)


def stage_refresh(mlflow_client, bundle, path: Path | None = None) -> Path:
    """Stage the drift reference for `bundle` (a loaded version): its training features and its scores.

    Returns the staged file; commit it with `commit_reference_file(staged, path)`.

    Raises:
        ReferenceError: the version's run has no training features.
    """
    path = Path(path or settings.drift_reference_path())
    if not bundle.run_id:
        raise ReferenceError(f"{bundle.name} v{bundle.version} has no training run")
    frame = training_features(mlflow_client, bundle.run_id)
    scores = _score(bundle, frame.to_numpy(np.float64))
    return stage_reference_file(frame, scores, path, model_name=bundle.name, model_version=bundle.version,
                                run_id=bundle.run_id, source=f"training features of run {bundle.run_id}")


def load_reference(kind: str, *, mlflow_client, production=None, load: Callable[[], object] | None = None,
                   path: Path | None = None, reference_db: str | None = None) -> tuple[Reference, list[str]]:
    """The reference for a drift check, and notes on the sources passed over.

    Args:
        kind: 'auto' (see the module docstring), 'file', 'production' or 'db'.
        mlflow_client: registry/tracking client, to download the Production run's artifact.
        production: the Production ModelVersion, or None when there is none.
        load: returns the Production version's loaded bundle, to score reference rows; None when
            no scores are wanted. Called only when the source has no stored scores.
        path: the drift reference file (default DRIFT_REFERENCE).
        reference_db: the reference database (default REFERENCE_DB).

    Raises:
        ReferenceError: the requested source is unavailable (for 'auto': every source).
    """
    if kind not in KINDS:
        raise ReferenceError(f"reference {kind!r} is unknown; expected one of {KINDS}")
    path = Path(path or settings.drift_reference_path())
    reference_db = reference_db or settings.reference_db_url()
    notes: list[str] = []
    if production is None:
        load = None
    if kind == "file":
        return read_reference_file(path), notes
    if kind == "db":
        return from_database(reference_db, load, notes), notes
    if production is None:
        if kind == "production":
            raise ReferenceError("reference 'production' needs a Production model, and there is none")
        notes.append("no Production model: using the reference database, without model scores")
        return from_database(reference_db, None, notes), notes
    meta = read_reference_metadata(path) if kind == "auto" else None
    if (meta is not None and meta.get("model_name") == production.name
            and str(meta.get("model_version")) == str(production.version)):
        return read_reference_file(path), notes
    if meta is not None:
        notes.append(f"drift reference file {path} is for {meta.get('model_name')} v{meta.get('model_version')}, "
                     f"not the Production v{production.version}; ignored")
    try:
        return from_production_run(mlflow_client, production, load, notes), notes
    except ReferenceError as exc:
        if kind == "production":
            raise
        notes.append(f"{exc}; using the reference database")
    return from_database(reference_db, load, notes), notes
