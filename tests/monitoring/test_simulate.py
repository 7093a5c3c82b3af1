"""The traffic simulator against a real HTTP server running the service app, then a drift check on its log."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator

import pytest
from werkzeug.serving import make_server

from common.store import RequestStore
from monitoring import drift, simulate
from tests.helpers.builders import new_mlflow_store, promote_by_hand, train_model

TOKEN = "simulator-token-0123"


@pytest.fixture(scope="module")
def served_registry(tmp_path_factory, reference_data):
    store = new_mlflow_store(tmp_path_factory.mktemp("simulate-registry"))
    model = train_model(store, reference_data, seed=0)
    promote_by_hand(store.client(), model.name, model.version)  # the service serves only gated champions
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
    monkeypatch.setenv("API_TOKEN", "first-token-0123456,second-token-012345")
    assert simulate.read_token() == "first-token-0123456"
    monkeypatch.delenv("API_TOKEN")
    monkeypatch.delenv("API_TOKEN_FILE", raising=False)
    token_file = tmp_path / ".api_token"
    token_file.write_text("from-file-0123456789\n")
    monkeypatch.setattr(simulate, "TOKEN_FILE", token_file)
    assert simulate.read_token() == "from-file-0123456789"
    token_file.unlink()
    with pytest.raises(simulate.SimulationError, match="no API token"):
        simulate.read_token()


def test_labels_wait_for_the_chargeback_delay_and_a_later_month_delivers_them(service_url, served_registry,
                                                                             reference_data, use_env, monkeypatch,
                                                                             tmp_path, capsys):
    url, log = service_url
    store, model = served_registry
    use_env({**store.env(), **reference_data.env(), "LATEST_DB": log, "API_TOKEN": TOKEN, "MODEL_NAME": model.name,
             "DRIFT_REFERENCE": str(tmp_path / "drift_reference.parquet")})
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    ledger = str(tmp_path / "ledger.db")
    # Every scenario parameter is a flag: here legitimate traffic moves 2 sd on V1..V5 from month 1.
    common = ["--scenario", "covariate", "--v-shift", "2", "--rows", "1200", "--batch", "400", "--url", url,
              "--feedback", "true", "--ledger", ledger]
    assert simulate.main([*common, "--month", "3"]) == 0
    out = capsys.readouterr().out
    assert "sent 1200 rows of month 3 of scenario covariate in 3 batches" in out
    assert f"v{model.version} (1200 rows)" in out
    # Month 3's chargebacks come 30-90 days after its transactions: none by the month's end.
    assert "0 labels sent" in out and "1200 still pending" in out
    requests_store = RequestStore(log, create=False)
    assert requests_store.count() == 1200 and requests_store.count(labelled=True) == 0
    # Three months later every label of month 3 is known (frauds reported, the rest mature).
    assert simulate.main([*common, "--month", "6"]) == 0
    out = capsys.readouterr().out
    assert "1200 labels sent" in out and "1200 still pending" in out
    assert requests_store.count() == 2400 and requests_store.count(labelled=True) == 1200
    labelled = requests_store.read_frame(("request_id", "Class"), labelled=True)
    requests_store.dispose()
    assert labelled["request_id"].str.len().gt(0).all()
    assert drift.main(["--window", "1200", "--reference", "db", "--output-dir", str(tmp_path)]) == drift.EXIT_DRIFT
    result = json.loads((tmp_path / drift.RESULT_FILE).read_text())
    assert set(result["drifted_features"]) & {"V1", "V2", "V3", "V4", "V5"} and result["score_test"] is True


def test_the_month_only_form_still_sends_a_month_of_the_covariate_scenario(service_url, reference_data, use_env,
                                                                           tmp_path, capsys):
    url, _ = service_url
    use_env({**reference_data.env(), "API_TOKEN": TOKEN})
    assert simulate.main(["--month", "2", "--rows", "300", "--url", url, "--ledger", str(tmp_path / "l.db")]) == 0
    out = capsys.readouterr().out
    assert "sent 300 rows of month 2 of scenario covariate" in out and "feedback: not sent" in out
    assert not (tmp_path / "l.db").exists()


def test_a_bad_scenario_parameter_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as stopped:
        simulate.main(["--scenario", "covariate", "--maturity-days", "5"])
    assert stopped.value.code == 2 and "maturity_days" in capsys.readouterr().err


def test_a_wrong_token_is_reported_with_the_service_error_and_exit_1(service_url, reference_data, use_env, capsys):
    url, _ = service_url
    use_env({**reference_data.env(), "API_TOKEN": "wrong-token-0123456789"})
    assert simulate.main(["--rows", "10", "--url", url]) == 1
    assert "401" in capsys.readouterr().err
