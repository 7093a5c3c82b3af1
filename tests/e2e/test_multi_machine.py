"""Multi-machine mode end to end: a real `mlflow server --app-name basic-auth` on PostgreSQL with
proxied artifacts, two service processes sharing a PostgreSQL request log, and the whole loop driven
over HTTP by the CLIs a user (or the mlops workflow) runs, each component as its own user: the
tracking server's users and grants from `python -m monitoring.access`, the PostgreSQL roles from
docker/postgres/roles.sql, the tables created by the databases' owner.

generate -> import -> two services start without a model -> train -> drift -> promote (the first
model) -> both services load it -> predict through both -> feedback (across services) -> drift ->
retrain on the fed-back labels -> promote -> both services switch version without a restart.
The request log is counted at the end: every row a service reported as scored is there exactly
once, with its label. The Grafana drift-status panel's SQL is run against the tracking store too.
Then what the users may not do: no login is 401; the service and the analyst cannot move a stage
or an alias (403); the services refuse a version altered after the gate promoted it and one moved
to Production by hand; the service's and the pipeline's PostgreSQL roles cannot delete or drop the
log. Last, no password or token appears in any MLflow param, tag or metric, artifact or log.

Every step runs from the image's /app layout (tests/helpers/image.py), as a container or a fresh
checkout on another machine would, so nothing reads this repository's own data/ or mlflow.db.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import mlflow
import psycopg
import pytest
import requests
import yaml
from mlflow.tracking import MlflowClient

from common.features import load_feature_config
from common.paths import REPO_ROOT
from common.registry import client, move_to_stage, production_version, stages_api, version_in_stage
from tests.helpers.image import image_command, image_tree
from tests.helpers.processes import clean_env, free_port, http_ok, run, start, wait_until
from tests.helpers.tracking_server import SERVER_ENV
from training import scenarios

pytestmark = pytest.mark.postgres

DASHBOARD = REPO_ROOT / "docker" / "grafana" / "dashboards" / "fraud-detection.json"
WORKFLOW = REPO_ROOT / ".github" / "workflows" / "mlops.yml"
TOKEN = "multi-machine-token"
MODEL = "fraud-detector"
AUTH_CONFIG = REPO_ROOT / "docker" / "mlflow" / "basic_auth.ini"
ROLES_SQL = REPO_ROOT / "docker" / "postgres" / "roles.sql"
PERMISSION_DENIED = "42501"  # PostgreSQL's insufficient_privilege
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


def with_role(url: str, role: str) -> str:
    """The same database, logged in as `role` (PostgreSQL's trust auth here: no password)."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=f"{role}@{parts.hostname}:{parts.port}"))


def denied(url: str, statement: str) -> bool:
    """Whether PostgreSQL refuses `statement` for lack of privilege (rolled back either way)."""
    with psycopg.connect(url) as conn:
        try:
            conn.execute(statement)
        except psycopg.errors.InsufficientPrivilege:
            return True
        finally:
            conn.rollback()
    return False


class Roles:
    """The PostgreSQL roles this test creates (named uniquely: roles belong to the whole cluster)."""

    def __init__(self, admin_url: str):
        self.admin_url, self.prefix = admin_url, f"r{uuid.uuid4().hex[:10]}"
        self.names: list[str] = []

    def name(self, what: str) -> str:
        self.names.append(f"{self.prefix}_{what}")
        return self.names[-1]

    def drop(self, databases: list[str]) -> None:
        """Drop the databases (the fixture would, later) and then the roles that held grants in them."""
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            for url in databases:
                conn.execute(f'DROP DATABASE IF EXISTS "{urlsplit(url).path.lstrip("/")}" WITH (FORCE)')
            for role in self.names:
                conn.execute(f'DROP ROLE IF EXISTS "{role}"')


def mlflow_api(tracking_uri: str, method: str, path: str, auth: tuple[str, str] | None, **body) -> int:
    """The status of one MLflow REST call as `auth` (user, password), or with no login at all."""
    call = requests.get if method == "GET" else requests.post
    kwargs = {"params": body} if method == "GET" else {"json": body}
    return call(f"{tracking_uri}/api/2.0/mlflow/{path}", auth=auth, timeout=30, **kwargs).status_code


@pytest.mark.slow
def test_two_services_share_a_tracking_server_and_request_log_through_the_whole_loop(tmp_path, make_postgres_url,
                                                                                      monkeypatch):
    tracking_db, request_db, reference_db = databases = list(map(make_postgres_url, ("tracking", "requests",
                                                                                      "reference")))
    roles = Roles(tracking_db.rsplit("/", 1)[0] + "/postgres")
    app = image_tree(tmp_path / "app")
    (tmp_path / "promotion_config.json").write_text(json.dumps(PROMOTION_CONFIG))
    # Every credential in a file of its own (the *_FILE variables), each a fresh random value.
    secrets_dir = tmp_path / "secrets"
    secrets_dir.mkdir(mode=0o700)
    secret = {who: f"{who}-{uuid.uuid4().hex}" for who in ("admin", "pipeline", "service", "analyst", "flask")}
    for who, value in secret.items():
        (secrets_dir / who).write_text(value + "\n")
    outputs: list[str] = []

    def run_logged(argv: list[str], **kwargs) -> subprocess.CompletedProcess:
        result = run(argv, **kwargs)
        outputs.append(result.stdout + result.stderr)
        return result

    servers = []
    try:
        # --- PostgreSQL: the owner (here the test's admin) creates the tables, roles.sql the roles --------
        mlflow_role, service_role, pipeline_role, archive_role = map(roles.name, ("mlflow", "service", "pipeline",
                                                                              "archive"))
        with psycopg.connect(roles.admin_url, autocommit=True) as conn:
            conn.execute(f'CREATE ROLE "{mlflow_role}" LOGIN')  # the tracking server's: it owns its database
            conn.execute(f'ALTER DATABASE "{urlsplit(tracking_db).path.lstrip("/")}" OWNER TO "{mlflow_role}"')
        run_logged([sys.executable, "-m", "common.store", "--create", request_db, reference_db], env=clean_env(),
                   cwd=app)
        run_logged(["psql", "-X", "-q", request_db, "-v", f"reference_db={urlsplit(reference_db).path.lstrip('/')}",
                    "-v", f"service_role={service_role}", "-v", f"pipeline_role={pipeline_role}",
                    "-v", f"archive_role={archive_role}", "-f", str(ROLES_SQL)], env=clean_env(), cwd=tmp_path)

        # --- the tracking server: basic auth, PostgreSQL backend store, artifacts proxied to a folder -----
        mlflow_port = free_port()
        tracking_uri = f"http://127.0.0.1:{mlflow_port}"
        backend = with_role(tracking_db, mlflow_role).replace("postgresql://", "postgresql+psycopg://", 1)
        server = start("mlflow-server", ["mlflow", "server", "--app-name", "basic-auth", "--backend-store-uri", backend,
                                         "--artifacts-destination", str(tmp_path / "mlartifacts"), "--serve-artifacts",
                                         "--host", "127.0.0.1", "--port", str(mlflow_port), "--workers", "1"],
                       env=clean_env(**SERVER_ENV, MLFLOW_AUTH_CONFIG_PATH=str(AUTH_CONFIG),
                                     MLFLOW_AUTH_ADMIN_PASSWORD=secret["admin"],
                                     MLFLOW_FLASK_SERVER_SECRET_KEY=secret["flask"]),
                       cwd=tmp_path, log_dir=tmp_path)
        servers.append(server)
        wait_until(server, http_ok(f"{tracking_uri}/health"), "tracking server health", timeout=180)
        access_env = clean_env(MLFLOW_TRACKING_URI=tracking_uri, MLFLOW_TRACKING_USERNAME="admin",
                               MLFLOW_TRACKING_PASSWORD_FILE=str(secrets_dir / "admin"), MODEL_NAME=MODEL,
                               **{f"{who.upper()}_MLFLOW_PASSWORD_FILE": str(secrets_dir / who)
                                  for who in ("pipeline", "service", "analyst")})
        run_logged([sys.executable, "-m", "monitoring.access"], env=access_env, cwd=app)
        again = run_logged([sys.executable, "-m", "monitoring.access"], env=access_env, cwd=app)  # idempotent
        assert "user service: password set" in again.stdout and "created" not in again.stdout
        assert mlflow_api(tracking_uri, "GET", "experiments/search", None, max_results=1) == 401
        # This process reads the registry as the analyst, who may read everything and change nothing.
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "analyst")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", secret["analyst"])

        # Every machine's settings: the shared stores by URL, and its own small local files. The pipeline
        # as `pipeline` (MLflow's own `mlflow run` CLI reads the password from the variable only).
        common_env = dict(MLFLOW_TRACKING_URI=tracking_uri, MODEL_NAME=MODEL, API_TOKEN=TOKEN,
                          FEATURE_CONFIG=str(tmp_path / "feature_config.json"),
                          DRIFT_REFERENCE=str(tmp_path / "drift_reference.parquet"),
                          PROMOTION_CONFIG=str(tmp_path / "promotion_config.json"))
        env = clean_env(**common_env, LATEST_DB=with_role(request_db, pipeline_role),
                        REFERENCE_DB=with_role(reference_db, pipeline_role), MLFLOW_TRACKING_USERNAME="pipeline",
                        MLFLOW_TRACKING_PASSWORD=secret["pipeline"])
        env_from_files = {**{k: v for k, v in env.items() if k != "MLFLOW_TRACKING_PASSWORD"},
                          "MLFLOW_TRACKING_PASSWORD_FILE": str(secrets_dir / "pipeline")}
        service_env = clean_env(**common_env, LATEST_DB=with_role(request_db, service_role),
                                MLFLOW_TRACKING_USERNAME="service",
                                MLFLOW_TRACKING_PASSWORD_FILE=str(secrets_dir / "service"))
        python = [sys.executable, "-m"]

        def mlflow_run(entry: str, *params: str) -> str:
            return run_logged(["mlflow", "run", str(app), "-e", entry, "--env-manager", "local", *params],
                              env=env, cwd=app).stdout

        # --- data (written by the owner), and two service processes sharing one request log ----------------
        csv = tmp_path / "creditcard.csv"
        run_logged([*python, "training.generate", "--rows", str(REFERENCE_ROWS), "--seed", "7",
                    "--fraud-rate", str(REFERENCE_FRAUD_RATE), "--out", str(csv)], env=env, cwd=app)
        run_logged([*python, "training.import_csv", "--csv", str(csv), "--db", reference_db],
                   env={**env, "REFERENCE_DB": reference_db}, cwd=app)
        urls, services = [], []
        for name in ("service-a", "service-b"):
            port = free_port()
            services.append(start(name, image_command(), env={**service_env, "HOST": "127.0.0.1", "PORT": str(port),
                                                               "WEB_CONCURRENCY": "2", "MODEL_POLL_SECONDS": "1"},
                                  cwd=app, log_dir=tmp_path))
            servers.append(services[-1])
            urls.append(f"http://127.0.0.1:{port}")
        for service, url in zip(services, urls, strict=True):
            wait_until(service, http_ok(f"{url}/health"), "health", timeout=120)
            assert requests.get(f"{url}/ready", timeout=5).status_code == 503  # no model registered yet

        # --- the first model: train, drift (nothing logged yet), promote; both services load it ------
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
        run_logged([*python, "monitoring.simulate", *shift, "--month", "3", "--rows", str(TRAFFIC_ROWS), "--batch",
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
        # modules' own CLIs (the first round used `mlflow run`, as .github/workflows/mlops.yml does),
        # with the pipeline's password from its file ------------------------------------------------------
        run_logged([*python, "monitoring.drift"], env=env_from_files, cwd=app, expect=3)  # 3: drift detected
        check = json.loads((app / "drift_result.json").read_text())
        assert check["drift_detected"] is True, check
        assert workflow_drift_flag(app, tmp_path) == "true"
        assert drift_status_from_dashboard(tracking_db) == 1

        run_logged([*python, "training.train", *TRAIN_FLAGS], env=env_from_files, cwd=app)
        assert registry_version(tracking_uri, "Staging") == "2"
        mlflow_client = client(tracking_uri)
        run_id = mlflow_client.get_model_version(MODEL, "2").run_id
        trained = mlflow_client.get_run(run_id).data
        assert int(trained.params["request_labelled_rows"]) == 2 * TRAFFIC_ROWS
        assert int(trained.metrics["train_rows"] + trained.metrics["eval_rows"]) == REFERENCE_ROWS + 2 * TRAFFIC_ROWS

        run_logged([*python, "monitoring.gate"], env=env_from_files, cwd=app)
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

        # --- what each user may not do on the tracking server ----------------------------------------------
        for user in ("service", "analyst"):
            login = (user, secret[user])
            assert mlflow_api(tracking_uri, "POST", "registered-models/alias", login, name=MODEL, alias="champion",
                              version="1") == 403
            assert mlflow_api(tracking_uri, "POST", "model-versions/transition-stage", login, name=MODEL, version="1",
                              stage="Production", archive_existing_versions=False) == 403
            assert mlflow_api(tracking_uri, "GET", "registered-models/get", login, name=MODEL) == 200
        assert mlflow_api(tracking_uri, "GET", "registered-models/get", ("service", "wrong-password"),
                          name=MODEL) == 401
        assert registry_version(tracking_uri, "Production") == "2"

        # --- the services serve only what the gate approved, as the gate saw it ------------------------------
        # Someone with the pipeline's registry rights (not the gate) alters v2's forest in the artifact store,
        # moves v1 (which the gate promoted, files unchanged: served) to Production and then v2 back.
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "pipeline")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", secret["pipeline"])
        pipeline_client = client(tracking_uri)
        # mlflow-artifacts:/<experiment>/models/<model id>/artifacts, under --artifacts-destination
        forest = {v: tmp_path / "mlartifacts" / pipeline_client.get_model_version_download_uri(MODEL, v).removeprefix(
            "mlflow-artifacts:/") / "model.skops" for v in ("1", "2")}
        shutil.copyfile(forest["1"], forest["2"])

        def ready(url: str) -> dict:
            return requests.get(f"{url}/ready", timeout=5).json()

        def everywhere(holds) -> Callable[[], bool]:
            """`holds(/ready)` on every worker of both services: six answers each, from either worker."""
            return lambda: all(holds(ready(url)) for url in urls for _ in range(6))

        def refusal_of(version: str) -> Callable[[], bool]:
            return everywhere(lambda details: (details["refused"] or {}).get("version") == version)

        move_to_stage(pipeline_client, MODEL, "1", "Production")
        wait_until(services[0], everywhere(lambda details: details["model"]["version"] == "1"), "v1 again",
                   timeout=60)
        move_to_stage(pipeline_client, MODEL, "2", "Production")
        wait_until(services[0], refusal_of("2"), "both services refusing the altered v2", timeout=60)
        assert all("model/model.skops differs from what gate run" in ready(url)["refused"]["error"] for url in urls)
        # A version registered and moved to Production by hand: no gate record at all.
        # v1's files, unchanged, logged again by a run of its own (the server accepts only a run's artifacts).
        files = mlflow.artifacts.download_artifacts(artifact_uri=pipeline_client.get_model_version_download_uri(
            MODEL, "1"), dst_path=str(tmp_path / "copy"), tracking_uri=tracking_uri)
        experiment = pipeline_client.get_run(pipeline_client.get_model_version(MODEL, "1").run_id).info.experiment_id
        copy = pipeline_client.create_run(experiment, run_name="copied by hand").info
        pipeline_client.log_artifacts(copy.run_id, files, "model")
        pipeline_client.set_terminated(copy.run_id)
        ungated = str(pipeline_client.create_model_version(MODEL, f"{copy.artifact_uri}/model", run_id=copy.run_id)
                      .version)
        move_to_stage(pipeline_client, MODEL, ungated, "Production")
        wait_until(services[0], refusal_of(ungated), "both services refusing the ungated version", timeout=60)
        for url in urls:
            details = ready(url)
            assert "has no promotion record from the gate" in details["refused"]["error"]
            assert details["model"]["version"] == "1"
            metrics = requests.get(f"{url}/metrics", headers=auth, timeout=10).text
            assert f"fraud_model_refused_version {float(ungated)}" in metrics

        # --- least privilege on PostgreSQL ------------------------------------------------------------------
        as_service, as_pipeline = with_role(request_db, service_role), with_role(request_db, pipeline_role)
        for url in (as_service, as_pipeline):
            assert denied(url, "DELETE FROM requests")
            assert denied(url, "DROP TABLE requests")
            assert denied(url, "UPDATE requests SET score = 0")
        assert not denied(as_service, 'UPDATE requests SET "Class" = "Class" WHERE false')
        assert not denied(with_role(request_db, archive_role), "DELETE FROM requests WHERE false")
        assert denied(with_role(reference_db, service_role), "SELECT count(*) FROM requests")
        assert denied(with_role(reference_db, pipeline_role), "DELETE FROM requests")

        # What MLflow recorded, read as the analyst: every run's params, tags and metric names, and the
        # registry's tags (the artifacts are files under mlartifacts/, read below with the logs).
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "analyst")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", secret["analyst"])
        analyst = client(tracking_uri)
        experiments = [e.experiment_id for e in analyst.search_experiments()]
        runs = analyst.search_runs(experiments, max_results=1000)
        assert len(runs) >= 6  # two trainings, two drift checks, two gates, and the `mlflow run` project runs
        recorded = [json.dumps([r.data.params, r.data.tags, sorted(r.data.metrics)]) for r in runs]
        with stages_api():
            recorded += [json.dumps(v.tags) for v in analyst.search_model_versions(f"name = '{MODEL}'")]
        recorded.append(json.dumps(analyst.get_registered_model(MODEL).tags))
    finally:
        # Before make_postgres_url drops the databases these processes hold.
        for server in reversed(servers):
            server.stop()
        roles.drop(databases)

    # --- no credential in MLflow's records, in the artifacts, the logs, the outputs or the app's files ------
    credentials = [TOKEN, *secret.values()]
    for path in tmp_path.rglob("*"):  # mlartifacts/ (every artifact), the processes' logs, the app's files
        if path.is_file() and secrets_dir not in path.parents:
            recorded.append(path.read_bytes().decode("latin-1"))
    recorded += outputs
    leaked = [c[:8] for c in credentials if any(c in text for text in recorded)]
    assert not leaked, f"credentials found in what the run recorded: {leaked}"
