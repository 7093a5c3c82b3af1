"""The endpoints through the Flask test client, against a real registry and a real SQLite request log."""

from __future__ import annotations

import numpy as np
import orjson
import pandas as pd
import pytest

from common.model import load_bundle
from common.schema import FEATURES
from common.store import RequestStore
from service.app import service_of
from tests.helpers.service import AUTH, OTHER_TOKEN, parse_metrics

LOG_COLUMNS = ("request_id", "ts", *FEATURES, "Amount", "score", "decision", "threshold", "model_name", "model_version")


def logged(app, columns=LOG_COLUMNS):
    return RequestStore(service_of(app).config.request_log).read_frame(columns)


def test_predict_answers_the_original_body_with_probabilities_decisions_and_row_ids(app, client, sample_rows,
                                                                                      serving_registry):
    response = client.post("/predict", json={"data": sample_rows[:5]}, headers=AUTH)
    assert response.status_code == 200
    body = response.get_json()
    assert set(body) == {"fraud_probability", "is_fraud", "threshold", "model_name", "model_version", "request_id"}
    expected = load_bundle(serving_registry.store.client(), serving_registry.name, "1").predict_proba(
        np.array(sample_rows[:5]))
    np.testing.assert_allclose(body["fraud_probability"], expected, rtol=0, atol=1e-12)
    assert body["threshold"] == serving_registry.v1.threshold
    assert body["is_fraud"] == [p >= body["threshold"] for p in body["fraud_probability"]]
    assert any(body["is_fraud"]), "the sample starts with frauds; the model should flag some"
    assert (body["model_name"], body["model_version"]) == (serving_registry.name, "1")
    request_id = response.headers["X-Request-ID"]
    assert body["request_id"] == [f"{request_id}-{i}" for i in range(5)]


def test_every_scored_row_is_in_the_request_log_with_its_score_and_decision(app, client, sample_rows):
    body = client.post("/predict", json={"data": sample_rows[:3]}, headers=AUTH).get_json()
    frame = logged(app)
    assert frame["request_id"].tolist() == body["request_id"]
    np.testing.assert_array_equal(frame[list(FEATURES)].to_numpy(), np.array(sample_rows[:3]))
    assert frame["score"].tolist() == body["fraud_probability"]
    assert frame["decision"].tolist() == [int(d) for d in body["is_fraud"]]
    assert set(frame["threshold"]) == {body["threshold"]}
    assert set(frame["model_version"]) == {"1"} and frame["Amount"].isna().all()
    assert frame["ts"].notna().all()


def test_records_with_raw_amount_score_like_the_scaled_row_and_log_the_amount(app, client, sample_rows,
                                                                            serving_registry):
    from common.features import load_feature_config

    scaler = load_feature_config(serving_registry.data.feature_config)
    raw_amount = 123.45
    row = [*sample_rows[0][:28], float(scaler.transform(raw_amount))]
    record = {**dict(zip(FEATURES[:-1], row[:28], strict=True)), "Amount": raw_amount}
    by_record = client.post("/predict", json={"records": [record]}, headers=AUTH).get_json()
    by_row = client.post("/predict", json={"data": [row]}, headers=AUTH).get_json()
    assert by_record["fraud_probability"] == pytest.approx(by_row["fraud_probability"], abs=1e-12)
    assert logged(app)["Amount"].tolist()[0] == raw_amount
    # In a batch, only the rows that gave the raw Amount log one.
    scaled = dict(zip(FEATURES, row, strict=True))
    mixed = client.post("/predict", json={"records": [scaled, record, scaled]}, headers=AUTH).get_json()
    assert mixed["fraud_probability"] == pytest.approx(by_row["fraud_probability"] * 3, abs=1e-12)
    amounts = logged(app).set_index("request_id").loc[mixed["request_id"], "Amount"].tolist()
    assert np.isnan(amounts[0]) and amounts[1] == raw_amount and np.isnan(amounts[2])


def test_invocations_speaks_every_mlflow_format_and_logs_the_rows(app, client, sample_rows):
    rows = sample_rows[:4]
    expected = client.post("/predict", json={"data": rows}, headers=AUTH).get_json()["fraud_probability"]
    table = pd.DataFrame(rows, columns=list(FEATURES))
    records = table.to_dict(orient="records")
    bodies = [
        ("application/json", orjson.dumps({"dataframe_split": table.to_dict(orient="split")})),
        ("application/json", orjson.dumps({"dataframe_records": records})),
        ("application/json", orjson.dumps({"instances": rows})),
        ("application/json", orjson.dumps({"inputs": records, "params": None})),
        ("application/json", orjson.dumps({"inputs": table.to_dict(orient="list"), "params": {"unused": 1}})),
        ("application/json; charset=utf-8", orjson.dumps({"instances": table.to_dict(orient="list")})),
        ("text/csv", table.to_csv(index=False).encode()),
        ("text/csv; charset=UTF-8", table[list(reversed(FEATURES))].to_csv(index=False).encode()),
        ("application/vnd.apache.parquet", table.to_parquet()),
    ]
    for content_type, body in bodies:
        response = client.post("/invocations", data=body, content_type=content_type, headers=AUTH)
        assert response.status_code == 200, (content_type, response.get_json())
        assert response.get_json() == {"predictions": pytest.approx(expected, abs=1e-12)}, content_type
    frame = logged(app)
    assert len(frame) == 4 * (1 + len(bodies))
    np.testing.assert_array_equal(frame[list(FEATURES)].to_numpy(), np.array(rows * (1 + len(bodies))))


def test_invocations_log_the_raw_amount_of_csv_and_parquet_tables(app, client, sample_rows, serving_registry):
    from common.features import load_feature_config

    scaler = load_feature_config(serving_registry.data.feature_config)
    table = pd.DataFrame(sample_rows[:2], columns=list(FEATURES))
    scaled = client.post("/invocations", json={"dataframe_split": table.to_dict(orient="split")}, headers=AUTH)
    raw = table.drop(columns="Amount_scaled").assign(Amount=[12.5, 980.0])
    table["Amount_scaled"] = scaler.transform(raw["Amount"].to_numpy())
    by_scaled = client.post("/invocations", json={"dataframe_split": table.to_dict(orient="split")}, headers=AUTH)
    for content_type, body in (("text/csv", raw.to_csv(index=False).encode()),
                               ("application/vnd.apache.parquet", raw.to_parquet())):
        response = client.post("/invocations", data=body, content_type=content_type, headers=AUTH)
        assert response.get_json() == {"predictions": pytest.approx(by_scaled.get_json()["predictions"], abs=1e-12)}
    assert scaled.status_code == 200
    assert logged(app)["Amount"].tolist()[-4:] == [12.5, 980.0, 12.5, 980.0]


def test_feedback_stores_labels_and_reports_unknown_ids(app, client, sample_rows):
    ids = client.post("/predict", json={"data": sample_rows[:3]}, headers=AUTH).get_json()["request_id"]
    labels = [{"request_id": ids[0], "is_fraud": True}, {"request_id": ids[2], "is_fraud": 0},
              {"request_id": "never-issued", "is_fraud": 1}]
    response = client.post("/feedback", json={"labels": labels}, headers=AUTH)
    assert response.status_code == 200
    assert response.get_json() == {"updated": 2, "unknown": ["never-issued"]}
    frame = logged(app, ("request_id", "Class", "label_ts")).set_index("request_id")
    assert frame.loc[ids[0], "Class"] == 1 and frame.loc[ids[2], "Class"] == 0
    assert np.isnan(frame.loc[ids[1], "Class"]) and np.isnan(frame.loc[ids[1], "label_ts"])
    assert frame.loc[ids[0], "label_ts"] > 0


def test_health_ready_and_version_describe_the_served_model(client, serving_registry):
    assert client.get("/health").get_json() == {"status": "ok"}
    assert client.get("/ping").get_json() == {"status": "ok"}  # MLflow's liveness path, without a token too
    ready = client.get("/ready")
    assert ready.status_code == 200
    details = ready.get_json()
    assert details["status"] == "ready" and details["model"]["version"] == "1"
    assert details["registry"]["reachable"] is True and details["refused"] is None
    version = client.get("/version").get_json()
    assert version["model_name"] == serving_registry.name and version["model_version"] == "1"
    assert version["stage"] == "Production" and version["run_id"] == serving_registry.v1.run_id
    assert version["threshold"] == serving_registry.v1.threshold and version["threshold_source"] == "model"
    assert version["flavor"] == "onnx" and version["loaded_at"] > 0


def test_fraud_threshold_overrides_the_models_threshold(make_app, sample_rows):
    client = make_app(fraud_threshold=0.999).test_client()
    body = client.post("/predict", json={"data": sample_rows[:10]}, headers=AUTH).get_json()
    assert body["threshold"] == 0.999
    assert body["is_fraud"] == [p >= 0.999 for p in body["fraud_probability"]]
    assert client.get("/version").get_json()["threshold_source"] == "FRAUD_THRESHOLD"


def test_model_uri_overrides_the_production_stage(make_app, serving_registry, sample_rows):
    client = make_app(model_uri=f"models:/{serving_registry.name}@challenger").test_client()
    body = client.post("/predict", json={"data": sample_rows[:1]}, headers=AUTH).get_json()
    assert body["model_version"] == serving_registry.v2.version == "2"


def test_metrics_count_predictions_probabilities_latency_errors_and_the_model(client, sample_rows):
    client.post("/predict", json={"data": sample_rows[:7]}, headers=AUTH)
    client.post("/predict", json={"data": [[1.0]]}, headers=AUTH)
    client.post("/predict", json={"data": sample_rows[:1]})
    response = client.get("/metrics", headers={"Authorization": f"Bearer {OTHER_TOKEN}"})
    assert response.status_code == 200 and response.mimetype == "text/plain"
    samples = parse_metrics(response.get_data(as_text=True))
    decisions = samples[('fraud_predictions_total', (('decision', 'fraud'),))] + samples[
        ('fraud_predictions_total', (('decision', 'legit'),))]
    assert decisions == 7
    assert samples[("fraud_probability_count", ())] == 7
    assert samples[("fraud_probability_bucket", (("le", "+Inf"),))] == 7
    assert samples[("fraud_http_request_duration_seconds_count", (("endpoint", "/predict"), ("status", "200")))] == 1
    assert samples[("fraud_http_request_duration_seconds_count", (("endpoint", "/predict"), ("status", "400")))] == 1
    assert samples[("fraud_errors_total", (("kind", "invalid_input"),))] == 1
    assert samples[("fraud_errors_total", (("kind", "unauthorized"),))] == 1
    assert samples[("fraud_model_info", (("flavor", "onnx"), ("model_name", "fraud-detector"),
                                         ("model_version", "1")))] == 1
    assert samples[("fraud_model_loaded", ())] == 1 and samples[("fraud_registry_reachable", ())] == 1
    assert samples[("fraud_model_reloads_total", (("result", "loaded"),))] == 1
    assert samples[("fraud_request_log_rows_total", ())] == 7
    assert samples[("fraud_request_log_failures_total", ())] == 0



def test_the_scikit_learn_flavor_scores_batches_like_onnx(app, client, sample_rows, serving_registry):
    from service.scoring import ServingModel

    watcher = service_of(app).watcher
    onnx_body = client.post("/predict", json={"data": sample_rows[:6]}, headers=AUTH).get_json()
    forest = load_bundle(serving_registry.store.client(), serving_registry.name, "1", flavor="sklearn")
    assert forest.flavor == "sklearn"
    watcher.current = ServingModel(forest, watcher.current.threshold, "model", watcher.current.loaded_at)
    response = client.post("/predict", json={"data": sample_rows[:6]}, headers=AUTH)
    assert response.status_code == 200, response.get_data(as_text=True)
    np.testing.assert_allclose(response.get_json()["fraud_probability"], onnx_body["fraud_probability"], atol=1e-5)
    assert client.get("/version").get_json()["flavor"] == "sklearn"


@pytest.mark.parametrize("flavor", ["onnx", "sklearn"])
def test_a_single_row_answers_decides_and_logs_as_it_does_in_a_batch(app, client, reference_data, serving_registry,
                                                                     flavor):
    """One row takes its own path (Python scalars from the model on); it must agree with the batch path."""
    from common.schema import LABEL
    from service.scoring import ServingModel

    if flavor == "sklearn":
        watcher = service_of(app).watcher
        forest = load_bundle(serving_registry.store.client(), serving_registry.name, "1", flavor="sklearn")
        watcher.current = ServingModel(forest, watcher.current.threshold, "model", watcher.current.loaded_at)
    frame = RequestStore(str(reference_data.db), create=False).read_frame((*FEATURES, LABEL))
    rows = pd.concat([frame[frame[LABEL] == 1].head(4), frame[frame[LABEL] == 0].head(4)])[list(FEATURES)]
    rows = rows.to_numpy().tolist()
    batch = client.post("/predict", json={"data": rows}, headers=AUTH).get_json()
    assert any(batch["is_fraud"]) and not all(batch["is_fraud"]), "the rows should take both decisions"
    singles = [client.post("/predict", json={"data": [row]}, headers=AUTH).get_json() for row in rows]
    assert [s["fraud_probability"] for s in singles] == [[p] for p in batch["fraud_probability"]]
    assert [s["is_fraud"] for s in singles] == [[d] for d in batch["is_fraud"]]
    invocations = [client.post("/invocations", json={"inputs": [row]}, headers=AUTH).get_json() for row in rows]
    assert [i["predictions"] for i in invocations] == [[p] for p in batch["fraud_probability"]]

    frame = logged(app).set_index("request_id")
    for single in singles:
        logged_row = frame.loc[single["request_id"][0]]
        assert logged_row["score"] == single["fraud_probability"][0]
        assert logged_row["decision"] == int(single["is_fraud"][0])
    assert len(frame) == 3 * len(rows)
