"""`python -m benchmarks train`: full-size training end to end (`mlflow run . -e train`) vs a bare fit.

Both use the same 284,807 generated rows (seed 0) and the default `TrainParams`. The bare fit is
`RandomForestClassifier(**forest_kwargs(TrainParams())).fit` on exactly the training rows the
pipeline fits (the time split's first 80 %), timed around `fit` in a fresh interpreter. The
end-to-end figure is the wall time of `mlflow run . -e train --env-manager local` against a fresh
SQLite store whose tables already exist: process start-up, loading, fitting, threshold,
evaluation, ONNX export and parity, plots, artifacts and registration. Peak RSS is reported two
ways for the `mlflow run` process tree: the largest single process (getrusage of waited children)
and the largest sum over the tree (sampled from /proc every 0.2 s).

The bare fit and the run alternate `--repeat` times (default 3) and medians are reported. The machine
is shared, so CPU seconds are reported beside wall seconds together with the load average: CPU time
does not grow when other processes compete for the cores.

Goals (2-core machine): end-to-end <= 1.3 x the bare fit, <= 3 minutes, peak RSS <= 2 GB.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path
from statistics import median

from common.paths import REPO_ROOT

FULL_ROWS = 284_807
GOAL_RATIO = 1.3
GOAL_SECONDS = 180.0
GOAL_RSS_BYTES = 2 * 1024**3
PAGE = os.sysconf("SC_PAGE_SIZE")


def _prepare_data(workdir: Path, rows: int) -> tuple[Path, Path]:
    """Generate and import the reference data once; reused while its row count matches."""
    from common.store import RequestStore
    from training.generate import generate
    from training.import_csv import import_csv

    db, config, csv = workdir / "reference_data.db", workdir / "feature_config.json", workdir / "creditcard.csv"
    if db.exists():
        store = RequestStore(str(db), create=False)
        try:
            if store.count(labelled=True) == rows and config.exists():
                return db, config
        finally:
            store.dispose()
        db.unlink()
    config.unlink(missing_ok=True)
    started = time.perf_counter()
    generate(rows=rows, seed=0, out=csv)
    import_csv(csv, str(db), config)
    print(f"generated and imported {rows} rows in {time.perf_counter() - started:.1f}s", flush=True)
    return db, config


def _bare_fit_in_new_process(db: Path) -> dict:
    """`_bare_fit` in a fresh interpreter, as the pipeline's fit runs in the fresh `mlflow run` process."""
    code = ("import json, sys; from pathlib import Path; from benchmarks.train import _bare_fit; "
            "print(json.dumps(_bare_fit(Path(sys.argv[1]))))")
    done = subprocess.run([sys.executable, "-c", code, str(db)], cwd=REPO_ROOT, capture_output=True, text=True,
                          check=False)
    if done.returncode != 0:
        raise RuntimeError(f"the bare fit failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _bare_fit(db: Path) -> dict:
    """Fit the default forest on the pipeline's training rows; wall and CPU seconds of fit() alone."""
    from sklearn.ensemble import RandomForestClassifier

    from training.data import load_labelled, split_rows
    from training.forest import forest_kwargs
    from training.params import TrainParams

    params = TrainParams()
    data = load_labelled(str(db), None)
    train_pos = split_rows(data.frame, params.split, params.test_fraction, params.seed).train
    X, y = data.features(train_pos), data.labels(train_pos)
    model = RandomForestClassifier(**forest_kwargs(params))
    wall, cpu = time.perf_counter(), time.process_time()
    model.fit(X, y)
    return {"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu, "rows": len(train_pos),
            "frauds": int(y.sum())}


def _tree_rss(root_pid: int) -> int:
    """Sum of the resident set sizes of root_pid and all its descendants, from /proc."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                stat = fh.read()
            parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    tree, frontier = {root_pid}, [root_pid]
    while frontier:
        pid = frontier.pop()
        children = [child for child, parent in parents.items() if parent == pid and child not in tree]
        tree.update(children)
        frontier.extend(children)
    total = 0
    for pid in tree:
        try:
            with open(f"/proc/{pid}/statm") as fh:
                total += int(fh.read().split()[1]) * PAGE
        except (OSError, ValueError, IndexError):
            continue
    return total


def _end_to_end(db: Path, config: Path, workdir: Path, attempt: int) -> dict:
    import shutil

    from common.registry import client, ensure_experiment

    # A new path each time: MLflow caches one store per URI in this process, so a store deleted and
    # recreated under the same path would still be read through the old, deleted file.
    store = workdir / f"store-{attempt}"
    shutil.rmtree(store, ignore_errors=True)
    store.mkdir(parents=True)
    uri = f"sqlite:///{store / 'mlflow.db'}"
    # A store that exists, as `make ui` users have; the experiment keeps its artifacts in the workdir.
    previous = os.environ.get("MLFLOW_ARTIFACT_ROOT")
    os.environ["MLFLOW_ARTIFACT_ROOT"] = str(store / "mlruns")
    try:
        ensure_experiment("fraud-training", uri)
    finally:
        if previous is None:
            os.environ.pop("MLFLOW_ARTIFACT_ROOT")
        else:
            os.environ["MLFLOW_ARTIFACT_ROOT"] = previous
    venv_bin = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{venv_bin}:{os.environ.get('PATH', '')}", "MLFLOW_TRACKING_URI": uri,
           "MLFLOW_ARTIFACT_ROOT": str(store / "mlruns"), "FEATURE_CONFIG": str(config),
           "MODEL_NAME": "fraud-detector"}
    env.pop("MLFLOW_RUN_ID", None)
    command = [str(venv_bin / "mlflow"), "run", ".", "-e", "train", "--env-manager", "local",
               "--experiment-name", "fraud-training", "-P", f"data={db}", "-P", "requests=none"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    log = (store / "mlflow_run.log").open("w")
    process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    peak_tree = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak_tree
        while not done.is_set():
            peak_tree = max(peak_tree, _tree_rss(process.pid))
            done.wait(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    code = process.wait()
    wall = time.perf_counter() - started
    done.set()
    sampler.join()
    log.close()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    metrics = {}
    if code == 0:
        mlflow_client = client(uri)
        experiment = mlflow_client.get_experiment_by_name("fraud-training")
        run = mlflow_client.search_runs([experiment.experiment_id])[0]
        metrics = run.data.metrics
    return {"wall": wall, "cpu": cpu, "code": code, "max_process_rss": after.ru_maxrss * 1024,
            "peak_tree_rss": peak_tree, "metrics": metrics, "log": store / "mlflow_run.log"}


def _walls(measurements: list[dict]) -> str:
    return ", ".join(f"{m['wall']:.1f}" for m in measurements)


def _verdict(ok: bool) -> str:
    return "ok" if ok else "MISSED"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.train", description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=FULL_ROWS)
    parser.add_argument("--workdir", type=Path, default=REPO_ROOT / ".bench" / "train")
    parser.add_argument("--repeat", type=int, default=3,
                        help="alternating bare-fit / mlflow-run pairs; medians are reported (default 3)")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a goal is missed")
    args = parser.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)

    db, config = _prepare_data(args.workdir, args.rows)
    load_before = os.getloadavg()[0]
    bares, runs = [], []
    for attempt in range(1, max(1, args.repeat) + 1):
        print(f"[{attempt}/{args.repeat}] bare RandomForestClassifier.fit ...", flush=True)
        bares.append(_bare_fit_in_new_process(db))
        print(f"  {bares[-1]['wall']:.1f}s wall, {bares[-1]['cpu']:.1f}s CPU on {bares[-1]['rows']} rows", flush=True)
        print(f"[{attempt}/{args.repeat}] mlflow run . -e train ...", flush=True)
        runs.append(_end_to_end(db, config, args.workdir, attempt))
        if runs[-1]["code"] != 0:
            print(f"mlflow run failed with exit code {runs[-1]['code']}; see {runs[-1]['log']}", file=sys.stderr)
            return 1
        print(f"  {runs[-1]['wall']:.1f}s wall, {runs[-1]['cpu']:.1f}s CPU", flush=True)
    load_after = os.getloadavg()[0]

    bare = {key: median(b[key] for b in bares) for key in ("wall", "cpu")}
    e2e = {key: median(r[key] for r in runs) for key in ("wall", "cpu")}
    e2e["max_process_rss"] = max(r["max_process_rss"] for r in runs)
    e2e["peak_tree_rss"] = max(r["peak_tree_rss"] for r in runs)
    ratio = e2e["wall"] / bare["wall"]
    cpu_ratio = e2e["cpu"] / bare["cpu"]
    peak = max(e2e["max_process_rss"], e2e["peak_tree_rss"])
    metrics = runs[-1]["metrics"]
    rows = [
        ("rows (train / evaluation)", f"{args.rows} ({int(metrics['train_rows'])} / {int(metrics['eval_rows'])})"),
        (f"bare fit (median of {len(bares)})", f"{bare['wall']:.1f} s wall, {bare['cpu']:.1f} s CPU   "
                                               f"[{_walls(bares)}]"),
        (f"mlflow run end to end (median of {len(runs)})",
         f"{e2e['wall']:.1f} s wall, {e2e['cpu']:.1f} s CPU (process tree)   "
         f"[{_walls(runs)}]"),
        ("  last run: fitting / everything else", f"{metrics['training_seconds']:.1f} s / "
                                                  f"{runs[-1]['wall'] - metrics['training_seconds']:.1f} s"),
        ("ratio end to end / bare fit", f"{ratio:.2f}x wall, {cpu_ratio:.2f}x CPU   goal <= {GOAL_RATIO}x: "
                                        f"{_verdict(ratio <= GOAL_RATIO)}"),
        ("wall time", f"{e2e['wall']:.1f} s   goal <= {GOAL_SECONDS:.0f} s: {_verdict(e2e['wall'] <= GOAL_SECONDS)}"),
        ("peak RSS", f"{e2e['peak_tree_rss'] / 1e6:.0f} MB process tree (sampled sum), "
                     f"{e2e['max_process_rss'] / 1e6:.0f} MB largest process   goal <= 2 GB: "
                     f"{_verdict(peak <= GOAL_RSS_BYTES)}"),
        ("model", f"average_precision {metrics['average_precision']:.4f}, roc_auc {metrics['roc_auc']:.4f}, "
                  f"precision {metrics['precision']:.3f}, recall {metrics['recall']:.3f} at threshold "
                  f"{metrics['threshold']:.3f}; ONNX max |dp| {metrics['onnx_max_abs_diff']:.1e}"),
        ("load average (1 min) before / after", f"{load_before:.2f} / {load_after:.2f} on {os.cpu_count()} CPUs"),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    missed = ratio > GOAL_RATIO or e2e["wall"] > GOAL_SECONDS or peak > GOAL_RSS_BYTES
    return 1 if (missed and args.strict) else 0


if __name__ == "__main__":
    sys.exit(main())
