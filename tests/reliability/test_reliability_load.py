"""Load against real gunicorn (2 workers, SQLite request log): plain, with workers killed, and with a
promotion in the middle. `--clients`, `--seconds` and `--kills` set their size."""

from __future__ import annotations

import os
import signal
import time
from collections import Counter

import pytest

from common.registry import move_to_stage
from tests.helpers.gunicorn import WORKERS
from tests.helpers.load import Load, Outcome, reconcile, summary
from tests.helpers.processes import wait_gone

pytestmark = pytest.mark.slow

# Fault scenarios keep their load running until the fault's effects are seen, at most this much longer.
SLACK_SECONDS = 120.0


@pytest.mark.scenario("load")
def test_concurrent_clients_get_only_200s_and_the_log_holds_exactly_the_scored_rows(serve, sample_rows, size,
                                                                                    scenario):
    service = serve("load")
    scenario.step("service up")
    with Load(service.url, sample_rows, clients=size.clients, seconds=size.seconds) as load:
        outcomes = load.wait()
    ledger = reconcile(outcomes, service.logged_ids())
    scenario.took(load)
    scenario.rows_lost = len(ledger.lost)

    failures = [o for o in outcomes if not o.ok]
    assert outcomes, "no request was sent"
    assert not failures, f"{len(failures)} requests failed: {summary(failures)}"
    ledger.check(exact=True)


@pytest.mark.scenario("worker kill -9")
def test_a_worker_killed_mid_load_is_replaced_and_only_requests_in_flight_fail(serve, sample_rows, size, scenario):
    """`--kills` workers are killed with SIGKILL, evenly spread over the load: the master replaces
    each, requests keep succeeding, the only failures are requests in flight at a kill (from kill()
    until the worker is gone) and got no answer, the SQLite file passes `PRAGMA integrity_check`, and
    every row reported as scored is logged."""
    kills, clients, seconds = size.kills, size.fault_clients, size.fault_seconds
    scenario.name = f"worker kill -9 (×{kills})"
    service = serve("crash")
    scenario.step("service up")
    kill_times: list[tuple[float, float]] = []
    with Load(service.url, sample_rows, clients=clients, seconds=seconds + SLACK_SECONDS) as load:
        for k in range(kills):
            load.sleep_until(load.started + seconds * (k + 1) / (kills + 1))
            since = kill_times[-1][1] if kill_times else 0.0
            load.wait_for(lambda o, t=since: sum(x.ok and x.started > t for x in o) >= clients,
                          "successful requests before the kill")
            victim = service.busy_worker()
            before = time.monotonic()
            os.kill(victim, signal.SIGKILL)
            kill_times.append((before, wait_gone(victim)))
            scenario.step(f"worker {victim} killed")
            service.wait_for(lambda v=victim: len(w := service.workers()) == WORKERS and v not in w,
                             "the master to replace the killed worker")
            service.wait_for(lambda: sum(service.versions_served().values()) == WORKERS,
                             "the new worker to load the model")
            scenario.step("its replacement serves")
        # On for at least `seconds`, and for a while with the replacement serving.
        load.sleep_until(max(load.started + seconds, time.monotonic() + 2.0))
        outcomes = load.stop()
    service.stop()
    ledger = reconcile(outcomes, service.logged_ids())
    scenario.took(load)
    scenario.faults = len(kill_times)
    scenario.rows_lost = len(ledger.lost)

    def at_a_kill(o: Outcome) -> bool:
        return any(o.started <= after and o.ended >= before for before, after in kill_times)

    failures = [o for o in outcomes if not o.ok]
    in_flight = sum(at_a_kill(o) for o in outcomes)
    scenario.notes.append(f"{len(failures)} failures, {in_flight} requests in flight at the kills")
    stray = [o for o in failures if not at_a_kill(o)]
    assert not stray, (f"{len(stray)} of {len(failures)} failures were not in flight at a kill "
                       f"({in_flight} requests were): {summary(stray)}")
    answered = [o for o in failures if o.status is not None]
    assert not answered, f"a killed worker's requests get no answer, not an error: {summary(answered)}"
    after = [o for o in outcomes if o.started > kill_times[-1][1]] if kill_times else outcomes
    assert after and all(o.ok for o in after), f"after the last kill: {summary(after)}; expected only 200s"
    assert service.integrity() == "ok", f"PRAGMA integrity_check says {service.integrity()!r}"
    ledger.check(exact=False)


@pytest.mark.scenario("hot swap under load")
def test_a_promotion_under_load_moves_answers_to_the_new_version_without_a_failed_request(
        serve, private_registry, serving_registry, sample_rows, size, scenario):
    """Version 2 is promoted while the load runs: no request fails; answers move from version 1 to
    2, and once every worker serves 2 every request gets 2; each logged row names the version that
    scored it."""
    clients, seconds = size.fault_clients, size.fault_seconds
    name, old, new = serving_registry.name, serving_registry.v1.version, serving_registry.v2.version
    service = serve("swap", tracking_uri=private_registry.tracking_uri)
    scenario.step("service up")
    with Load(service.url, sample_rows, clients=clients, seconds=seconds + SLACK_SECONDS) as load:
        load.sleep_until(load.started + seconds / 3)
        load.wait_for(lambda o: sum(x.ok for x in o) >= clients, "successful requests before the promotion")
        promoted = time.monotonic()
        move_to_stage(private_registry.client(), name, new, "Production")
        scenario.step(f"version {new} promoted")
        service.wait_for(lambda: service.versions_served() == {new: WORKERS}, "every worker to serve the new version")
        all_new = time.monotonic()
        scenario.step(f"every worker serves version {new}")
        load.wait_for(lambda o: sum(x.started > all_new for x in o) >= clients, "requests after the swap")
        load.sleep_until(max(load.started + seconds, all_new + 1.0))
        outcomes = load.stop()
    logged = service.logged(("request_id", "model_version"))
    by_id = dict(zip(logged["request_id"], logged["model_version"], strict=True))
    ledger = reconcile(outcomes, set(by_id))
    scenario.took(load)
    scenario.faults = 1
    scenario.rows_lost = len(ledger.lost)
    versions = Counter(o.version for o in outcomes if o.ok)
    scenario.notes.append(f"answers by version: {dict(versions)}")

    failures = [o for o in outcomes if not o.ok]
    assert not failures, f"{len(failures)} requests failed during the swap: {summary(failures)}"
    assert set(versions) == {old, new}, f"versions answered {dict(versions)}; expected {old} then {new}"
    before = {o.version for o in outcomes if o.ok and o.ended < promoted}
    assert before <= {old}, f"before the promotion, versions {before} answered"
    late = Counter(o.version for o in outcomes if o.ok and o.started > all_new)
    assert set(late) == {new}, f"once every worker served {new}, versions {dict(late)} answered"
    mismatched = [rid for o in outcomes if o.ok for rid in o.ids if by_id.get(rid, o.version) != o.version]
    assert not mismatched, f"{len(mismatched)} logged rows name another version than their response"
    ledger.check(exact=True)
