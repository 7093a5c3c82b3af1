"""`make screenshots` (`python -m tools.screenshots --out docs/images`): the README's pictures of the MLflow UI.

A throwaway MLflow store in a temporary directory is filled by the project's own stages, as a user's
first days would fill it: a small generated reference file; a first model trained on it and promoted
by the gate; a month of drifted traffic scored by that model, every row labelled through feedback; a
drift check that finds the drift; a second model trained on the reference and the feedback; and the
gate deciding on it. `mlflow ui` then serves the store on a loopback port, and Debian's Chromium,
headless and driven by playwright-core (tools/screenshots.cjs), photographs:

- datasets.png: the training runs by name, and the datasets of the second one (source, digest, rows);
- compare.png: the two training runs side by side, only what differs;
- versions.png: the registered model's versions, with their aliases;
- version.png: the Production version: its description (headline metrics and data), source run, aliases;
- drift_report.png: the drift run's HTML report, as the run's artifact view shows it.

The MLflow UI is a React app that renders after its API calls answer: each page is photographed
once the texts it must show are visible (the run names, an alias, the report's verdict), not after a
fixed delay. Chromium's command line (`--screenshot` with `--virtual-time-budget`) renders the
pages too, but it cannot set the UI's stored preferences, and on a loopback server MLflow 3.17
opens its assistant panel over half of every page on a first visit. The user's own store
(`mlruns/`, MLFLOW_TRACKING_URI) is never touched.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

from common.paths import REPO_ROOT

MODEL_NAME = "fraud-detector"
REFERENCE_ROWS = 20_000
FRAUD_RATE = 0.02  # enough frauds in 20,000 rows for an evaluation set the gate can judge
TRAFFIC_ROWS = 5_000
WINDOW = (1280, 800)
# The UI's own first-visit behaviour, set as a returning user has it (keys as its useLocalStorage
# stores them, `<key>_v<version>`): the runs view of "Model training", and the assistant panel that
# opens by itself on a loopback server left closed, so that it does not cover half of every picture.
QUIET_UI = {"mlflow.workflowType_v1": json.dumps("machine_learning"),
            "mlflow.assistant.fab.autoOpenedOnFirstLoad_v1": "true", "mlflow.assistant.panelOpen_v1": "false"}


@dataclass(frozen=True)
class Filled:
    """What the store holds, by id: the pages to photograph."""

    tracking_uri: str
    training_experiment: str
    training_runs: tuple[str, str]
    training_names: tuple[str, str]
    drift_experiment: str
    drift_run: str
    champion: str


def fill_store(root: Path, say) -> Filled:
    """Run the project's stages against a store under `root`; see the module docstring."""
    import numpy as np

    from common import registry
    from common.features import load_feature_config
    from common.model import load_bundle
    from common.schema import FEATURES, LABEL
    from common.store import RequestStore
    from monitoring.drift import DriftParams, check_drift
    from monitoring.gate import GateParams, promote
    from training import scenarios
    from training.generate import generate
    from training.import_csv import import_csv
    from training.train import TrainParams, train

    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}", "MLFLOW_ARTIFACT_ROOT": str(root / "mlruns"),
           "REFERENCE_DB": str(root / "reference_data.db"), "FEATURE_CONFIG": str(root / "feature_config.json"),
           "LATEST_DB": str(root / "requests.db"), "DRIFT_REFERENCE": str(root / "drift_reference.parquet"),
           "MODEL_NAME": MODEL_NAME, "MLFLOW_DISABLE_TELEMETRY": "true"}
    quiet = contextlib.redirect_stdout(io.StringIO())
    with mock.patch.dict(os.environ, env):  # the project reads its settings at call time
        os.environ.pop("MLFLOW_RUN_ID", None)
        say(f"generating {REFERENCE_ROWS:,} reference rows")
        generate(rows=REFERENCE_ROWS, seed=0, out=root / "creditcard.csv", fraud_rate=FRAUD_RATE)
        with quiet:
            import_csv(root / "creditcard.csv", env["REFERENCE_DB"], Path(env["FEATURE_CONFIG"]))
        say("training and promoting the first model")
        with contextlib.redirect_stdout(io.StringIO()):
            first = train(TrainParams(requests="none", seed=0), progress=lambda _line: None)
            promote(GateParams(version=first.version, reason="manual", output_dir=root))

        say(f"scoring a drifted month of {TRAFFIC_ROWS:,} rows with v{first.version}; labelling it through feedback")
        drifted = scenarios.named("covariate", seed=1, fraud_rate=FRAUD_RATE * 100, amount_shift=400.0, v_shift=2.0)
        month = scenarios.inputs(drifted, 3, load_feature_config(Path(env["FEATURE_CONFIG"])), TRAFFIC_ROWS)
        client = registry.client(env["MLFLOW_TRACKING_URI"])
        bundle = load_bundle(client, MODEL_NAME, first.version)
        scores = bundle.predict_proba(month[list(FEATURES)].to_numpy())
        rows = month[list(FEATURES)].copy()
        rows.insert(0, "request_id", [f"traffic-{i}" for i in range(len(rows))])
        rows.insert(1, "ts", time.time() - len(rows) + np.arange(len(rows), dtype=float))
        rows["score"], rows["decision"], rows["threshold"] = scores, (scores >= bundle.threshold).astype(int), \
            bundle.threshold
        rows["model_name"], rows["model_version"] = MODEL_NAME, str(first.version)
        store = RequestStore(env["LATEST_DB"])
        try:
            store.insert_frame(rows)
            store.record_feedback(dict(zip(rows["request_id"], month[LABEL].astype(int), strict=True)))
        finally:
            store.dispose()

        say("checking drift")
        drift = check_drift(DriftParams(window=TRAFFIC_ROWS, output_dir=root))
        say(f"drift check: {drift.report.status}; training on the reference and the feedback, then the gate")
        with contextlib.redirect_stdout(io.StringIO()):
            second = train(TrainParams(seed=1), progress=lambda _line: None)
            decision = promote(GateParams(version=second.version, output_dir=root))
        say(f"gate on v{second.version}: {'passed' if decision.passed else 'refused'}")
        names = tuple(client.get_run(run_id).info.run_name for run_id in (first.run_id, second.run_id))
        champion = registry.production_version(client, MODEL_NAME)
        return Filled(env["MLFLOW_TRACKING_URI"], first.experiment_id, (first.run_id, second.run_id), names,
                      client.get_run(drift.run_id).info.experiment_id, drift.run_id, str(champion.version))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def mlflow_ui(tracking_uri: str, workdir: Path, timeout: float = 120.0) -> Iterator[str]:
    """`mlflow ui` on the store, on a free loopback port, until the block ends. Yields its base URL."""
    port = _free_port()
    log = (workdir / "mlflow-ui.log").open("wb")
    process = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "ui", "--backend-store-uri", tracking_uri,
                                "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                               cwd=workdir, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                               env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as answer:  # noqa: S310 - loopback
                    if answer.status == 200:
                        break
            except OSError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mlflow ui did not answer on {url}:\n"
                                   + (workdir / "mlflow-ui.log").read_text()[-3000:])
            time.sleep(0.5)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(30)
        log.close()


def photograph(shots: list[dict], workdir: Path) -> None:
    """Photograph each shot ({url, out, text, frameText}) with tools/screenshots.cjs and Debian's Chromium.

    Raises:
        RuntimeError: Chromium or Node.js is missing, or a page never showed its texts.
    """
    chromium, node = shutil.which("chromium"), shutil.which("node")
    if chromium is None:
        raise RuntimeError("chromium is not installed: `make chromium` installs Debian's package")
    if node is None:
        raise RuntimeError("node is not installed: the screenshots are taken through playwright-core (npm)")
    spec = workdir / "screenshots.json"
    spec.write_text(json.dumps({"chromium": chromium, "width": WINDOW[0], "height": WINDOW[1],
                                "localStorage": QUIET_UI, "shots": shots}))
    done = subprocess.run([node, str(REPO_ROOT / "tools" / "screenshots.cjs"), str(spec)], cwd=REPO_ROOT,
                          timeout=600, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"tools/screenshots.cjs failed (exit {done.returncode})")


def shots(base: str, filled: Filled, out: Path) -> list[dict]:
    """What to photograph: each page, its file, the texts it shows once rendered and what to click first."""
    runs = json.dumps(list(filled.training_runs), separators=(",", ":"))
    experiments = json.dumps([filled.training_experiment], separators=(",", ":"))
    first, second = filled.training_names
    return [
        # The newest run (with feedback) is the table's first row; its Dataset cell opens the drawer.
        {"url": f"{base}/#/experiments/{filled.training_experiment}/runs", "out": str(out / "datasets.png"),
         "text": [first], "click": ["text=/^reference \\(/ >> nth=0"], "then": ["3 datasets used"]},
        # Only what differs: the plots folded, "Show diff only" on for parameters and metrics.
        {"url": f"{base}/#/compare-runs?runs={runs}&experiments={experiments}", "out": str(out / "compare.png"),
         "height": 1300, "text": [first, second], "click": ["text=Visualizations", "role=switch"],
         "then": ["average_precision"], "top": "Comparing 2 Runs"},
        # Every version's tags are listed: tall enough for two versions and their aliases.
        {"url": f"{base}/#/models/{MODEL_NAME}", "out": str(out / "versions.png"), "height": 1400,
         "text": ["champion", "previous"]},
        {"url": f"{base}/#/models/{MODEL_NAME}/versions/{filled.champion}", "out": str(out / "version.png"),
         "text": ["champion", "Average precision"]},
        {"url": (f"{base}/#/experiments/{filled.drift_experiment}/runs/{filled.drift_run}"
                 "/artifactPath/drift_report.html"), "out": str(out / "drift_report.png"), "frameText": ["DRIFT"]},
    ]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.screenshots", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/images"), help="where the PNGs go")
    parser.add_argument("--keep", action="store_true", help="keep the temporary store and print where it is")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="mlflow-screenshots-"))
    try:
        filled = fill_store(root, say=lambda line: print(f"screenshots: {line}", flush=True))
        with mlflow_ui(filled.tracking_uri, root) as base:
            photograph(shots(base, filled, args.out.resolve()), root)
    finally:
        if args.keep:
            print(f"screenshots: the store is kept in {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
