"""A small replay of the loop benchmark on real services: the loop learns a new fraud pattern once its
labels arrive and the service swaps to it, the static policy never changes, and every month is logged."""

from __future__ import annotations

import pytest

from benchmarks import loop
from common import registry
from training import scenarios

MONTHS = 2
ROWS = 5_000


@pytest.fixture(scope="module")
def replayed(tmp_path_factory):
    root = tmp_path_factory.mktemp("replay")
    # Frauds at 2 %, 60 % of them a new pattern from month 1, reported 5-20 days later: by the end of
    # month 1 most of its labels are in, so the loop can learn the pattern and serve it from month 2.
    scenario = scenarios.named("new-pattern", months=MONTHS, rows=ROWS, fraud_rate=2.0, pattern_month=1,
                               pattern_share=0.6, pattern_max=0.6, delay_min_days=5, delay_max_days=20,
                               maturity_days=20, unreported=0.0)
    params = loop.ReplayParams(scenario, ("static", "loop"), reference_rows=15_000, workdir=root / "work")
    results_store = f"sqlite:///{root / 'results.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", results_store)
        mp.setenv("MLFLOW_ARTIFACT_ROOT", str(root / "results"))
        results, _ = loop.replay(params, say=lambda _line: None)
        chart = loop.draw_chart(list(results.values()), params, root / "chart.png")
        loop.log_runs(list(results.values()), params, chart)
    return results, results_store, chart


@pytest.mark.slow
def test_the_static_policy_never_changes_version(replayed):
    results, _, _ = replayed
    static = results["static"]
    assert [m.versions for m in static.months] == ["v1"] * MONTHS and not static.promotions


@pytest.mark.slow
def test_the_loop_promotes_once_the_new_patterns_labels_have_arrived_and_then_catches_it(replayed):
    results, _, _ = replayed
    learned, static = results["loop"], results["static"]
    assert learned.promotions, [m.decision for m in learned.months]
    first_month = learned.promotions[0][0]
    assert first_month >= 1 and learned.months[first_month].versions != "v1"  # the service swapped by itself
    last = learned.months[-1]
    assert last.new_pattern_recall >= static.months[-1].new_pattern_recall + 0.3, (last, static.months[-1])


@pytest.mark.slow
def test_every_month_is_logged_with_its_step_and_the_chart_beside_it(replayed):
    _, store, chart = replayed
    client = registry.client(store)
    experiment = client.get_experiment_by_name(loop.EXPERIMENT)
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(r.data.tags["policy"] for r in runs) == ["loop", "static"]
    assert sorted(r.info.run_name for r in runs) == [f"replay · new-pattern · {policy} · {MONTHS} × {ROWS:,}"
                                                     for policy in ("loop", "static")]
    for run in runs:
        for metric in ("recall", "precision", "average_precision", "fraud_dollars_caught", "version_served"):
            steps = [m.step for m in client.get_metric_history(run.info.run_id, metric)]
            assert sorted(steps) == list(range(1, MONTHS + 1)), (metric, steps)
        assert chart.name in {a.path for a in client.list_artifacts(run.info.run_id)}
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
