"""The data a training run read is logged as MLflow datasets: sources, digests, row counts, contexts, lineage."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from training import datasets
from training.data import content_hash, load_labelled, split_rows
from training.registration import EVALUATION_ARTIFACT


def _inputs(client, run_id: str) -> dict[str, tuple]:
    """{dataset name: (dataset, {input tag: value})} of a run, as `mlflow.get_run(...).inputs` gives them."""
    return {di.dataset.name: (di.dataset, {t.key: t.value for t in di.tags})
            for di in client.get_run(run_id).inputs.dataset_inputs}


def test_a_run_logs_its_reference_and_evaluation_rows_with_source_digest_counts_and_context(trained_model):
    client = trained_model.store.client()
    inputs = _inputs(client, trained_model.run_id)
    assert set(inputs) == {"reference", "evaluation"}  # no request log was read: no feedback dataset

    reference, tags = inputs["reference"]
    assert tags["mlflow.data.context"] == "training"
    assert (reference.source_type, json.loads(reference.source)) == ("local", {"uri": str(trained_model.data.db)})
    profile = json.loads(reference.profile)
    assert profile["num_rows"] == trained_model.data.rows and profile["frauds"] == trained_model.data.frauds
    metrics = trained_model.result.metrics
    assert (int(tags["train_rows"]), int(tags["eval_rows"])) == (metrics["train_rows"], metrics["eval_rows"])
    labelled = load_labelled(str(trained_model.data.db), None)
    assert reference.digest == labelled.sha256[:datasets.DIGEST_CHARS]
    assert [c["name"] for c in json.loads(reference.schema)["mlflow_colspec"]] == list(datasets.COLUMNS)

    evaluation, tags = inputs["evaluation"]
    assert tags == {"mlflow.data.context": "evaluation"}
    # The evaluation dataset is the run's evaluation artifact: the rows there have its digest and count.
    rows = pd.read_parquet(client.download_artifacts(trained_model.run_id, EVALUATION_ARTIFACT))
    assert evaluation.digest == content_hash(rows)[:datasets.DIGEST_CHARS]
    assert json.loads(evaluation.profile)["num_rows"] == len(rows) == metrics["eval_rows"]
    assert evaluation.source_type == "local"
    assert json.loads(evaluation.source)["uri"].endswith(f"{trained_model.run_id}/artifacts/{EVALUATION_ARTIFACT}")


def test_the_logged_model_lists_the_datasets_its_metrics_were_measured_on(trained_model):
    client = trained_model.store.client()
    run = client.get_run(trained_model.run_id)
    (model,) = client.search_logged_models(experiment_ids=[run.info.experiment_id],
                                           filter_string=f"source_run_id = '{trained_model.run_id}'")
    by_dataset = {}
    for metric in model.metrics:
        by_dataset.setdefault(metric.dataset_name, set()).add(metric.key)
    inputs = _inputs(client, trained_model.run_id)
    assert {"average_precision", "recall", "precision", "eval_rows"} <= by_dataset["evaluation"]
    assert by_dataset["reference"] == {"reference_rows"}
    digests = {m.dataset_name: m.dataset_digest for m in model.metrics if m.dataset_name}
    assert digests == {name: inputs[name][0].digest for name in ("evaluation", "reference")}


def test_the_same_rows_give_the_same_digest_and_a_changed_row_another(reference_data):
    first, second = (load_labelled(str(reference_data.db), None) for _ in range(2))
    split = split_rows(first.frame, "time", 0.2, seed=0)
    a, b = (datasets.build(d, split, "file:///tmp/run/artifacts/data/evaluation.parquet") for d in (first, second))
    assert (a.reference.digest, a.evaluation.digest) == (b.reference.digest, b.evaluation.digest)
    assert a.reference.digest != a.evaluation.digest
    second.frame.loc[split.evaluation[0], "V3"] += 1e-9
    changed = datasets.build(second, split, "file:///tmp/run/artifacts/data/evaluation.parquet")
    assert changed.evaluation.digest != a.evaluation.digest


def test_feedback_rows_are_their_own_dataset_with_their_share_of_each_part(reference_data, tmp_path):
    from common.schema import FEATURES, LABEL
    from common.store import RequestStore

    log = tmp_path / "requests.db"
    reference = load_labelled(str(reference_data.db), None).frame
    rows = reference[list(FEATURES)].head(300).copy()
    rows.insert(0, "request_id", [f"r-{i}" for i in range(len(rows))])
    rows.insert(1, "ts", 2e9 + np.arange(len(rows), dtype=float))
    store = RequestStore(str(log))
    store.insert_frame(rows)
    store.record_feedback({f"r-{i}": int(reference[LABEL].iloc[i]) for i in range(200)})  # 100 stay unlabelled
    store.dispose()
    data = load_labelled(str(reference_data.db), str(log))
    split = split_rows(data.frame, "time", 0.2, seed=0)
    built = datasets.build(data, split, "mlflow-artifacts:/1/abc/artifacts/data/evaluation.parquet")
    assert json.loads(built.feedback.profile)["num_rows"] == 200
    assert json.loads(built.feedback.source) == {"uri": str(log)}
    assert built.reference.digest == content_hash(data.frame.iloc[:data.reference_rows])[:12] != data.sha256[:12]
    tags = {di.dataset.name: {t.key: t.value for t in di.tags} for di in built.inputs(split, data)}
    assert tags["feedback"]["mlflow.data.context"] == "training"
    # The time split evaluates on the newest rows: all 200 feedback rows, and the newest reference rows.
    assert (tags["feedback"]["train_rows"], tags["feedback"]["eval_rows"]) == ("0", "200")
    assert int(tags["reference"]["eval_rows"]) == len(split.evaluation) - 200
    assert int(tags["reference"]["train_rows"]) == len(split.train)
    assert (built.evaluation.source_type, json.loads(built.evaluation.source)) == (
        "mlflow-artifacts", {"uri": "mlflow-artifacts:/1/abc/artifacts/data/evaluation.parquet"})


@pytest.mark.parametrize(("location", "expected"), [
    ("/data/reference_data.db", ("local", {"uri": "/data/reference_data.db"})),
    ("sqlite:////data/requests.db", ("local", {"uri": "/data/requests.db"})),
    ("postgresql://fraud:s3cret@db.internal:5432/requests",
     ("sql", {"url": "postgresql+psycopg://fraud:***@db.internal:5432/requests", "table": "requests"})),
])
def test_a_database_source_is_a_local_file_or_a_url_without_its_password(location, expected):
    source_type, source = datasets.database_source(location)
    assert (source_type, json.loads(source)) == expected
    assert "s3cret" not in source


def test_a_local_artifact_is_a_local_path():
    source_type, source = datasets.artifact_source("file:///tmp/ml%20runs/1/abc/artifacts/data/e.parquet")
    assert (source_type, json.loads(source)) == ("local", {"uri": "/tmp/ml runs/1/abc/artifacts/data/e.parquet"})
