"""Multi-machine mode end to end: a real `mlflow server` on PostgreSQL with proxied artifacts, two
service processes sharing a PostgreSQL request log, and the whole loop driven over HTTP by the CLIs a
user (or the mlops workflow) runs.

generate -> import -> two services start without a model -> train -> drift -> promote (the first
model) -> both services load it -> predict through both -> feedback (across services) -> drift ->
retrain on the fed-back labels -> promote -> both services switch version without a restart.
The request log is counted at the end: every row a service reported as scored is there exactly
once, with its label. The Grafana drift-status panel's SQL is run against the tracking store too.

Every step runs from the image's /app layout (tests/helpers/image.py), as a container or a fresh
checkout on another machine would, so nothing reads this repository's own data/ or mlflow.db.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import psycopg
import pytest
import requests
import yaml
from mlflow.tracking import MlflowClient

from common.features import load_feature_config
from common.paths import REPO_ROOT
from common.registry import client, move_to_stage, production_version, stages_api, version_in_stage
from common.store import RequestStore
from tests.helpers.image import image_command, image_tree
from tests.helpers.processes import clean_env, free_port, http_ok, run, start, wait_until
from training import scenarios

pytestmark = pytest.mark.postgres

DASHBOARD = REPO_ROOT / "docker" / "grafana" / "dashboards" / "fraud-detection.json"
WORKFLOW = REPO_ROOT / ".github" / "workflows" / "mlops.yml"
TOKEN = "multi-machine-token"
MODEL = "fraud-detector"
REFERENCE_ROWS, REFERENCE_FRAUD_RATE = 3000, 0.02
TRAFFIC_ROWS, BATCH = 600, 100  # per service; 1,200 rows are above the drift config's min_window_rows
# Stratified split: the fed-back traffic (0.17% fraud) comes last in time and would otherwise be the
# whole evaluation part, with too few frauds to evaluate on.
TRAIN_OPTIONS = {"n_estimators": "15", "n_jobs": "1", "min_train_frauds": "10", "min_eval_frauds": "5",
                 "split": "stratified"}
TRAIN_PARAMS = [arg for key, value in TRAIN_OPTIONS.items() for arg in ("-P", f"{key}={value}")]  # mlflow run
TRAIN_FLAGS = [arg for key, value in TRAIN_OPTIONS.items() for arg in (f"--{key}", value)]  # python -m
# Wide margins: this test is about the plumbing between machines; the gate's quality checks have
# their own tests (tests/monitoring). The first model must still clear a floor.
PROMOTION_CONFIG = {"max_average_precision_drop": 0.5, "max_recall_drop": 0.5, "floor_average_precision": 0.3,
                    "floor_recall": 0.3, "min_evaluation_frauds": 5}


def drift_status_from_dashboard(tracking_db: str) -> int | None:
    """What Grafana's drift-status panel shows: its own SQL, run against the tracking store."""
    dashboard = json.loads(DASHBOARD.read_text())
    (panel,) = [p for p in dashboard["panels"] if p["title"] == "Drift status"]
    with psycopg.connect(tracking_db) as conn:
        row = conn.execute(panel["targets"][0]["rawSql"]).fetchone()
    return None if row is None else int(row[1])


def workflow_drift_flag(result_dir: Path, tmp_path: Path) -> str:
    """The drift job's output, from its own step in .github/workflows/mlops.yml run on `result_dir`."""
    workflow = yaml.safe_load(WORKFLOW.read_text())
    (step,) = [s for s in workflow["jobs"]["drift"]["steps"] if s.get("id") == "result"]
    output, summary = tmp_path / "github_output", tmp_path / "github_summary"
    output.write_text("")
    env = clean_env(GITHUB_OUTPUT=str(output), GITHUB_STEP_SUMMARY=str(summary))
    run(["bash", "-e", "-c", step["run"]], env=env, cwd=result_dir)
    (line,) = output.read_text().splitlines()
    return line.removeprefix("drift_detected=")


def registry_version(tracking_uri: str, stage: str) -> str | None:
    version = version_in_stage(client(tracking_uri), MODEL, stage)
    return None if version is None else str(version.version)


def request_log_counts(url: str) -> tuple[int, int, int, set[str]]:
    """(rows, distinct request ids, labelled rows, ids) in the shared request log."""
    with psycopg.connect(url) as conn:
        rows, distinct, labelled = conn.execute(
            'SELECT count(*), count(DISTINCT request_id), count("Class") FROM requests').fetchone()
        ids = {r[0] for r in conn.execute("SELECT request_id FROM requests")}
    return rows, distinct, labelled, ids


def test_promotion_archives_the_replaced_version_on_a_postgresql_registry(make_postgres_url):
    uri = make_postgres_url("registry").replace("postgresql://", "postgresql+psycopg://", 1)
    mlflow_client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    mlflow_client.create_registered_model(MODEL)
    for _ in range(2):
        mlflow_client.create_model_version(MODEL, "file:///nowhere/model", run_id=None)
    move_to_stage(mlflow_client, MODEL, "1", "Production")
    move_to_stage(mlflow_client, MODEL, "2", "Production")
    with stages_api():
        stages = {str(v.version): v.current_stage for v in mlflow_client.search_model_versions(f"name = '{MODEL}'")}
    assert stages == {"1": "Archived", "2": "Production"}
    assert str(production_version(mlflow_client, MODEL).version) == "2"
    assert str(mlflow_client.get_model_version_by_alias(MODEL, "champion").version) == "2"
    assert str(mlflow_client.get_model_version_by_alias(MODEL, "previous").version) == "1"


@pytest.mark.slow
def test_two_services_share_a_tracking_server_and_request_log_through_the_whole_loop(tmp_path, make_postgres_url):
    tracking_db, request_db, reference_db = map(make_postgres_url, ("tracking", "requests", "reference"))
    app = image_tree(tmp_path / "app")
    (tmp_path / "promotion_config.json").write_text(json.dumps(PROMOTION_CONFIG))
    servers = []
    try:
        # --- the tracking server: PostgreSQL backend store, artifacts proxied to a local folder ------
        mlflow_port = free_port()
        tracking_uri = f"http://127.0.0.1:{mlflow_port}"
        backend = tracking_db.replace("postgresql://", "postgresql+psycopg://", 1)
        server = start("mlflow-server", ["mlflow", "server", "--backend-store-uri", backend,
                                         "--artifacts-destination", str(tmp_path / "mlartifacts"), "--serve-artifacts",
                                         "--host", "127.0.0.1", "--port", str(mlflow_port), "--workers", "1"],
                       env=clean_env(), cwd=tmp_path, log_dir=tmp_path)
        servers.append(server)
        wait_until(server, http_ok(f"{tracking_uri}/health"), "tracking server health", timeout=180)

        # Every machine's settings: the shared stores by URL, and its own small local files.
        env = clean_env(MLFLOW_TRACKING_URI=tracking_uri, LATEST_DB=request_db, REFERENCE_DB=reference_db,
                        MODEL_NAME=MODEL, API_TOKEN=TOKEN, FEATURE_CONFIG=str(tmp_path / "feature_config.json"),
                        DRIFT_REFERENCE=str(tmp_path / "drift_reference.parquet"),
                        PROMOTION_CONFIG=str(tmp_path / "promotion_config.json"))
        python = [sys.executable, "-m"]

        def mlflow_run(entry: str, *params: str) -> str:
            return run(["mlflow", "run", str(app), "-e", entry, "--env-manager", "local", *params],
                       env=env, cwd=app).stdout

        # --- data, and two service processes on their own ports sharing one request log --------------
        csv = tmp_path / "creditcard.csv"
        run([*python, "training.generate", "--rows", str(REFERENCE_ROWS), "--seed", "7",
             "--fraud-rate", str(REFERENCE_FRAUD_RATE), "--out", str(csv)], env=env, cwd=app)
        run([*python, "training.import_csv", "--csv", str(csv), "--db", reference_db], env=env, cwd=app)
        urls, services = [], []
        for name in ("service-a", "service-b"):
            port = free_port()
            services.append(start(name, image_command(), env={**env, "HOST": "127.0.0.1", "PORT": str(port),
                                                               "WEB_CONCURRENCY": "2", "MODEL_POLL_SECONDS": "1"},
                                  cwd=app, log_dir=tmp_path))
            servers.append(services[-1])
            urls.append(f"http://127.0.0.1:{port}")
        for service, url in zip(services, urls, strict=True):
            wait_until(service, http_ok(f"{url}/health"), "health", timeout=120)
            assert requests.get(f"{url}/ready", timeout=5).status_code == 503  # no model registered yet

        # --- the first model: train, drift (nothing logged yet), promote; both services load it ------
        # The services create the request log's table on their first scored row, and neither training
        # nor the drift check yet reads a PostgreSQL log without the table as an empty one: create it.
        RequestStore(request_db).dispose()
        mlflow_run("train", *TRAIN_PARAMS)
        assert registry_version(tracking_uri, "Staging") == "1"
        mlflow_run("drift")
        first_check = json.loads((app / "drift_result.json").read_text())
        assert first_check["status"] == "inconclusive", first_check
        assert workflow_drift_flag(app, tmp_path) == "inconclusive"
        assert drift_status_from_dashboard(tracking_db) == -1
        mlflow_run("promote")
        assert registry_version(tracking_uri, "Production") == "1"
        for service, url in zip(services, urls, strict=True):
            wait_until(service, http_ok(f"{url}/ready"), "the first model, hot-loaded", timeout=180)
            assert str(requests.get(f"{url}/version", timeout=5).json()["model_version"]) == "1"

        # --- traffic through both: A by the simulator (with its feedback), B by a client whose
        # labels go back through A, so a label finds a row the other process logged --------------------
        # Legitimate traffic 2 sd off on V1..V5 (a change the drift check's effect-size floor lets through),
        # and a chargeback feed that reports every label at once, so that this test needs no later month.
        shift = ["--scenario", "covariate", "--v-shift", "2", "--delay-min-days", "0", "--delay-max-days", "0",
                 "--maturity-days", "0", "--unreported", "0"]
        run([*python, "monitoring.simulate", *shift, "--month", "3", "--rows", str(TRAFFIC_ROWS), "--batch",
             str(BATCH), "--seed", "1", "--url", urls[0], "--feedback", "true", "--ledger",
             str(tmp_path / "ledger.db")], env=env, cwd=app)
        traffic = scenarios.inputs(scenarios.named("covariate", v_shift=2.0, seed=2), 3,
                                   load_feature_config(tmp_path / "feature_config.json"), TRAFFIC_ROWS)
        auth = {"Authorization": f"Bearer {TOKEN}"}
        ids_b, labels_b = [], []
        for start_row in range(0, TRAFFIC_ROWS, BATCH):
            chunk = traffic.iloc[start_row:start_row + BATCH]
            answer = requests.post(f"{urls[1]}/predict", json={"data": chunk.drop(columns="Class").to_numpy().tolist()},
                                   headers=auth, timeout=60)
            assert answer.status_code == 200, answer.text
            assert str(answer.json()["model_version"]) == "1"
            ids_b += answer.json()["request_id"]
            labels_b += chunk["Class"].astype(int).tolist()
        feedback = requests.post(f"{urls[0]}/feedback", headers=auth, timeout=60, json={
            "labels": [{"request_id": rid, "is_fraud": label} for rid, label in zip(ids_b, labels_b, strict=True)]})
        assert feedback.status_code == 200, feedback.text
        assert feedback.json() == {"updated": TRAFFIC_ROWS, "unknown": []}

        rows, distinct, labelled, logged_ids = request_log_counts(request_db)
        assert (rows, distinct, labelled) == (2 * TRAFFIC_ROWS, 2 * TRAFFIC_ROWS, 2 * TRAFFIC_ROWS)
        assert set(ids_b) <= logged_ids

        # --- drift on the shared log, retrain on the fed-back labels, promote: this time through the
        # modules' own CLIs (the first round used `mlflow run`, as .github/workflows/mlops.yml does) ----
        run([*python, "monitoring.drift"], env=env, cwd=app, expect=3)  # 3: drift detected
        check = json.loads((app / "drift_result.json").read_text())
        assert check["drift_detected"] is True, check
        assert workflow_drift_flag(app, tmp_path) == "true"
        assert drift_status_from_dashboard(tracking_db) == 1

        run([*python, "training.train", *TRAIN_FLAGS], env=env, cwd=app)
        assert registry_version(tracking_uri, "Staging") == "2"
        mlflow_client = client(tracking_uri)
        run_id = mlflow_client.get_model_version(MODEL, "2").run_id
        trained = mlflow_client.get_run(run_id).data
        assert int(trained.params["request_labelled_rows"]) == 2 * TRAFFIC_ROWS
        assert int(trained.metrics["train_rows"] + trained.metrics["eval_rows"]) == REFERENCE_ROWS + 2 * TRAFFIC_ROWS

        run([*python, "monitoring.gate"], env=env, cwd=app)
        assert registry_version(tracking_uri, "Production") == "2"

        # --- both services switch by themselves ---------------------------------------------------------
        for service, url in zip(services, urls, strict=True):
            wait_until(service, lambda url=url: str(requests.get(f"{url}/version", timeout=5).json()["model_version"])
                       == "2", "version 2 after the promotion", timeout=120)
            answer = requests.post(f"{url}/predict", json={"data": traffic.drop(columns="Class").head(5).to_numpy()
                                                           .tolist()}, headers=auth, timeout=30)
            assert answer.status_code == 200 and str(answer.json()["model_version"]) == "2", answer.text
        rows, distinct, labelled, _ = request_log_counts(request_db)
        assert (rows, distinct, labelled) == (2 * TRAFFIC_ROWS + 10, 2 * TRAFFIC_ROWS + 10, 2 * TRAFFIC_ROWS)
    finally:
        # Before make_postgres_url drops the databases these processes hold.
        for server in reversed(servers):
            server.stop()
