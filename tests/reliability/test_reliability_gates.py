"""The promotion gate in trouble, for rounds: gates started together, and gates killed (SIGKILL) in the
middle of a promotion or a rollback while a real service serves the registry under load. `--kills`
sets the rounds of each (tests/monitoring has the single cases, step by step)."""

from __future__ import annotations

import contextlib
import io
import time
from collections import Counter
from dataclasses import dataclass

import pytest

from monitoring import gate
from tests.helpers.gates import GateWorld, gate_world, start_gate
from tests.helpers.gunicorn import WORKERS
from tests.helpers.load import Load, Outcome, reconcile, summary
from tests.helpers.processes import clean_env
from tests.helpers.service import POLL_SECONDS

pytestmark = pytest.mark.slow

# A gate that waits this long for the lock outlasts any other gate's decision on a busy machine.
PATIENT_SECONDS = 300.0
# A gate this impatient usually gives up while the other decides (exit 4), unless it got the lock first.
IMPATIENT_SECONDS = 0.5
# How long the service may take to serve a new champion: a poll of the registry and a model load.
SWAP_SECONDS = 60.0
# After a kill, the split registry is served this long before the next gate: many polls of the registry,
# so that a service about to move to another version than the champion has done so.
HOLD_SECONDS = 10 * POLL_SECONDS
# Load keeps running until the rounds are done, at most this long.
SLACK_SECONDS = 600.0
# Each client of the killed-gate scenario waits this long after each answer: some fifty answers a second
# show what the service serves, and leave the cores to the gates.
PAUSE_SECONDS = 0.02


def _other(version: str) -> str:
    return "2" if version == "1" else "1"


def _check_settled(world: GateWorld, champion: str, previous: str) -> None:
    """The registry after a complete promotion or rollback: one Production version, the champion."""
    assert world.production() == [champion], f"stages {world.stages()}; only v{champion} may be Production"
    assert (world.alias("champion"), world.alias("previous")) == (champion, previous), (
        f"champion v{world.alias('champion')}, previous v{world.alias('previous')}; expected v{champion}, v{previous}")
    assert world.intent() is None, f"an intent was left behind: {world.intent()}"


@pytest.mark.scenario("two gates at once")
def test_two_gates_started_together_promote_exactly_once_in_every_round(serving_registry, size, scenario, tmp_path,
                                                                        request):
    """Each round, two gate processes start together to promote the version that is not the champion
    (v2, then v1, ...), with the gate lock in a SQLite request log's lock file and, every other round,
    in a PostgreSQL request log (an advisory lock). Exactly one promotes. The other waits for the lock
    and then finds the version Production already (exit 2); when it waits only IMPATIENT_SECONDS (every
    other round) it may give up instead (exit 4). It never promotes a second time, and never "repairs"
    the first gate's promotion in progress. Each round ends with one Production version, the champion."""
    rounds = size.kills
    scenario.name = f"two gates at once (×{rounds})"
    world = gate_world(serving_registry, tmp_path)
    logs = [world.env["LATEST_DB"]]
    if rounds > 1:
        logs.append(request.getfixturevalue("postgres_url"))
    losers: Counter = Counter()
    for r in range(rounds):
        old = world.alias("champion")
        new = _other(old)
        env = clean_env(**{**world.env, "LATEST_DB": logs[r % len(logs)]})
        waits = (PATIENT_SECONDS, PATIENT_SECONDS if r % 2 else IMPATIENT_SECONDS)
        gates = [start_gate(f"round-{r}-{label}", env, tmp_path / f"round-{r}-{label}", "--version", new,
                            "--reason", "manual", "--lock-wait", f"{wait:g}", reference_file=world.reference_file)
                 for label, wait in zip("ab", waits, strict=True)]
        try:
            codes = [g.process.wait(PATIENT_SECONDS + 60) for g in gates]
        finally:
            for g in gates:
                g.stop()
        outputs = "\n".join(f"--- {g.name} (exit {g.process.returncode}):\n{g.output()}" for g in gates)
        lock = "PostgreSQL" if logs[r % len(logs)].startswith("postgresql") else "SQLite"
        scenario.step(f"round {r} (gate lock in the {lock} request log): exits {codes}")
        assert sorted(codes) in ([gate.EXIT_PASSED, gate.EXIT_USAGE], [gate.EXIT_PASSED, gate.EXIT_BUSY]), outputs
        assert "repaired" not in outputs, f"a gate took the other's promotion in progress for a crash:\n{outputs}"
        loser = max(codes)
        expected = "is already Production" if loser == gate.EXIT_USAGE else "gate: gave up: another promotion"
        assert expected in outputs, outputs
        losers[loser] += 1
        _check_settled(world, champion=new, previous=old)
        scenario.faults += 1
    scenario.notes.append(f"one promotion in each round of two gates; the other waited, then found it done: "
                          f"{losers[gate.EXIT_USAGE]}, gave up after {IMPATIENT_SECONDS:g} s (exit 4): "
                          f"{losers[gate.EXIT_BUSY]}")


@dataclass(frozen=True)
class Epoch:
    """A stretch of time and the versions the service may answer with during it."""

    start: float
    end: float
    allowed: frozenset[str]


# Each round's gate is killed after one step, in turn, alternating a promotion and a rollback (the first
# round has no `previous` to roll back to): any three rounds in a row cover every step. The first kill
# leaves v1 and v2 in stage Production and the champion still on v1, which a service that followed the
# stage instead of the alias would not serve (docs/decisions/017-watcher-follows.md).
KILL_POINTS = (("promote", "stage"), ("rollback", "alias"), ("promote", "reference"),
               ("rollback", "stage"), ("promote", "alias"), ("rollback", "reference"))


@pytest.mark.scenario("gate killed mid-promotion")
def test_a_gate_killed_at_each_step_is_repaired_by_the_next_and_the_service_serves_only_the_champion(
        serving_registry, serve, sample_rows, size, scenario, tmp_path, monkeypatch):
    """Round after round, a gate is killed with SIGKILL after one step of a promotion or a rollback
    (KILL_POINTS in turn: after the stage change, after alias champion moved, after the drift reference
    was refreshed), and the next gate repairs the split and finishes the job: before the commit point
    (alias champion) the same command again, after it a promotion of the version the killed gate made
    champion, which finds nothing left to decide (exit 2; a second rollback would roll back again).
    Meanwhile a real service serves the registry under load.

    - After each kill and each repair, the service serves the champion (a Production version), once
      it has polled the registry, and only the champion until the next gate starts: before the commit
      point (alias champion) that is the old version, whichever versions are in stage Production.
    - While a gate runs, it answers with versions that were Production or champion just before or after.
    - The repairing gate says what it repaired, the killed run is marked KILLED, and the registry ends
      with one Production version, the champion, and `previous` the version it replaced.
    - No request fails, and the log holds exactly the rows the answers reported.
    """
    rounds = size.kills
    clients = max(2, size.clients // 4)
    scenario.name = f"gate killed mid-promotion (×{rounds})"
    world = gate_world(serving_registry, tmp_path)
    world.apply(monkeypatch)  # the repairing gate runs in this process
    service = serve("gate-kill", tracking_uri=world.store.tracking_uri)
    scenario.step("service up")
    epochs: list[Epoch] = []
    scenario.repairs = 0

    def servable() -> frozenset[str]:
        return frozenset({*world.production(), world.alias("champion")})

    def settle(since: float, before: frozenset[str]) -> float:
        """Wait until every worker serves the champion; the time from `since` to then is a transition."""
        champion = world.alias("champion")
        assert champion in world.production(), f"champion v{champion} is not in stage Production: {world.stages()}"
        service.wait_for(lambda: service.versions_served() == {champion: WORKERS},
                         f"every worker to serve the champion v{champion}", timeout=SWAP_SECONDS)
        settled = time.monotonic()
        epochs.append(Epoch(since, settled, before | servable()))
        return settled

    with Load(service.url, sample_rows, clients=clients, seconds=SLACK_SECONDS, pause=PAUSE_SECONDS) as load:
        mark = settle(load.started, servable())
        for r in range(rounds):
            action, step = KILL_POINTS[r % len(KILL_POINTS)]
            old = world.alias("champion")
            new = _other(old)
            promote = ("--version", new, "--reason", "manual")
            args = promote if action == "promote" else ("--rollback", "true")
            load.wait_for(lambda o, t=mark: sum(x.ok and x.started > t for x in o) >= clients,
                          f"answers with the champion v{old} before round {r}")
            before, started = servable(), time.monotonic()
            epochs.append(Epoch(mark, started, frozenset({old})))

            scenario.step(f"round {r}: the answers are v{old}'s")
            killed = world.killed_gate(step, *args)
            scenario.faults += 1
            scenario.step(f"round {r}: {action} to v{new} killed after step {step!r}")
            assert world.alias("champion") == (old if step == "stage" else new), (
                f"after a kill at {step!r}: champion v{world.alias('champion')}, stages {world.stages()}")
            split = settle(started, before)
            champion = world.alias("champion")
            scenario.step(f"round {r}: every worker serves v{champion}")
            load.sleep_until(split + HOLD_SECONDS)
            load.wait_for(lambda o, t=split: sum(x.ok and x.started > t for x in o) >= clients,
                          f"answers with the champion v{champion} after the kill")
            assert service.versions_served() == {champion: WORKERS}, (
                f"with the registry split (stages {world.stages()}, champion v{champion}) the workers serve "
                f"{service.versions_served()}")

            before, repairing = servable(), time.monotonic()
            epochs.append(Epoch(split, repairing, frozenset({champion})))
            out, err = io.StringIO(), io.StringIO()
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                code = gate.main(world.gate_args(*(args if step == "stage" else promote)))
            said = f"{out.getvalue()}\n{err.getvalue()}"
            repairs = [line for line in out.getvalue().splitlines() if line.startswith("gate: repaired: ")]
            scenario.repairs += len(repairs)
            scenario.step(f"round {r}: the next gate exited {code} after {len(repairs)} repairs")
            # Before the commit point the repair undoes the stage change and the gate decides again; after
            # it the repair completes the promotion, and the gate finds nothing left to decide.
            assert code == (gate.EXIT_PASSED if step == "stage" else gate.EXIT_USAGE), said
            assert any(f"run {killed} marked KILLED" in line for line in repairs), said
            assert world.client.get_run(killed).info.status == "KILLED"
            _check_settled(world, champion=new, previous=old)
            mark = settle(repairing, before)
            scenario.step(f"round {r}: every worker serves v{new}")
        load.wait_for(lambda o, t=mark: sum(x.ok and x.started > t for x in o) >= clients,
                      "answers after the last round")
        outcomes = load.stop()
    epochs.append(Epoch(mark, float("inf"), frozenset({world.alias("champion")})))
    ledger = reconcile(outcomes, service.logged_ids())
    scenario.took(load)
    scenario.rows_lost = len(ledger.lost)
    scenario.notes.append(f"answers by version: {dict(Counter(o.version for o in outcomes if o.ok))}")

    failures = [o for o in outcomes if not o.ok]
    assert not failures, f"{len(failures)} requests failed: {summary(failures)}"
    wrong = [o for o in outcomes if o.version not in _allowed(epochs, o)]
    assert not wrong, (f"{len(wrong)} answers came from a version the registry did not serve then, e.g. "
                       f"v{wrong[0].version} at {wrong[0].started - load.started:.1f} s; epochs: {epochs}")
    ledger.check(exact=True)


def _allowed(epochs: list[Epoch], outcome: Outcome) -> frozenset[str]:
    """The versions allowed in any epoch the request overlapped."""
    return frozenset().union(*(e.allowed for e in epochs if e.start <= outcome.ended and outcome.started <= e.end))
