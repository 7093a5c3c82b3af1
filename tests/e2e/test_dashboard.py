"""The Grafana dashboard against a real Prometheus scraping a real gunicorn service.

Prometheus and promtool are Debian's package, which `make prometheus` installs (`make test` runs it
first). docker/prometheus/prometheus.yml is used as it stands but for its target (the service on a
loopback port instead of compose's `api` replicas) and the token file's path; the running copy also
scrapes every second instead of every 15, so the test takes seconds. Every PromQL expression of
docker/grafana/dashboards/*.json must then return a number: a renamed or removed metric, label or
label value would leave its panel empty, and fails here.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import requests
import yaml

from common.paths import REPO_ROOT
from common.schema import FEATURES, LABEL
from common.store import RequestStore
from tests.helpers.image import image_command
from tests.helpers.processes import clean_env, free_port, start, wait_until

PROMETHEUS_CONFIG = REPO_ROOT / "docker" / "prometheus" / "prometheus.yml"
DASHBOARDS = sorted((REPO_ROOT / "docker" / "grafana" / "dashboards").glob("*.json"))
TOKEN = "dashboard-test-token"
SCRAPE_SECONDS = 1
# Grafana's range variables, as Grafana would fill them for a dashboard open on the last few minutes.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__range": "5m"}


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: `make prometheus` installs Debian's prometheus package (as root or "
                    "with sudo); `make test` runs it first")
    return path


def dashboard_queries() -> list[tuple[str, str]]:
    """(where, PromQL) for every Prometheus target of every provisioned dashboard, Grafana's variables filled."""
    queries = []
    for path in DASHBOARDS:
        panels = json.loads(path.read_text())["panels"]
        for panel in [*panels, *(p for row in panels for p in row.get("panels", []))]:
            for target in panel.get("targets", []):
                if (target.get("datasource") or panel.get("datasource") or {}).get("type") != "prometheus":
                    continue
                expr = target["expr"]
                for variable, value in GRAFANA_VARIABLES.items():
                    expr = expr.replace(variable, value)
                queries.append((f"{path.name}: {panel['title']} ({target.get('refId')})", expr))
    return queries


def scrape_config(target: str, token_file: Path, scrape_seconds: int | None = None) -> dict:
    """docker/prometheus/prometheus.yml with its target and token path replaced (and its interval, if given)."""
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    (job,) = config["scrape_configs"]
    assert "dns_sd_configs" in job, "the compose config finds the api replicas by DNS; the test replaces that"
    del job["dns_sd_configs"]
    job["static_configs"] = [{"targets": [target]}]
    job["authorization"]["credentials_file"] = str(token_file)
    if scrape_seconds is not None:
        config["global"]["scrape_interval"] = config["global"]["evaluation_interval"] = f"{scrape_seconds}s"
    return config


def query(base: str, promql: str) -> list[dict]:
    answer = requests.get(f"{base}/api/v1/query", params={"query": promql}, timeout=10).json()
    assert answer["status"] == "success", (promql, answer)
    return answer["data"]["result"]


def challenger_version(base: str) -> str | None:
    """The version a worker of the service shadow-scores with (None without a challenger)."""
    challenger = requests.get(f"{base}/version", timeout=5).json()["challenger"]
    return None if challenger is None else str(challenger["model_version"])


def scrapes(base: str) -> float:
    """How many scrapes of the service Prometheus has stored (0 before the first)."""
    result = query(base, 'count_over_time(up{job="fraud-api"}[10m])')
    return float(result[0]["value"][1]) if result else 0.0


@pytest.fixture
def scoring_rows(reference_data) -> list[list[float]]:
    """Frauds and legitimate rows of the reference data, so that both decisions are counted."""
    frame = RequestStore(str(reference_data.db), create=False).read_frame((*FEATURES, LABEL))
    rows = frame.sort_values(LABEL, ascending=False, kind="stable")
    return [*rows.head(20)[list(FEATURES)].to_numpy().tolist(), *rows.tail(20)[list(FEATURES)].to_numpy().tolist()]


@pytest.mark.slow
def test_every_dashboard_query_returns_data_from_a_real_prometheus_scraping_the_service(
        tmp_path, serving_registry, scoring_rows):
    prometheus, promtool = tool("prometheus"), tool("promtool")
    queries = dashboard_queries()
    assert len(queries) >= 22, queries

    token_file = tmp_path / "api_token"
    token_file.write_text(TOKEN + "\n")
    port, prometheus_port = free_port(), free_port()
    env = clean_env(**serving_registry.v1.env(), HOST="127.0.0.1", PORT=str(port), API_TOKEN_FILE=str(token_file),
                    LATEST_DB=str(tmp_path / "requests.db"), MODEL_POLL_SECONDS="1", MLFLOW_DISABLE_TELEMETRY="true",
                    DO_NOT_TRACK="true")
    service = start("service", image_command(), env=env, cwd=REPO_ROOT, log_dir=tmp_path)
    base, auth = f"http://127.0.0.1:{port}", {"Authorization": f"Bearer {TOKEN}"}
    try:
        wait_until(service, lambda: requests.get(f"{base}/ready", timeout=5).status_code == 200, "a loaded model")
        # The shadow panels need a challenger scoring the traffic: the registry's Staging version 2.
        wait_until(service, lambda: challenger_version(base) == serving_registry.v2.version, "a loaded challenger")

        # The shipped config, only its target and token path changed, is valid.
        checked = tmp_path / "prometheus.yml"
        checked.write_text(yaml.safe_dump(scrape_config(f"127.0.0.1:{port}", token_file)))
        check = subprocess.run([promtool, "check", "config", str(checked)], capture_output=True, text=True, timeout=60)
        assert check.returncode == 0, check.stdout + check.stderr

        running = tmp_path / "prometheus-1s.yml"
        running.write_text(yaml.safe_dump(scrape_config(f"127.0.0.1:{port}", token_file, SCRAPE_SECONDS)))
        argv = [prometheus, f"--config.file={running}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{prometheus_port}"]
        server = start("prometheus", argv, env=clean_env(), cwd=tmp_path, log_dir=tmp_path)
        prom = f"http://127.0.0.1:{prometheus_port}"
        try:
            wait_until(server, lambda: requests.get(f"{prom}/-/ready", timeout=5).status_code == 200, "readiness")
            wait_until(server, lambda: scrapes(prom) >= 1, "a first scrape")
            (up,) = query(prom, 'up{job="fraud-api"}')
            targets = requests.get(f"{prom}/api/v1/targets", timeout=10).json()["data"]["activeTargets"]
            assert up["value"][1] == "1", f"Prometheus cannot scrape the service with the token: {targets}"

            # Traffic over several scrapes, so that every rate() sees the counters move: both decisions,
            # both scoring endpoints, refused requests for the error panel, and the challenger's shadow
            # scores (on every scored row) for the shadow panels.
            first = scrapes(prom)
            while scrapes(prom) < first + 4:
                for start_row in range(0, len(scoring_rows), 10):
                    batch = scoring_rows[start_row:start_row + 10]
                    assert requests.post(f"{base}/predict", json={"data": batch}, headers=auth,
                                         timeout=30).status_code == 200
                assert requests.post(f"{base}/invocations", json={"inputs": scoring_rows[:3]}, headers=auth,
                                     timeout=30).status_code == 200
                assert requests.post(f"{base}/predict", json={"data": [[0.0]]}, headers=auth,
                                     timeout=30).status_code == 400
                assert requests.get(f"{base}/metrics", timeout=10).status_code == 401
                time.sleep(0.2)
            wait_until(server, lambda: scrapes(prom) >= first + 6, "two scrapes after the traffic")

            empty = []
            for where, promql in queries:
                values = [float(sample["value"][1]) for sample in query(prom, promql)]
                if not any(math.isfinite(v) for v in values):
                    empty.append(f"{where}: {promql} -> {values or 'no series'}")
            assert not empty, "dashboard queries without data:\n" + "\n".join(empty)
        finally:
            server.stop()

        exposition = requests.get(f"{base}/metrics", headers=auth, timeout=10).text
        lint = subprocess.run([promtool, "check", "metrics"], input=exposition, capture_output=True, text=True,
                              timeout=60)
        assert lint.returncode == 0, lint.stdout + lint.stderr
    finally:
        service.stop()
