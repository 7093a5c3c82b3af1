"""Traffic simulator: sends a scenario's transactions to a running service as a client would.

`python -m monitoring.simulate --scenario new-pattern --month 3 --rows 5000 --url http://127.0.0.1:5000
[--feedback true]`, or `mlflow run . -e simulate --env-manager local -P scenario=new-pattern -P month=3`.
Without --scenario the month is one of the `covariate` scenario (month 0: the reference period).

Rows come from `training.scenarios` (every scenario parameter has a flag: `--amount-shift 25`,
`--pattern-month 2`, ...) and go to `POST /predict` in batches. With `--feedback true` the true labels
follow through `POST /feedback` as a bank's chargeback feed delivers them: the simulator records
when each row's label becomes known (`monitoring.chargebacks`, a ledger file), and at the end of the
simulated month posts only the labels known by then, from this month or earlier ones, and says how
many are still pending. Run later months to deliver the rest.

The bearer token is read from API_TOKEN (the first of a comma-separated list), else the first line
of API_TOKEN_FILE, else the `.api_token` file `make run` writes; never from a parameter, because
MLflow logs parameters. Exit codes: 0 every batch was scored, 1 the service refused or failed a
request (its JSON error is printed), 2 bad arguments or no token.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import requests

from common import settings
from common.features import FeatureConfigError, load_feature_config
from common.paths import DATA_DIR, REPO_ROOT
from common.schema import FEATURES, LABEL
from common.text import cli_bool
from monitoring.chargebacks import Ledger
from training import scenarios

TOKEN_FILE = REPO_ROOT / ".api_token"
LEDGER_FILE = DATA_DIR / "simulate_ledger.db"
TIMEOUT_SECONDS = 30
DEFAULT_SCENARIO = "covariate"
DEFAULT_ROWS = 5000
FEEDBACK_BATCH = 2000  # labels per /feedback request: well inside the service's default MAX_ROWS


class SimulationError(RuntimeError):
    """The service refused or failed a request."""


@dataclass(frozen=True)
class SimulateParams:
    scenario: scenarios.Scenario = field(default_factory=lambda: scenarios.named(DEFAULT_SCENARIO,
                                                                                 rows=DEFAULT_ROWS))
    month: int = 1
    url: str = "http://127.0.0.1:5000"
    batch: int = 500
    feedback: bool = False
    ledger: Path = LEDGER_FILE
    keep_answers: bool = False  # Summary.answers: every row's answer, for a caller that measures them


@dataclass
class Summary:
    rows: int = 0
    batches: int = 0
    flagged: int = 0
    frauds: int = 0
    caught: int = 0
    score_sum: float = 0.0
    labels_sent: int = 0
    frauds_sent: int = 0
    labels_unknown: int = 0
    pending: int = 0
    pending_frauds: int = 0
    versions: Counter = field(default_factory=Counter)
    seconds: float = 0.0
    # With SimulateParams.keep_answers: the month's rows (month_frame's columns) with the service's
    # answer to each: request_id, fraud_probability, is_fraud, model_version.
    answers: pd.DataFrame | None = None

    def lines(self, params: SimulateParams) -> list[str]:
        rate = self.rows / self.seconds if self.seconds else 0.0
        clock = datetime.fromtimestamp(params.scenario.month_end(params.month), UTC).date().isoformat()
        if params.feedback:
            feedback = (f"  feedback by {clock} (the month's end): {self.labels_sent} labels sent ({self.frauds_sent} "
                        f"frauds), {self.labels_unknown} unknown to the service; {self.pending} still pending "
                        f"({self.pending_frauds} frauds to be reported, the rest not yet mature); "
                        f"ledger {params.ledger}")
        else:
            feedback = "  feedback: not sent (use --feedback true to post the labels known by the month's end)"
        return [
            f"simulate: sent {self.rows} rows of month {params.month} of scenario {params.scenario.name} in "
            f"{self.batches} batches to {params.url} in {self.seconds:.1f}s ({rate:.0f} rows/s)",
            f"  flagged as fraud: {self.flagged} ({self.flagged / max(self.rows, 1):.2%}); true frauds: {self.frauds}, "
            f"caught: {self.caught}; mean fraud probability {self.score_sum / max(self.rows, 1):.4f}",
            "  scored by model version(s): " + ", ".join(f"v{v} ({n} rows)" for v, n in sorted(self.versions.items())),
            feedback,
        ]


def read_token() -> str:
    """The client's bearer token: API_TOKEN, API_TOKEN_FILE, or `.api_token`.

    Raises:
        SimulationError: none is set or the file is empty.
    """
    tokens = settings.api_tokens()
    if tokens:
        return tokens[0]
    try:
        token = TOKEN_FILE.read_text().strip().splitlines()[0].strip()
    except (OSError, IndexError):
        token = ""
    if not token:
        raise SimulationError(f"no API token: set API_TOKEN (or API_TOKEN_FILE), or start the service with "
                              f"`make run`, which writes {TOKEN_FILE.name}")
    return token


def _post(session: requests.Session, url: str, body: dict) -> dict:
    try:
        response = session.post(url, json=body, timeout=TIMEOUT_SECONDS)
    except requests.RequestException as exc:
        raise SimulationError(f"cannot reach {url}: {exc}") from None
    if response.status_code != 200:
        raise SimulationError(f"{url} answered {response.status_code}: {response.text[:500]}")
    return response.json()


def simulate(params: SimulateParams, token: str, session: requests.Session | None = None) -> Summary:
    """Send the month's rows in batches and summarise the answers; with feedback, post the labels
    known by the month's end (see the module docstring).

    Raises:
        SimulationError: a request failed; rows sent before it stay logged by the service, and their
            labels stay in the ledger.
        common.features.FeatureConfigError: no feature config to scale Amount with.
    """
    base = params.url.rstrip("/")
    session = session or requests.Session()
    session.headers["Authorization"] = f"Bearer {token}"
    scenario = params.scenario
    frame = scenarios.month_frame(scenario, params.month)
    inputs = scenarios.model_inputs(frame, load_feature_config())
    rows = inputs[list(FEATURES)].to_numpy(np.float64)
    truth_all = inputs[LABEL].to_numpy(np.int64)
    feed = scenarios.labels(scenario, frame, params.month)
    summary = Summary()
    answers: dict[str, list] = {"request_id": [], "fraud_probability": [], "is_fraud": [], "model_version": []}
    started = time.perf_counter()
    with Ledger(params.ledger) if params.feedback else _no_ledger() as ledger:
        for start in range(0, len(rows), params.batch):
            chunk = slice(start, start + params.batch)
            answer = _post(session, f"{base}/predict", {"data": rows[chunk].tolist()})
            if params.keep_answers:
                for key in ("request_id", "fraud_probability", "is_fraud"):
                    answers[key] += answer[key]
                answers["model_version"] += [str(answer.get("model_version"))] * len(answer["is_fraud"])
            flagged = np.asarray(answer["is_fraud"], dtype=bool)
            truth = truth_all[chunk]
            summary.rows += len(flagged)
            summary.batches += 1
            summary.flagged += int(flagged.sum())
            summary.frauds += int(truth.sum())
            summary.caught += int((flagged & (truth == 1)).sum())
            summary.score_sum += float(np.sum(answer["fraud_probability"]))
            summary.versions[str(answer.get("model_version"))] += len(flagged)
            if ledger is not None:
                ledger.add(scenario.name, params.month, zip(answer["request_id"], frame["ts"].to_numpy()[chunk],
                                                            feed["known_at"].to_numpy()[chunk],
                                                            feed["label"].to_numpy()[chunk], strict=True))
        if ledger is not None:
            _deliver(session, base, ledger, scenario.month_end(params.month), FEEDBACK_BATCH, summary)
    summary.seconds = time.perf_counter() - started
    if params.keep_answers:
        summary.answers = frame.assign(**answers)
    return summary


def _deliver(session: requests.Session, base: str, ledger: Ledger, clock: float, batch: int,
             summary: Summary) -> None:
    """Post every label the ledger holds that is known by `clock`, and count what is still pending."""
    due = ledger.due(clock)
    for start in range(0, len(due.request_ids), batch):
        ids, labels = due.request_ids[start:start + batch], due.labels[start:start + batch]
        body = {"labels": [{"request_id": rid, "is_fraud": y} for rid, y in zip(ids, labels, strict=True)]}
        result = _post(session, f"{base}/feedback", body)
        ledger.mark_posted(ids)  # unknown ids too: the service will never know them
        summary.labels_sent += len(ids)
        summary.frauds_sent += sum(labels)
        summary.labels_unknown += len(result.get("unknown", []))
    pending = ledger.pending(clock)
    summary.pending, summary.pending_frauds = pending.rows, pending.frauds


@contextmanager
def _no_ledger():
    yield None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m monitoring.simulate", description=__doc__.splitlines()[0])
    parser.add_argument("--month", type=int, default=1, help="the scenario's month to send; 0 = the reference period")
    parser.add_argument("--url", default="http://127.0.0.1:5000", help="the service's base URL")
    parser.add_argument("--batch", type=int, default=500, help="rows per /predict request (default 500)")
    parser.add_argument("--feedback", type=cli_bool, default=False,
                        help="true: post the labels known by the month's end (this month's and earlier ones')")
    parser.add_argument("--ledger", type=Path, default=LEDGER_FILE,
                        help=f"where the labels still owed to the service are kept (default {LEDGER_FILE})")
    scenarios.add_scenario_arguments(parser, default=DEFAULT_SCENARIO, defaults={"rows": DEFAULT_ROWS})
    args = parser.parse_args(argv)
    if args.month < 0 or args.batch < 1:
        parser.error("month must be 0 or more and batch at least 1")
    try:
        scenario = scenarios.scenario_from_args(args)
        if args.month > scenario.months:
            scenario = scenario.with_options(months=args.month)
    except scenarios.ScenarioError as exc:
        parser.error(str(exc))
    params = SimulateParams(scenario, args.month, args.url, args.batch, args.feedback, args.ledger)
    try:
        token = read_token()
    except (SimulationError, settings.SettingsError) as exc:
        print(f"simulate: {exc}", file=sys.stderr)
        return 2
    try:
        summary = simulate(params, token)
    except FeatureConfigError as exc:
        print(f"simulate: {exc}", file=sys.stderr)
        return 2
    except SimulationError as exc:
        print(f"simulate: {exc}", file=sys.stderr)
        return 1
    print("\n".join(summary.lines(params)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

