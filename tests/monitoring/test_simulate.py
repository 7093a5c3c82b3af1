"""The traffic simulator against a real HTTP server running the service app, then a drift check on its log."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator

import pytest
from werkzeug.serving import make_server

from common import registry
from common.store import RequestStore
from monitoring import drift, simulate
from tests.helpers.builders import new_mlflow_store, train_model

TOKEN = "simulator-token"


@pytest.fixture(scope="module")
def served_registry(tmp_path_factory, reference_data):
    store = new_mlflow_store(tmp_path_factory.mktemp("simulate-registry"))
    model = train_model(store, reference_data, seed=0)
    registry.move_to_stage(store.client(), model.name, model.version, "Production")
    return store, model


@pytest.fixture
def service_url(served_registry, reference_data, tmp_path) -> Iterator[tuple[str, str]]:
    from service.app import create_app, service_of

    store, model = served_registry
    log = str(tmp_path / "requests.db")
    app = create_app({"tokens": (TOKEN,), "request_log": log, "tracking_uri": store.tracking_uri,
                      "model_name": model.name, "model_uri": None, "fraud_threshold": None, "poll_seconds": 5.0,
                      "feature_config": str(reference_data.feature_config)})
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", log
    finally:
        server.shutdown()
        thread.join(timeout=10)
        service_of(app).close()


def test_token_comes_from_the_environment_or_the_token_file(monkeypatch, tmp_path):
    monkeypatch.setenv("API_TOKEN", "first,second")
    assert simulate.read_token() == "first"
    monkeypatch.delenv("API_TOKEN")
    monkeypatch.delenv("API_TOKEN_FILE", raising=False)
    token_file = tmp_path / ".api_token"
    token_file.write_text("from-file\n")
    monkeypatch.setattr(simulate, "TOKEN_FILE", token_file)
    assert simulate.read_token() == "from-file"
    token_file.unlink()
    with pytest.raises(simulate.SimulationError, match="no API token"):
        simulate.read_token()


def test_drifted_traffic_with_feedback_is_logged_labelled_and_then_detected(service_url, served_registry,
                                                                           reference_data, use_env, monkeypatch,
                                                                           tmp_path, capsys):
    url, log = service_url
    store, model = served_registry
    use_env({**store.env(), **reference_data.env(), "LATEST_DB": log, "API_TOKEN": TOKEN, "MODEL_NAME": model.name,
             "DRIFT_REFERENCE": str(tmp_path / "drift_reference.parquet")})
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    code = simulate.main(["--month", "3", "--rows", "1200", "--batch", "400", "--url", url, "--feedback", "true"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "sent 1200 rows of month 3 in 3 batches" in out and f"v{model.version} (1200 rows)" in out
    requests_store = RequestStore(log, create=False)
    assert requests_store.count() == 1200 and requests_store.count(labelled=True) == 1200
    requests_store.dispose()
    assert drift.main(["--window", "1200", "--reference", "db", "--output-dir", str(tmp_path)]) == drift.EXIT_DRIFT
    result = json.loads((tmp_path / drift.RESULT_FILE).read_text())
    assert "Amount_scaled" in result["drifted_features"] and result["score_test"] is True


def test_a_wrong_token_is_reported_with_the_service_error_and_exit_1(service_url, reference_data, use_env, capsys):
    url, _ = service_url
    use_env({**reference_data.env(), "API_TOKEN": "wrong"})
    assert simulate.main(["--rows", "10", "--url", url]) == 1
    assert "401" in capsys.readouterr().err
