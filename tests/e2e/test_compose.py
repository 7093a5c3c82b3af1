"""docker/compose.yaml's wiring, read as data (no Docker engine runs here): the services, the ports
they publish, the token secret, and the files that provision Prometheus and Grafana, down to the
datasource uids the dashboards use. tests/e2e/test_dashboard.py runs the Prometheus side for real.

The file needs Compose v2 (`docker compose`): its top-level `name:` and its secret read from an
environment variable are refused by `docker-compose` 1.29.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import sqlalchemy as sa
import yaml

from common.paths import REPO_ROOT
from tests.helpers.image import runtime_stage

DOCKER = REPO_ROOT / "docker"
COMPOSE = DOCKER / "compose.yaml"
PROMETHEUS = DOCKER / "prometheus" / "prometheus.yml"
GRAFANA = DOCKER / "grafana"
DASHBOARDS = sorted((GRAFANA / "dashboards").glob("*.json"))
SECRET_FILE = "/run/secrets/api_token"
# Where the images read their configuration (prom/prometheus and grafana/grafana defaults).
PROMETHEUS_CONFIG_PATH = "/etc/prometheus/prometheus.yml"
GRAFANA_PROVISIONING_PATH = "/etc/grafana/provisioning"


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def mounts(service: dict) -> dict[str, tuple[Path, str]]:
    """A service's bind mounts of files in the repository: container path -> (host path, options)."""
    found = {}
    for volume in service.get("volumes", []):
        source, target, *options = volume.split(":")
        if source.startswith("."):
            found[target] = ((DOCKER / source).resolve(), ",".join(options))
    return found


def published(service: dict) -> list[tuple[str, str, str]]:
    """(host address, host port or range, container port) of each `ports` entry; the address is ""
    where the entry binds every interface."""
    found = []
    for entry in service.get("ports", []):
        if isinstance(entry, dict):  # the long syntax
            found.append((entry.get("host_ip", ""), str(entry.get("published", "")), str(entry["target"])))
            continue
        parts = str(entry).split(":")  # [[host:]host_port:]container_port
        found.append((parts[0] if len(parts) == 3 else "", parts[-2] if len(parts) > 1 else "", parts[-1]))
    return found


def dashboard_datasources() -> set[tuple[str, str]]:
    """(type, uid) of every datasource a panel or target of a provisioned dashboard names."""
    used = set()
    for path in DASHBOARDS:
        panels = json.loads(path.read_text())["panels"]
        for panel in [*panels, *(p for row in panels for p in row.get("panels", []))]:
            for item in [panel, *panel.get("targets", [])]:
                source = item.get("datasource")
                if source is not None:
                    used.add((source["type"], source["uid"]))
    return used


def test_compose_runs_the_five_services_under_one_project_name(compose):
    assert compose["name"] == "fraud-detection"
    services = compose["services"]
    assert set(services) == {"postgres", "db-tables", "db-roles", "mlflow", "mlflow-users", "api", "pipeline",
                             "prometheus", "grafana"}
    for name, service in services.items():
        depends = service.get("depends_on", {})
        assert set(depends) <= set(services) - {name}, (name, depends)


def test_every_published_port_is_bound_to_loopback_only(compose):
    ports = {name: published(service) for name, service in compose["services"].items()}
    assert all(host == "127.0.0.1" for entries in ports.values() for host, _, _ in entries), ports
    assert "ports" not in compose["services"]["postgres"]
    # One host port per api replica, each to the port the image serves on.
    (api,) = ports["api"]
    first, last = (int(p) for p in api[1].split("-"))
    assert last - first + 1 == compose["services"]["api"]["deploy"]["replicas"]
    assert api[2] == runtime_stage().env()["PORT"]
    assert ports["mlflow"] == [("127.0.0.1", "5500", "5000")]
    assert ports["prometheus"] == [("127.0.0.1", "9090", "9090")]
    assert ports["grafana"] == [("127.0.0.1", "3000", "3000")]


def test_the_token_secret_is_mounted_where_the_api_and_prometheus_read_it(compose):
    services = compose["services"]
    api, prometheus = services["api"], services["prometheus"]
    assert compose["secrets"]["api_token"] == {"environment": "API_TOKEN"}
    assert [name for name, service in services.items() if "api_token" in service.get("secrets", ())] == \
        ["api", "prometheus"]
    assert prometheus["secrets"] == ["api_token"]
    assert api["environment"]["API_TOKEN_FILE"] == SECRET_FILE
    (job,) = yaml.safe_load(PROMETHEUS.read_text())["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    assert job["authorization"] == {"type": "Bearer", "credentials_file": SECRET_FILE}
    (sd,) = job["dns_sd_configs"]
    assert sd["names"] == ["api"] and sd["port"] == int(runtime_stage().env()["PORT"])
    assert api["deploy"]["replicas"] >= 2


def test_prometheus_reads_the_repositorys_config_read_only(compose):
    config = mounts(compose["services"]["prometheus"])
    assert config[PROMETHEUS_CONFIG_PATH] == (PROMETHEUS.resolve(), "ro")


def test_grafana_provisions_the_repositorys_datasources_and_dashboards(compose):
    grafana = compose["services"]["grafana"]
    mounted = mounts(grafana)
    assert mounted[GRAFANA_PROVISIONING_PATH] == ((GRAFANA / "provisioning").resolve(), "ro")
    providers = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "dashboards.yaml").read_text())
    (provider,) = providers["providers"]
    assert mounted[provider["options"]["path"]] == ((GRAFANA / "dashboards").resolve(), "ro")
    assert DASHBOARDS, "no dashboard to provision"
    # Every mounted repository path exists, in every service.
    for name, service in compose["services"].items():
        for target, (source, _) in mounts(service).items():
            assert source.exists(), f"{name} mounts {source} at {target}, which does not exist"


def test_the_dashboards_use_exactly_the_provisioned_datasources_and_those_reach_their_services(compose):
    provisioned = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "datasources.yaml").read_text())
    by_uid = {d["uid"]: d for d in provisioned["datasources"]}
    assert dashboard_datasources() == {(d["type"], uid) for uid, d in by_uid.items()}
    services = compose["services"]
    assert by_uid["prometheus"]["url"] == "http://prometheus:9090"
    assert published(services["prometheus"])[0][2] == "9090"
    store = by_uid["mlflow-store"]
    assert store["url"] == "postgres:5432"
    assert store["jsonData"]["database"] == services["postgres"]["environment"]["POSTGRES_DB"]
    # The read-only role the drift panel logs in with, and its password, come from the same variable.
    assert store["secureJsonData"]["password"] == "$GRAFANA_DB_PASSWORD"
    assert "GRAFANA_DB_PASSWORD" in services["grafana"]["environment"]
    assert "GRAFANA_DB_PASSWORD" in services["postgres"]["environment"]
    assert f"CREATE ROLE {store['user']} LOGIN" in (DOCKER / "postgres" / "init-databases.sh").read_text()


def test_each_component_logs_in_as_its_own_user_and_role(compose):
    services, secrets = compose["services"], compose["secrets"]
    mlflow = services["mlflow"]
    assert "--app-name=basic-auth" in mlflow["command"]
    assert mlflow["environment"]["MLFLOW_AUTH_CONFIG_PATH"] == "/app/docker/mlflow/basic_auth.ini"
    assert "NO_PERMISSIONS" in (DOCKER / "mlflow" / "basic_auth.ini").read_text()
    # The admin's password and the CSRF key come from the operator's environment, never from a file here.
    assert mlflow["environment"]["MLFLOW_AUTH_ADMIN_PASSWORD"].startswith("${MLFLOW_ADMIN_PASSWORD:?")
    assert mlflow["environment"]["MLFLOW_FLASK_SERVER_SECRET_KEY"].startswith("${MLFLOW_FLASK_SECRET:?")
    assert any(v.endswith(":/app/mlauth") for v in mlflow["volumes"]) and mlflow["working_dir"] == "/app/mlauth"
    users = {"api": "service", "pipeline": "pipeline", "mlflow-users": "admin"}
    for name, user in users.items():
        env = services[name]["environment"]
        assert env["MLFLOW_TRACKING_USERNAME"] == user
        if user != "admin":
            path = env["MLFLOW_TRACKING_PASSWORD_FILE"]
            secret = path.removeprefix("/run/secrets/")
            assert secret in services[name]["secrets"]
            assert secrets[secret] == {"environment": f"{user.upper()}_MLFLOW_PASSWORD"}
    assert services["mlflow-users"]["command"] == ["python", "-m", "monitoring.access"]
    roles = {"api": "fraud_service", "pipeline": "fraud_pipeline"}
    for name, role in roles.items():
        for key in ("LATEST_DB", "REFERENCE_DB"):
            if key in services[name]["environment"]:
                assert sa.make_url(services[name]["environment"][key]).username == role
    assert "REFERENCE_DB" not in services["api"]["environment"]
    assert sa.make_url(mlflow["environment"]["MLFLOW_BACKEND_STORE_URI"]).username == "mlflow"
    assert any(v.startswith("./postgres/roles.sql:") for v in services["db-roles"]["volumes"])
    for name in ("api", "pipeline"):
        assert services[name]["depends_on"]["db-roles"] == {"condition": "service_completed_successfully"}
        assert services[name]["depends_on"]["mlflow-users"] == {"condition": "service_completed_successfully"}
    assert services["pipeline"]["profiles"] == ["pipeline"]


def test_compose_runs_mlflow_on_postgresql_with_proxied_artifacts(compose):
    mlflow = compose["services"]["mlflow"]
    assert mlflow["command"][:2] == ["mlflow", "server"]
    assert "--serve-artifacts" in mlflow["command"]
    (destination,) = [a.split("=", 1)[1] for a in mlflow["command"] if a.startswith("--artifacts-destination=")]
    assert any(volume.endswith(f":{destination}") for volume in mlflow["volumes"])
    assert mlflow["environment"]["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql+psycopg://")
    # Without MLflow's server-side job runners, which nothing here uses (decision 032).
    assert mlflow["environment"]["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
    assert compose["services"]["api"]["environment"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert compose["services"]["api"]["environment"]["LATEST_DB"].startswith("postgresql://")
    init = (DOCKER / "postgres" / "init-databases.sh").read_text()
    assert "CREATE DATABASE requests;" in init


def test_only_the_request_logs_sessions_commit_without_waiting_for_the_disk(compose):
    # docs/decisions/019-postgresql-copy-and-synchronous-commit.md: the trade is the request log's alone.
    api = compose["services"]["api"]["environment"]
    assert sa.make_url(api["LATEST_DB"]).query == {"options": "-c synchronous_commit=off"}
    assert not sa.make_url(compose["services"]["pipeline"]["environment"]["REFERENCE_DB"]).query
    assert "synchronous_commit" not in compose["services"]["mlflow"]["environment"]["MLFLOW_BACKEND_STORE_URI"]
    assert "synchronous_commit" not in (DOCKER / "postgres" / "init-databases.sh").read_text()


def test_the_file_says_it_needs_compose_v2_because_it_uses_what_v1_refuses(compose):
    assert "name" in compose and any("environment" in s for s in compose["secrets"].values())
    header = COMPOSE.read_text().split("\nname:", 1)[0]
    assert "Compose v2" in header and "docker-compose 1.29" in header
