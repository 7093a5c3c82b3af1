"""Traffic simulator: sends drifted transactions to a running service as a client would.

`python -m monitoring.simulate --month 3 --rows 5000 --url http://127.0.0.1:5000 [--feedback true]`,
or `mlflow run . -e simulate --env-manager local -P month=3 -P rows=5000`.

Rows come from `training.generate.drift_batch` (month 0 = no drift; month m shifts `Amount_scaled`
by 0.1*m and adds noise to the V columns) and go to `POST /predict` in batches. With `--feedback`
the true labels follow through `POST /feedback`, as a bank's chargeback feed would, so the next
training run can learn from them.

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
from dataclasses import dataclass, field

import numpy as np
import requests

from common import settings
from common.features import FeatureConfigError, load_feature_config
from common.paths import REPO_ROOT
from common.schema import FEATURES, LABEL
from common.text import cli_bool
from training.generate import drift_batch

TOKEN_FILE = REPO_ROOT / ".api_token"
TIMEOUT_SECONDS = 30


class SimulationError(RuntimeError):
    """The service refused or failed a request."""


@dataclass(frozen=True)
class SimulateParams:
    month: int = 1
    rows: int = 5000
    url: str = "http://127.0.0.1:5000"
    batch: int = 500
    seed: int = 0
    feedback: bool = False


@dataclass
class Summary:
    rows: int = 0
    batches: int = 0
    flagged: int = 0
    frauds: int = 0
    caught: int = 0
    score_sum: float = 0.0
    labels_sent: int = 0
    labels_unknown: int = 0
    versions: Counter = field(default_factory=Counter)
    seconds: float = 0.0

    def lines(self, params: SimulateParams) -> list[str]:
        rate = self.rows / self.seconds if self.seconds else 0.0
        return [
            f"simulate: sent {self.rows} rows of month {params.month} in {self.batches} batches to {params.url} "
            f"in {self.seconds:.1f}s ({rate:.0f} rows/s)",
            f"  flagged as fraud: {self.flagged} ({self.flagged / max(self.rows, 1):.2%}); true frauds: {self.frauds}, "
            f"caught: {self.caught}; mean fraud probability {self.score_sum / max(self.rows, 1):.4f}",
            "  scored by model version(s): " + ", ".join(f"v{v} ({n} rows)" for v, n in sorted(self.versions.items())),
            (f"  feedback: {self.labels_sent} labels sent, {self.labels_unknown} unknown to the service"
             if params.feedback else "  feedback: not sent (use --feedback true to post the true labels)"),
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
    """Send the month's rows in batches (and their labels, with feedback) and summarise the answers.

    Raises:
        SimulationError: a request failed; rows sent before it stay logged by the service.
        common.features.FeatureConfigError: no feature config to scale Amount with.
    """
    base = params.url.rstrip("/")
    session = session or requests.Session()
    session.headers["Authorization"] = f"Bearer {token}"
    frame = drift_batch(params.rows, params.month, params.seed, load_feature_config())
    rows = frame[list(FEATURES)].to_numpy(np.float64)
    labels = frame[LABEL].to_numpy(np.int64)
    summary = Summary()
    started = time.perf_counter()
    for start in range(0, len(rows), params.batch):
        chunk = slice(start, start + params.batch)
        answer = _post(session, f"{base}/predict", {"data": rows[chunk].tolist()})
        flagged = np.asarray(answer["is_fraud"], dtype=bool)
        truth = labels[chunk]
        summary.rows += len(flagged)
        summary.batches += 1
        summary.flagged += int(flagged.sum())
        summary.frauds += int(truth.sum())
        summary.caught += int((flagged & (truth == 1)).sum())
        summary.score_sum += float(np.sum(answer["fraud_probability"]))
        summary.versions[str(answer.get("model_version"))] += len(flagged)
        if params.feedback:
            body = {"labels": [{"request_id": rid, "is_fraud": int(y)}
                               for rid, y in zip(answer["request_id"], truth, strict=True)]}
            result = _post(session, f"{base}/feedback", body)
            summary.labels_sent += len(body["labels"])
            summary.labels_unknown += len(result.get("unknown", []))
    summary.seconds = time.perf_counter() - started
    return summary



def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m monitoring.simulate", description=__doc__.splitlines()[0])
    parser.add_argument("--month", type=int, default=1, help="drift month; 0 = no drift (default 1)")
    parser.add_argument("--rows", type=int, default=5000, help="rows to send (default 5000)")
    parser.add_argument("--url", default="http://127.0.0.1:5000", help="the service's base URL")
    parser.add_argument("--batch", type=int, default=500, help="rows per /predict request (default 500)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated traffic")
    parser.add_argument("--feedback", type=cli_bool, default=False, help="true: post the true labels to /feedback")
    args = parser.parse_args(argv)
    if args.month < 0 or args.rows < 1 or args.batch < 1:
        parser.error("month must be 0 or more, rows and batch at least 1")
    params = SimulateParams(args.month, args.rows, args.url, args.batch, args.seed, args.feedback)
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

