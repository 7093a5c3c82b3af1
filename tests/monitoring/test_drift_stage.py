"""The drift check stage: decisions, exit codes, windows, the score test and the MLflow run it logs."""

from __future__ import annotations

import json
import multiprocessing
import subprocess
import sys
import time

import numpy as np
import pytest

from common import registry
from common.paths import REPO_ROOT
from common.schema import FEATURES
from monitoring import drift
from monitoring.reference import write_reference_file
from monitoring.runs import PROMOTED_AT_TAG
from tests.helpers.request_log import write_requests


def _logged_run(env):
    """The run the check wrote into drift_result.json, which must be in experiment drift-monitoring."""
    client = env["store"].client()
    run = client.get_run(_result(env["out"])["run_id"])
    assert client.get_experiment(run.info.experiment_id).name == registry.DRIFT_EXPERIMENT
    return run


def _result(out):
    return json.loads((out / drift.RESULT_FILE).read_text())


def test_no_drift_exits_0_and_logs_one_run_with_params_metrics_tag_and_artifacts(drift_env, drift_world, capsys):
    write_requests(drift_env["log"], drift_world.batch(2_000, 0, seed=1))
    code = drift.main(["--window", "2000", "--output-dir", str(drift_env["out"])])
    assert code == drift.EXIT_NO_DRIFT, capsys.readouterr()
    result = _result(drift_env["out"])
    assert result["drift_detected"] is False and result["status"] == "no_drift"
    assert set(result["feature_pvalues"]) == set(FEATURES)
    run = _logged_run(drift_env)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "drift · window 2,000 · no drift"
    assert run.data.tags["drift_detected"] == "false"
    assert run.data.params["correction"] == "bonferroni" and run.data.params["current_rows"] == "2000"
    assert run.data.params["window"] == "last 2000 rows"
    for feature in FEATURES:
        assert 0.0 <= run.data.metrics[f"ks_pvalue.{feature}"] <= 1.0
        assert 0.0 <= run.data.metrics[f"ks_stat.{feature}"] <= 1.0
    assert run.data.metrics["drifted_count"] == 0 and run.data.metrics["drifted_share"] == 0
    artifacts = {a.path for a in drift_env["store"].client().list_artifacts(run.info.run_id)}
    assert artifacts == {drift.RESULT_FILE, drift.REPORT_FILE}
    assert result["run_id"] == run.info.run_id


def test_drifted_traffic_exits_3_names_the_drifted_features_and_reports_them(drift_env, drift_world):
    write_requests(drift_env["log"], drift_world.batch(2_000, 3, seed=2))
    code = drift.main(["--window", "2000", "--output-dir", str(drift_env["out"])])
    assert code == drift.EXIT_DRIFT
    result = _result(drift_env["out"])
    assert result["drift_detected"] is True and "Amount_scaled" in result["drifted_features"]
    run = _logged_run(drift_env)
    assert run.data.tags["drift_detected"] == "true"
    assert run.info.run_name == "drift · window 2,000 · drift"
    assert run.data.metrics["drifted_count"] == len(result["drifted_features"]) >= 1
    html = (drift_env["out"] / drift.REPORT_FILE).read_text()
    assert "Amount_scaled — DRIFT" in html and html.count("<svg") == min(6, len(FEATURES))
    assert "<polyline" in html


def test_too_few_rows_is_inconclusive_exits_4_and_is_still_logged(drift_env, drift_world):
    write_requests(drift_env["log"], drift_world.batch(120, 3, seed=3))
    code = drift.main(["--output-dir", str(drift_env["out"])])
    assert code == drift.EXIT_INCONCLUSIVE
    result = _result(drift_env["out"])
    assert result["drift_detected"] is None and result["status"] == "inconclusive"
    assert "120 rows" in result["reason"] and "min_window_rows=500" in result["reason"]
    run = _logged_run(drift_env)
    assert run.data.tags["drift_detected"] == "inconclusive" and run.info.status == "FINISHED"
    assert run.info.run_name == "drift · window 120 · inconclusive"


def test_exit_zero_reports_drift_in_the_file_but_exits_0(drift_env, drift_world):
    write_requests(drift_env["log"], drift_world.batch(1_000, 3, seed=4))
    code = drift.main(["--window", "1000", "--exit-zero", "true", "--output-dir", str(drift_env["out"])])
    assert code == 0
    assert _result(drift_env["out"])["drift_detected"] is True


def test_since_keeps_only_rows_logged_after_the_time(drift_env, drift_world):
    now = time.time()
    write_requests(drift_env["log"], drift_world.batch(1_000, 4, seed=5), ts=now - 7200 + np.arange(1_000),
                   prefix="old")
    write_requests(drift_env["log"], drift_world.batch(1_000, 0, seed=6), ts=now - 600 + np.arange(1_000) / 10,
                   prefix="new")
    since = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now - 1800))
    code = drift.main(["--window", "0", "--since", since, "--output-dir", str(drift_env["out"])])
    assert code == drift.EXIT_NO_DRIFT
    assert _result(drift_env["out"])["window"]["rows"] == 1_000
    # Without --since the old drifted rows are in the window.
    assert drift.main(["--window", "0", "--output-dir", str(drift_env["out"])]) == drift.EXIT_DRIFT


def test_score_distribution_drift_is_detected_when_features_are_unchanged(drift_env, drift_world, tmp_path):
    rng = np.random.default_rng(8)
    reference = drift_world.batch(3_000, 0, seed=7)
    reference_file = tmp_path / "reference.parquet"
    write_reference_file(reference, rng.beta(0.5, 30, len(reference)), reference_file, model_name="fraud-detector",
                         model_version="7", run_id=None, source="test")
    window = drift_world.batch(2_000, 0, seed=8)
    write_requests(drift_env["log"], window, scores=rng.beta(0.5, 8, len(window)), model_version="7")
    code = drift.main(["--window", "2000", "--reference", "file", "--reference-file", str(reference_file),
                       "--output-dir", str(drift_env["out"])])
    assert code == drift.EXIT_DRIFT
    result = _result(drift_env["out"])
    assert result["drifted_features"] == ["score"]
    assert result["score_test"] is True and result["n_current"]["score"] == 2_000
    assert result["threshold"] == pytest.approx(0.01 / (len(FEATURES) + 1))
    run = _logged_run(drift_env)
    assert "ks_stat.score" in run.data.metrics


def test_score_test_uses_only_rows_scored_by_the_reference_model_version(drift_env, drift_world, tmp_path):
    rng = np.random.default_rng(9)
    reference = drift_world.batch(3_000, 0, seed=9)
    reference_file = tmp_path / "reference.parquet"
    write_reference_file(reference, rng.beta(0.5, 30, len(reference)), reference_file, model_name="fraud-detector",
                         model_version="7", run_id=None, source="test")
    window = drift_world.batch(2_000, 0, seed=10)
    versions = np.where(np.arange(2_000) % 2 == 0, "7", "8")
    # Version 8 scores differently; only version 7's rows may be compared with version 7's reference.
    scores = np.where(versions == "7", rng.beta(0.5, 30, 2_000), rng.beta(5, 2, 2_000))
    write_requests(drift_env["log"], window, scores=scores, model_version=versions)
    code = drift.main(["--window", "2000", "--reference", "file", "--reference-file", str(reference_file),
                       "--output-dir", str(drift_env["out"])])
    result = _result(drift_env["out"])
    assert code == drift.EXIT_NO_DRIFT, result["reason"]
    assert result["n_current"]["score"] == 1_000
    assert any("scored by v7" in note for note in result["notes"])


def test_invalid_config_exits_2_and_replaces_a_stale_result(drift_env, drift_world, tmp_path):
    write_requests(drift_env["log"], drift_world.batch(600, 0, seed=12))
    out = drift_env["out"]
    out.mkdir(parents=True)
    (out / drift.RESULT_FILE).write_text(json.dumps({"drift_detected": True}))
    config = tmp_path / "drift_config.json"
    body = json.loads((drift.settings.drift_config_path()).read_text())
    config.write_text(json.dumps({**body, "features": ["V1", "Amount"]}))
    assert drift.main(["--config", str(config), "--output-dir", str(out)]) == drift.EXIT_USAGE
    result = _result(out)
    assert result["status"] == "error" and result["drift_detected"] is None and "Amount" in result["reason"]
    assert drift.main(["--correction", "holm", "--output-dir", str(out)]) == drift.EXIT_USAGE


def test_missing_request_log_is_an_error_exit_1(drift_env, tmp_path):
    code = drift.main(["--request-log", str(tmp_path / "absent.db"), "--output-dir", str(drift_env["out"])])
    assert code == drift.EXIT_ERROR
    assert "does not exist" in _result(drift_env["out"])["reason"]


def test_a_check_that_fails_after_its_run_started_is_a_failed_run_named_so(drift_env, drift_world):
    write_requests(drift_env["log"], drift_world.batch(600, 0, seed=16))
    code = drift.main(["--reference", "production", "--output-dir", str(drift_env["out"])])
    assert code == drift.EXIT_ERROR
    result = _result(drift_env["out"])
    assert "needs a Production model" in result["reason"]
    run = _logged_run(drift_env)
    assert run.info.status == "FAILED" and run.info.run_name == "drift · error"


def test_since_promotion_without_production_is_a_usage_error(drift_env, drift_world):
    write_requests(drift_env["log"], drift_world.batch(600, 0, seed=13))
    assert drift.main(["--since", "promotion", "--output-dir", str(drift_env["out"])]) == drift.EXIT_USAGE


def test_since_promotion_keeps_only_rows_logged_after_the_production_versions_promotion(
        drift_env, drift_world, make_mlflow_store, use_env, tmp_path):
    # The one window that waits for the registry before it is read (docs/decisions/020-drift-check-start-up-and-ks.md).
    store = make_mlflow_store()
    use_env(store.env())
    client = store.client()
    client.create_registered_model("fraud-detector")
    source = tmp_path / "model"
    source.mkdir()
    version = client.create_model_version("fraud-detector", str(source)).version
    registry.move_to_stage(client, "fraud-detector", version, "Production")
    now = time.time()
    client.set_model_version_tag("fraud-detector", version, PROMOTED_AT_TAG, str(now - 1800))
    write_requests(drift_env["log"], drift_world.batch(1_000, 4, seed=5), ts=now - 7200 + np.arange(1_000),
                   prefix="old")
    write_requests(drift_env["log"], drift_world.batch(1_000, 0, seed=6), ts=now - 600 + np.arange(1_000) / 10,
                   prefix="new")
    code = drift.main(["--window", "0", "--since", "promotion", "--reference", "db",
                       "--output-dir", str(drift_env["out"])])
    assert code == drift.EXIT_NO_DRIFT
    result = _result(drift_env["out"])
    assert result["window"]["rows"] == 1_000 and result["window"]["since_ts"] == pytest.approx(now - 1800)


def test_the_check_starts_without_mlflow_or_scipy_so_its_readers_fork_before_those_imports():
    # Both used to load before the read started (docs/decisions/020-drift-check-start-up-and-ks.md).
    code = "import sys, monitoring.drift; print(sorted({'mlflow', 'scipy.stats'} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
                          check=True)
    assert done.stdout.strip() == "[]"


def test_a_check_that_fails_after_its_window_started_reading_leaves_no_reader_behind(drift_env, drift_world,
                                                                                    use_env, tmp_path):
    write_requests(drift_env["log"], drift_world.batch(1_000, 0, seed=14))
    broken = tmp_path / "tracking.db"
    broken.write_text("not a database")
    use_env({"MLFLOW_TRACKING_URI": f"sqlite:///{broken}"})
    # --window 0 (no row limit): the window is read by forked readers, started before the registry is asked.
    assert drift.main(["--window", "0", "--output-dir", str(drift_env["out"])]) == drift.EXIT_ERROR
    assert multiprocessing.active_children() == []
    assert _result(drift_env["out"])["status"] == "error"


def test_fdr_correction_and_p_val_override_are_logged(drift_env, drift_world):
    write_requests(drift_env["log"], drift_world.batch(1_000, 0, seed=14))
    code = drift.main(["--window", "1000", "--correction", "fdr", "--p-val", "0.05",
                       "--output-dir", str(drift_env["out"])])
    assert code == drift.EXIT_NO_DRIFT
    run = _logged_run(drift_env)
    assert run.data.params["correction"] == "fdr" and run.data.params["p_val"] == "0.05"


def test_under_mlflow_run_the_check_gets_its_own_run_linked_to_the_project_run(drift_env, drift_world, monkeypatch):
    client = drift_env["store"].client()
    project_run = client.create_run(registry.ensure_experiment("Default-project")).info.run_id
    monkeypatch.setenv("MLFLOW_RUN_ID", project_run)
    write_requests(drift_env["log"], drift_world.batch(600, 0, seed=15))
    assert drift.main(["--window", "600", "--output-dir", str(drift_env["out"])]) == drift.EXIT_NO_DRIFT
    run = _logged_run(drift_env)
    assert run.data.tags["mlflow_project_run_id"] == project_run
    assert client.get_run(project_run).data.tags[f"{registry.DRIFT_EXPERIMENT}_run_id"] == run.info.run_id


@pytest.mark.postgres
def test_request_log_in_postgresql_is_read_the_same_way(drift_env, drift_world, postgres_url):
    write_requests(postgres_url, drift_world.batch(1_500, 3, seed=16))
    code = drift.main(["--window", "1500", "--request-log", postgres_url, "--output-dir", str(drift_env["out"])])
    assert code == drift.EXIT_DRIFT
    result = _result(drift_env["out"])
    assert result["window"]["rows"] == 1_500 and "Amount_scaled" in result["drifted_features"]
    assert "postgresql" in result["request_log"]
