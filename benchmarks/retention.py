"""The archive job on a grown log: its time, memory and reclaimed disk, serving beside it, reading back.

`python -m benchmarks retention [--rows N | --full] [--stores sqlite,postgresql]` builds a request
log of N labelled rows (default 1,000,000; `--full`: 10,000,000) spread over the 60 days before now,
on SQLite and on a partitioned PostgreSQL log, then for each:

1. loads every labelled row into the training frame from the live log (`training.data`);
2. runs the real service on the log and measures the p99 of single-row /predict at 8 clients
   with wrk, first alone, then while `python -m monitoring.archive` moves the oldest 50 days out;
3. reports the archive's wall time and the peak memory of its processes (sampled from /proc),
   and the disk the log gave back (PostgreSQL: how long (auto)vacuum took to clear the dead rows);
4. archives the rest, and loads every labelled row again, now all from the archive.

Goals (issue 23, at 10,000,000 rows): archive ≤ 2 min and ≤ 1 GB; p99 during ≤ 1.5× alone;
loading from the archive ≤ 1.3× from the live log.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from benchmarks.serve import (
    TOKEN,
    free_port,
    prepare_registry,
    run_wrk,
    service_command,
    service_env,
    serving,
    throwaway_database,
    wait_for_challenger,
    wrk_script,
)
from benchmarks.storage import DAY_SECONDS, fill
from common.paths import REPO_ROOT

DAYS, ARCHIVED_DAYS, CLIENTS = 60, 50, 8
WRK_ROUND_SECONDS = 10
GOALS = {"archive_seconds": 120.0, "archive_peak_mb": 1024.0, "p99_ratio": 1.5, "load_ratio": 1.3}


@dataclass
class StoreResult:
    store: str
    rows: int
    fill_seconds: float = 0.0
    load_live_seconds: float = 0.0
    load_archive_seconds: float = 0.0
    p99_alone_ms: float = 0.0
    p99_during_ms: float = 0.0
    archive_seconds: float = 0.0
    archive_peak_mb: float = 0.0
    archived_rows: int = 0
    bytes_before: int = 0
    bytes_after: int = 0
    archive_bytes: int = 0
    autovacuum_seconds: float | None = None
    vacuum_by: str = ""
    notes: list[str] = field(default_factory=list)


def tree_rss_mb(pid: int) -> float:
    """Memory of a process and all its descendants, in MB: the sum of their proportional set sizes
    (/proc/*/smaps_rollup), so that pages a forked child shares with its parent count once."""
    parents: dict[int, int] = {}
    rss: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
            parents[int(entry)] = int(fields[1])
            rss[int(entry)] = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, IndexError, ValueError):
            continue
    tree, frontier = {pid}, [pid]
    while frontier:
        parent = frontier.pop()
        children = [p for p, pp in parents.items() if pp == parent and p not in tree]
        tree.update(children)
        frontier.extend(children)
    return sum(_pss(p, rss.get(p, 0)) for p in tree) / 1e6


def _pss(pid: int, rss: int) -> int:
    """A process's proportional set size in bytes (its RSS when smaps_rollup cannot be read)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as smaps:
            for line in smaps:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return rss


def run_archive(location: str, folder: Path, after_days: float, env: dict[str, str]) -> tuple[dict, float, float]:
    """`python -m monitoring.archive` as a process; (its result, wall seconds, peak MB of its tree)."""
    command = [sys.executable, "-m", "monitoring.archive", "--request_log", location, "--archive_uri", str(folder),
               "--after_days", str(after_days), "--maturity_days", "0.000001", "--tracking", "false"]
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    peak = 0.0
    while process.poll() is None:
        peak = max(peak, tree_rss_mb(process.pid))
        time.sleep(0.05)
    seconds = time.perf_counter() - started
    out, err = process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"the archive job failed ({process.returncode}): {err[-2000:]}")
    return json.loads(out), seconds, peak


def load_seconds(location: str) -> tuple[float, int]:
    """Seconds to read every labelled row into the training frame (training.data), and the rows."""
    from training.data import _read_labelled

    started = time.perf_counter()
    frame, _, _ = _read_labelled(location)
    return time.perf_counter() - started, len(frame)


def autovacuum_seconds(url: str, timeout: float = 180.0) -> tuple[float | None, str]:
    """Seconds until the dead rows of the log's partitions are cleared, and by what: autovacuum
    (None: not within `timeout`), or, on a server with autovacuum off, a `VACUUM` of the log, timed."""
    import sqlalchemy as sa

    from common.store import RequestStore

    engine = sa.create_engine(RequestStore(url, create=False).url, isolation_level="AUTOCOMMIT")
    started = time.perf_counter()
    try:
        with engine.connect() as conn:
            if conn.exec_driver_sql("SHOW autovacuum").scalar() != "on":
                conn.exec_driver_sql("VACUUM requests")
                return time.perf_counter() - started, "VACUUM (autovacuum is off on this server)"
        while time.perf_counter() - started < timeout:
            with engine.connect() as conn:
                dead = conn.execute(sa.text("SELECT coalesce(sum(n_dead_tup), 0) FROM pg_stat_user_tables "
                                            "WHERE relname LIKE 'requests%'")).scalar()
            if dead == 0:
                return time.perf_counter() - started, "autovacuum"
            time.sleep(1)
    finally:
        engine.dispose()
    return None, "autovacuum"


def measure_store(store: str, location: str, rows: int, workdir: Path, reg, seconds: int) -> StoreResult:
    from common import partitions
    from common.store import RequestStore

    result = StoreResult(store, rows)
    now = time.time()
    started = time.perf_counter()
    log = RequestStore(location, partitioned=True)
    try:
        if store == "PostgreSQL":
            partitions.ensure_partitions(log.engine, now - DAYS * DAY_SECONDS, now)
        fill(log, rows, now - DAYS * DAY_SECONDS, now - 60, labelled=1.0, chunk=100_000)
    finally:
        log.dispose()
    result.fill_seconds = time.perf_counter() - started
    print(f"  {store}: {rows:,} rows logged in {result.fill_seconds:.0f} s", flush=True)
    if store == "PostgreSQL":
        with contextlib.suppress(Exception):
            autovacuum_seconds(location, timeout=120)  # the fill's own churn, so as not to count it later
    if store == "SQLite":
        result.vacuum_by = "the job (incremental_vacuum)"
    result.load_live_seconds, loaded = load_seconds(location)
    print(f"  {store}: {loaded:,} labelled rows loaded from the live log in {result.load_live_seconds:.1f} s",
          flush=True)

    folder = workdir / f"archive-{store}"
    env = {**os.environ, "LATEST_DB": location}
    auth = {"Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}"}
    script = wrk_script(workdir / "predict.lua", orjson.dumps({"data": [reg.row]}), auth)
    port = free_port()
    service = {**service_env(reg, workdir, store), "LATEST_DB": location, "PORT": str(port)}
    with serving(f"service ({store})", service_command(), service, port, "/ready", workdir / f"{store}.log") as server:
        wait_for_challenger(server.url, reg.challenger)
        alone = run_wrk(f"{store} alone", server.url + "/predict", script, CLIENTS, seconds, warmup=True)
        outcome: dict = {}

        def archive_job() -> None:
            outcome["result"] = run_archive(location, folder, DAYS - ARCHIVED_DAYS, env)

        job = threading.Thread(target=archive_job)
        job.start()
        # wrk runs in rounds for as long as the job does; the figure is the worst round's p99.
        during = [run_wrk(f"{store} while archiving", server.url + "/predict", script, CLIENTS, WRK_ROUND_SECONDS,
                          warmup=False)]
        while job.is_alive():
            during.append(run_wrk(f"{store} while archiving", server.url + "/predict", script, CLIENTS,
                                  WRK_ROUND_SECONDS, warmup=False))
        job.join()
    if "result" not in outcome:
        raise RuntimeError(f"the archive job of the {store} log failed")
    archived, result.archive_seconds, result.archive_peak_mb = outcome["result"]
    result.p99_alone_ms, result.p99_during_ms = alone.p99_ms, max(r.p99_ms for r in during)
    result.notes.append(f"p99 while archiving, by {WRK_ROUND_SECONDS} s round: "
                        + ", ".join(f"{r.p99_ms:.1f}" for r in during) + " ms")
    result.archived_rows = archived["rows_archived"]
    result.bytes_before, result.bytes_after = archived["log_bytes_before"], archived["log_bytes_after"]
    result.archive_bytes = archived["bytes_written"]
    print(f"  {store}: archived {result.archived_rows:,} rows in {result.archive_seconds:.1f} s, "
          f"peak {result.archive_peak_mb:.0f} MB; log {result.bytes_before / 1e9:.2f} → "
          f"{result.bytes_after / 1e9:.2f} GB ({archived['partitions_dropped']} partitions dropped, "
          f"{archived['pages_freed']} pages freed)", flush=True)
    if store == "PostgreSQL":
        result.autovacuum_seconds, result.vacuum_by = autovacuum_seconds(location)
        print(f"  {store}: {result.vacuum_by} cleared the dead rows after {result.autovacuum_seconds} s", flush=True)

    run_archive(location, folder, 1e-6, env)  # the rest, so that every labelled row is read from the archive
    result.load_archive_seconds, loaded = load_seconds(location)
    print(f"  {store}: {loaded:,} labelled rows loaded from the archive in {result.load_archive_seconds:.1f} s",
          flush=True)
    return result


def print_table(results: list[StoreResult]) -> int:
    status = 0
    print(f"\n{'store':<11} {'rows':>11} {'archive s':>10} {'peak MB':>8} {'p99 alone':>10} {'during':>7} "
          f"{'ratio':>6} {'load live s':>12} {'archive s':>10} {'ratio':>6} {'log GB before→after':>20} "
          f"{'parquet GB':>11} {'vacuum s':>13}")
    for r in results:
        p99_ratio = r.p99_during_ms / r.p99_alone_ms
        load_ratio = r.load_archive_seconds / r.load_live_seconds
        vacuum = "-" if r.store == "SQLite" else (f"{r.autovacuum_seconds:.0f}" if r.autovacuum_seconds is not None
                                                 else "> 180")
        print(f"{r.store:<11} {r.rows:>11,} {r.archive_seconds:>10.1f} {r.archive_peak_mb:>8.0f} "
              f"{r.p99_alone_ms:>8.1f}ms {r.p99_during_ms:>5.1f}ms {p99_ratio:>6.2f} {r.load_live_seconds:>12.1f} "
              f"{r.load_archive_seconds:>10.1f} {load_ratio:>6.2f} "
              f"{r.bytes_before / 1e9:>9.2f} → {r.bytes_after / 1e9:>6.2f} {r.archive_bytes / 1e9:>11.2f} {vacuum:>13}")
        if r.store != "SQLite":
            r.notes.append(f"dead rows cleared by {r.vacuum_by}")
        for note in r.notes:
            print(f"  note: {note}")
        scale = 10_000_000 / r.rows
        checks = {"archive ≤ 2 min (scaled to 10M rows)": r.archive_seconds * scale <= GOALS["archive_seconds"],
                  "archive peak ≤ 1 GB": r.archive_peak_mb <= GOALS["archive_peak_mb"],
                  "p99 during ≤ 1.5× alone": p99_ratio <= GOALS["p99_ratio"],
                  "load from archive ≤ 1.3× live": load_ratio <= GOALS["load_ratio"]}
        for goal, met in checks.items():
            print(f"  {r.store}: {goal}: {'met' if met else 'MISSED'}")
            status |= 0 if met else 1
    return status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks retention", description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows in each log (default 1,000,000)")
    parser.add_argument("--full", action="store_true", help="10,000,000 rows, the issue's size")
    parser.add_argument("--stores", default="sqlite,postgresql", help="sqlite, postgresql or both")
    parser.add_argument("--seconds", type=int, default=20, help="wrk's measuring time alone (while archiving: "
                        f"{WRK_ROUND_SECONDS} s rounds for as long as the job runs)")
    parser.add_argument("--postgres", default=os.environ.get("BENCH_POSTGRES_URL",
                                                             "postgresql://postgres@127.0.0.1:5432/postgres"),
                        help="an admin URL of the PostgreSQL server for a throwaway database")
    args = parser.parse_args(argv)
    rows = 10_000_000 if args.full else args.rows
    stores = [s.strip().lower() for s in args.stores.split(",") if s.strip()]
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-retention-", dir=REPO_ROOT / ".bench"
                                     if (REPO_ROOT / ".bench").is_dir() else None) as scratch:
        workdir = Path(scratch)
        reg = prepare_registry(workdir, rows=100_000, trees=20)  # the serving benchmark's data, fewer trees
        if "sqlite" in stores:
            results.append(measure_store("SQLite", str(workdir / "requests.db"), rows, workdir, reg, args.seconds))
        if "postgresql" in stores:
            with throwaway_database(args.postgres, "retention") as url:
                results.append(measure_store("PostgreSQL", url, rows, workdir, reg, args.seconds))
    return print_table(results)


if __name__ == "__main__":
    sys.exit(main())
