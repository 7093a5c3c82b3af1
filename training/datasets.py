"""The data a training run read, as MLflow datasets: what the run's Dataset column and the model's lineage show.

Up to three datasets per run, each with its source, a digest of its rows, its row and fraud counts,
and its columns (FEATURES, Class, ts):

- `reference` (context `training`): the labelled rows of the reference database;
- `feedback` (context `training`): the request-log rows labelled through the feedback endpoint,
  whenever a request log was read (also when it held no label yet: the run then says so);
- `evaluation` (context `evaluation`): the held-out rows the run's metrics were measured on, taken
  from those two and stored as the run artifact `data/evaluation.parquet`. The evaluation metrics
  are logged against it and the logged model, which is what the model's page lists as its datasets.

A digest is the first DIGEST_CHARS hex digits of `training.data.content_hash` of the rows, so the
same rows give the same digest in every run. The datasets are built as `mlflow.entities.Dataset`
from what training already knows, not through `mlflow.data.from_pandas`: that one infers the schema
by inspecting every row and, without a digest of its own, hashes through a per-cell type check,
which together cost seconds on the full reference data for columns `common.schema` already fixes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from urllib.parse import unquote, urlparse

import numpy as np
import pandas as pd
import sqlalchemy as sa
from mlflow.data.sources import LocalArtifactDatasetSource
from mlflow.entities import Dataset, DatasetInput, InputTag
from mlflow.types import ColSpec, Schema
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

from common.schema import FEATURES, LABEL
from common.store import describe, to_url
from training.data import LabelledData, Split, content_hash

DIGEST_CHARS = 12  # MLflow keeps at most 36; its own digests have 8
TRAINING, EVALUATION = "training", "evaluation"
COLUMNS = (*FEATURES, LABEL, "ts")
# MLflow has no source type for a database table; datasets read from a server database get this one.
SQL_SOURCE_TYPE = "sql"


@dataclass(frozen=True)
class TrainingDatasets:
    """The datasets of one training run, as logged."""

    reference: Dataset
    feedback: Dataset | None
    evaluation: Dataset

    def inputs(self, split: Split, data: LabelledData) -> list[DatasetInput]:
        """The run inputs: each dataset with its context, and how many of its rows trained and evaluated."""
        n_reference = data.reference_rows
        parts = [(self.reference, TRAINING, _count_between(split, 0, n_reference))]
        if self.feedback is not None:
            parts.append((self.feedback, TRAINING, _count_between(split, n_reference, len(data.frame))))
        inputs = [DatasetInput(dataset, [InputTag(MLFLOW_DATASET_CONTEXT, context),
                                         InputTag("train_rows", str(train)), InputTag("eval_rows", str(evaluated))])
                  for dataset, context, (train, evaluated) in parts]
        inputs.append(DatasetInput(self.evaluation, [InputTag(MLFLOW_DATASET_CONTEXT, EVALUATION)]))
        return inputs


def build(data: LabelledData, split: Split, evaluation_uri: str) -> TrainingDatasets:
    """The datasets of a run that trains on `data` split by `split`; `evaluation_uri` is where the run
    stores its evaluation rows (the artifact's URI)."""
    frame, n_reference = data.frame, data.reference_rows
    # Without feedback rows the whole frame is the reference, already hashed by `load_labelled`.
    reference_digest = (data.sha256 if n_reference == len(frame)
                        else content_hash(frame.iloc[:n_reference]))
    reference = _dataset("reference", reference_digest, database_source(data.reference), frame.iloc[:n_reference])
    feedback = None
    if data.requests is not None:
        rows = frame.iloc[n_reference:]
        feedback = _dataset("feedback", content_hash(rows), database_source(data.requests), rows)
    rows = frame.iloc[split.evaluation]
    evaluation = _dataset("evaluation", content_hash(rows), artifact_source(evaluation_uri), rows)
    return TrainingDatasets(reference, feedback, evaluation)


def _count_between(split: Split, start: int, stop: int) -> tuple[int, int]:
    """(training rows, evaluation rows) among frame positions [start, stop)."""
    def count(positions: np.ndarray) -> int:
        return int(np.searchsorted(positions, stop) - np.searchsorted(positions, start))
    return count(split.train), count(split.evaluation)


def _dataset(name: str, digest: str, source: tuple[str, str], rows: pd.DataFrame) -> Dataset:
    schema = Schema([*(ColSpec("double", f) for f in FEATURES), ColSpec("long", LABEL), ColSpec("double", "ts")])
    profile = {"num_rows": len(rows), "num_elements": len(rows) * len(COLUMNS), "frauds": int(rows[LABEL].sum())}
    return Dataset(name=name, digest=digest[:DIGEST_CHARS], source_type=source[0], source=source[1],
                   schema=json.dumps({"mlflow_colspec": schema.to_dict()}), profile=json.dumps(profile))


def database_source(location: str) -> tuple[str, str]:
    """(source type, source JSON) of a request store: a SQLite file is MLflow's `local` source, whose
    path the UI shows; a server database is a `sql` source naming its URL, without the password, and
    the table."""
    url = sa.engine.make_url(to_url(location))
    if url.get_backend_name() == "sqlite" and url.database:
        return "local", LocalArtifactDatasetSource(url.database).to_json()
    return SQL_SOURCE_TYPE, json.dumps({"url": describe(location), "table": "requests"})


def artifact_source(uri: str) -> tuple[str, str]:
    """(source type, source JSON) of a run artifact: `local` in a local store, else the URI's scheme
    (e.g. `mlflow-artifacts` behind a tracking server)."""
    parsed = urlparse(uri)
    if parsed.scheme in ("", "file"):
        return "local", LocalArtifactDatasetSource(unquote(parsed.path) if parsed.scheme else uri).to_json()
    return parsed.scheme, json.dumps({"uri": uri})
