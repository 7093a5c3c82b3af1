"""The MLproject entry points `drift`, `promote`, `performance` and `archive`, run through `mlflow run`."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from common import registry
from common.paths import REPO_ROOT
from tests.helpers.processes import clean_env
from tests.helpers.request_log import write_requests

MLFLOW = str(Path(sys.executable).parent / "mlflow")


def _mlflow_run(entry: str, params: dict[str, str], env: dict[str, str], cwd) -> subprocess.CompletedProcess:
    argv = [MLFLOW, "run", str(REPO_ROOT), "-e", entry, "--env-manager", "local"]
    for key, value in params.items():
        argv += ["-P", f"{key}={value}"]
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=600, check=False)


@pytest.mark.slow
def test_drift_then_promote_entry_points_work_with_their_parameters(tmp_path, drift_world, reference_data):
    from tests.helpers.builders import new_mlflow_store, train_model

    store = new_mlflow_store(tmp_path / "mlflow")
    model = train_model(store, reference_data, seed=0)
    log = str(tmp_path / "requests.db")
    write_requests(log, drift_world.batch(1_000, 3, seed=21))
    env = clean_env(**store.env(), **drift_world.env(), LATEST_DB=log, MODEL_NAME=model.name,
                    DRIFT_REFERENCE=str(tmp_path / "drift_reference.parquet"))

    # Drift found: exit_zero (the entry point's default) keeps `mlflow run` green; the file says drift.
    out = {"output_dir": str(tmp_path)}
    checked = _mlflow_run("drift", {"window": "1000", **out}, env, tmp_path)
    assert checked.returncode == 0, checked.stderr[-3000:]
    result = json.loads((tmp_path / "drift_result.json").read_text())
    assert result["drift_detected"] is True and result["window"]["rows"] == 1_000
    # exit_zero=false: the drift exit code makes `mlflow run` fail, as a CI step that branches on it.
    strict = _mlflow_run("drift", {"window": "1000", "exit_zero": "false", **out}, env, tmp_path)
    assert strict.returncode != 0

    promoted = _mlflow_run("promote", {"version": model.version, **out}, {**env, **model.data.env()}, tmp_path)
    assert promoted.returncode == 0, promoted.stdout[-2000:] + promoted.stderr[-3000:]
    client = store.client()
    assert str(registry.production_version(client, model.name).version) == model.version
    decision = json.loads((tmp_path / "promotion_result.json").read_text())
    assert decision["decision"] == "promoted"
    refused = _mlflow_run("promote", {"rollback": "true", **out}, env, tmp_path)
    assert refused.returncode != 0  # no previous version: nothing to roll back to

    # The performance check of the now-served model: no label has arrived, so it cannot judge yet.
    judged = _mlflow_run("performance", {"window": "0", **out}, env, tmp_path)
    assert judged.returncode == 0, judged.stdout[-2000:] + judged.stderr[-3000:]
    verdict = json.loads((tmp_path / "performance_result.json").read_text())
    assert verdict["performance_degraded"] == "inconclusive" and "too few matured frauds" in verdict["reason"]

    # The archive job, its clock 200 days on: every row is old and final (matured), so all 1,000 move
    # to Parquet, and the run is in experiment data-retention with what it did.
    archive = str(tmp_path / "archive")
    later = str(time.time() + 200 * 86_400)
    archived = _mlflow_run("archive", {"as_of": later, "archive_uri": archive}, env, tmp_path)
    assert archived.returncode == 0, archived.stdout[-2000:] + archived.stderr[-3000:]
    runs = client.search_runs([client.get_experiment_by_name("data-retention").experiment_id])
    assert [run.data.metrics["rows_archived"] for run in runs] == [1_000.0]
    assert runs[0].data.metrics["rows_deleted"] == 1_000 and runs[0].data.metrics["bytes_written"] > 0
    assert len(list(Path(archive).rglob("*.parquet"))) >= 1
