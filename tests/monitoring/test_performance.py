"""The performance check judges the served model from the labels that have matured: a new fraud pattern
is reported as degradation once its chargebacks have arrived, and not before; stable traffic is not."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from common import registry
from common.features import load_feature_config
from common.model import load_bundle
from monitoring import performance as perf
from tests.helpers.builders import (
    MlflowStore,
    ReferenceData,
    TrainedModel,
    build_reference_data,
    new_mlflow_store,
    train_model,
)
from tests.helpers.request_log import deliver_chargebacks, serve_month
from training import scenarios

ROWS = 15_000  # per month, at a 1 % fraud rate: 150 frauds a month


@dataclass(frozen=True)
class World:
    store: MlflowStore
    data: ReferenceData
    model: TrainedModel
    bundle: object


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    root = tmp_path_factory.mktemp("performance")
    data = build_reference_data(root / "reference", rows=40_000, fraud_rate=0.02, seed=3)
    store = new_mlflow_store(root / "mlflow")
    model = train_model(store, data, n_estimators=40, min_train_frauds=20, min_eval_frauds=20)
    registry.move_to_stage(store.client(), model.name, model.version, "Production")
    return World(store, data, model, load_bundle(store.client(), model.name, model.version))


@pytest.fixture
def check(world, tmp_path, use_env, monkeypatch):
    use_env({**world.store.env(), **world.data.env(), "MODEL_NAME": world.model.name})
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    log = str(tmp_path / "requests.db")
    out = tmp_path / "out"

    def run(scenario: scenarios.Scenario, months: range, clock_month: int) -> tuple[int, dict]:
        scaler = load_feature_config(world.data.feature_config)
        served = {m: serve_month(log, world.bundle, scenario, m, scaler) for m in months}
        deliver_chargebacks(log, scenario, served, scenario.month_end(clock_month))
        code = perf.main(["--window", "0", "--as-of", str(scenario.month_end(clock_month)), "--request-log", log,
                          "--output-dir", str(out)])
        return code, json.loads((out / perf.RESULT_FILE).read_text())

    return run


def test_a_new_pattern_is_not_reported_before_its_labels_arrive(check):
    scenario = scenarios.named("new-pattern", rows=ROWS, fraud_rate=1.0)
    code, result = check(scenario, range(1, 4), clock_month=3)
    # Month 3's chargebacks come 30-90 days later: what is known is the old pattern, caught as before.
    assert result["performance_degraded"] != perf.DEGRADED, result["reason"]
    assert code in (perf.EXIT_FINE, perf.EXIT_INCONCLUSIVE)


def test_a_new_pattern_is_reported_once_enough_of_its_labels_have_matured(check, world):
    scenario = scenarios.named("new-pattern", rows=ROWS, fraud_rate=1.0)
    code, result = check(scenario, range(1, 6), clock_month=5)
    assert code == perf.EXIT_DEGRADED, result["reason"]
    assert result["performance_degraded"] == perf.DEGRADED and "recall" in result["reason"]
    run_name = world.store.client().get_run(result["run_id"]).info.run_name
    assert run_name == f"performance · v{world.model.version} · degraded"
    served = result["versions"][world.model.version]["served"]
    assert served["frauds"] >= 30 and served["recall"] < result["tests"]["recall"]["bound"]
    # Legitimate rows older than the 90-day maturity window count as known without a label.
    assert 0 < served["coverage"] < 1 and served["known_rows"] > served["frauds"]


def test_stable_traffic_is_not_reported(check, world):
    scenario = scenarios.named("stable", rows=ROWS, fraud_rate=1.0)
    code, result = check(scenario, range(1, 6), clock_month=5)
    assert code == perf.EXIT_FINE, result["reason"]
    assert result["versions"][world.model.version]["served"]["frauds"] >= 30
    run_name = world.store.client().get_run(result["run_id"]).info.run_name
    assert run_name == f"performance · v{world.model.version} · not degraded"


def test_too_few_matured_frauds_is_inconclusive_and_says_how_many_are_needed(check):
    scenario = scenarios.named("stable", rows=2_000, fraud_rate=1.0)
    code, result = check(scenario, range(1, 3), clock_month=2)
    assert code == perf.EXIT_INCONCLUSIVE
    assert "too few matured frauds" in result["reason"] and "30 needed" in result["reason"]


def test_every_check_is_one_run_with_metrics_by_role_and_version(check, world):
    scenario = scenarios.named("stable", rows=ROWS, fraud_rate=1.0)
    _, result = check(scenario, range(1, 4), clock_month=3)
    client = world.store.client()
    run = client.get_run(result["run_id"])
    assert client.get_experiment(run.info.experiment_id).name == registry.PERFORMANCE_EXPERIMENT
    assert run.data.tags["performance_degraded"] == result["performance_degraded"]
    version = world.model.version
    assert run.data.metrics["champion.recall"] == run.data.metrics[f"v{version}.recall"]
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {perf.RESULT_FILE}


def test_the_challenger_is_judged_on_the_same_rows_from_its_shadow_scores(world, tmp_path, use_env, monkeypatch):
    use_env({**world.store.env(), **world.data.env(), "MODEL_NAME": world.model.name})
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    log = str(tmp_path / "requests.db")
    scenario = scenarios.named("stable", rows=ROWS, fraud_rate=1.0)
    scaler = load_feature_config(world.data.feature_config)
    served = {m: serve_month(log, world.bundle, scenario, m, scaler, shadow=world.bundle) for m in (1, 2)}
    deliver_chargebacks(log, scenario, served, scenario.month_end(4))
    assert perf.main(["--window", "0", "--as-of", str(scenario.month_end(4)), "--request-log", log,
                      "--output-dir", str(tmp_path)]) in (perf.EXIT_FINE, perf.EXIT_INCONCLUSIVE)
    body = json.loads((tmp_path / perf.RESULT_FILE).read_text())["versions"][world.model.version]
    shadow = body["challengers"][world.model.version]
    # The same model in both roles: the same figures on the same rows.
    for metric in ("recall", "precision", "average_precision", "frauds"):
        assert shadow[metric] == pytest.approx(shadow["champion"][metric]) == pytest.approx(body["served"][metric])


def test_known_labels_count_unlabelled_rows_as_legitimate_only_once_mature():
    import pandas as pd

    day = perf.DAY
    frame = pd.DataFrame({"ts": [0.0, 0.0, 50 * day, 80 * day], "Class": [1.0, None, None, 0.0]})
    assert perf.known_labels(frame, as_of=100 * day, maturity_days=90).tolist() == [1, 0, -1, 0]
    assert perf.known_labels(frame, as_of=89 * day, maturity_days=90).tolist() == [1, -1, -1, 0]


def test_a_bad_config_or_time_is_a_usage_error(tmp_path, capsys, use_env, world):
    use_env({**world.store.env(), "MODEL_NAME": world.model.name})
    log = tmp_path / "r.db"
    log.write_bytes(b"")
    bad = tmp_path / "perf.json"
    bad.write_text(json.dumps({"alpha": 2}))
    assert perf.main(["--config", str(bad), "--request-log", str(log)]) == perf.EXIT_USAGE
    assert "alpha" in capsys.readouterr().err
    assert perf.main(["--as-of", "yesterday", "--request-log", str(log)]) == perf.EXIT_USAGE
    assert "--as-of" in capsys.readouterr().err


def test_the_shipped_config_loads():
    config = perf.PerformanceConfig.load(Path(__file__).resolve().parents[2] / "data" / "performance_config.json")
    assert config.maturity_days >= 90 and 0 < config.alpha < 0.05
    assert np.isfinite(config.recall_margin)
