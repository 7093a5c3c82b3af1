"""The archive job on a grown log: its time, memory and reclaimed disk, serving beside it, reading back.

`python -m benchmarks retention [--rows N | --full] [--stores sqlite,postgresql]` builds a request
log of N labelled rows (default 1,000,000; `--full`: 10,000,000) spread over the 60 days before now,
on SQLite and on a partitioned PostgreSQL log, then for each:

1. loads every labelled row into the training frame from the live log (`training.data`);
2. times `python -m monitoring.archive` moving the oldest 50 days out of a copy of the log, with no
   service beside it (the job's own speed: the goal's time);
3. runs the real service on the log and measures the p99 of single-row /predict at 8 clients
   with wrk in 10 s rounds, three alone (the best one's p99 is the baseline), then for as long as the
   same job takes to move the oldest 50 days out of the log itself (the worst round is the figure)
   (its time there is reported too: on a busy machine the job runs a tenth of the time,
   docs/decisions/035-archive-yields-to-a-busy-machine.md);
4. reports the archive's wall time, by step, and the peak memory of its processes (sampled from
   /proc), and the disk the log gave back: SQLite by `--reclaim only` afterwards, the off-hours
   step, with the service idle; PostgreSQL by dropping partitions, and how long (auto)vacuum took
   to clear the dead rows;
5. archives the rest, and loads every labelled row again, now all from the archive.

Goals (issue 23, at 10,000,000 rows): archive ≤ 2 min and ≤ 1 GB; p99 during ≤ 1.5× alone;
loading from the archive ≤ 1.3× from the live log.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sqlite3
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
    archive_seconds: float = 0.0  # alone: the job on a copy of the log, no service beside it
    archive_peak_mb: float = 0.0
    beside_seconds: float = 0.0  # beside the service under wrk, while the p99 is measured
    beside_peak_mb: float = 0.0
    archived_rows: int = 0
    bytes_before: int = 0
    bytes_after: int = 0
    archive_bytes: int = 0
    seconds_by_step: dict = field(default_factory=dict)
    reclaim_seconds: float | None = None
    reclaimed_bytes: int = 0
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


def run_archive(location: str, folder: Path, after_days: float, env: dict[str, str],
                *extra: str, sample_seconds: float = 0.05) -> tuple[dict, float, float]:
    """`python -m monitoring.archive` as a process; (its result, wall seconds, peak MB of its tree,
    sampled every `sample_seconds`: a sample reads every process's /proc entry, a few ms of CPU)."""
    command = [sys.executable, "-m", "monitoring.archive", "--request_log", location, "--archive_uri", str(folder),
               "--after_days", str(after_days), "--maturity_days", "0.000001", "--tracking", "false", *extra]
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    peak = 0.0
    while process.poll() is None:
        peak = max(peak, tree_rss_mb(process.pid))
        time.sleep(sample_seconds)
    seconds = time.perf_counter() - started
    out, err = process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"the archive job failed ({process.returncode}): {err[-2000:]}")
    return json.loads(out), seconds, peak


@contextlib.contextmanager
def copy_of_log(store: str, location: str, workdir: Path):
    """A copy of the log, dropped afterwards: a file copy (SQLite, after a checkpoint), or a database
    made from the log's as a template (PostgreSQL)."""
    import psycopg
    import sqlalchemy as sa
    from psycopg import sql

    if store == "SQLite":
        with sqlite3.connect(location) as conn:
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        copy = workdir / "requests-copy.db"
        shutil.copyfile(location, copy)
        try:
            yield str(copy)
        finally:
            for path in workdir.glob("requests-copy.db*"):
                path.unlink()
        return
    url = sa.make_url(location)
    name = f"{url.database}_copy"
    admin = url.set(database="postgres").render_as_string(hide_password=False)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(sql.Identifier(name),
                                                                      sql.Identifier(url.database)))
    try:
        yield url.set(database=name).render_as_string(hide_password=False)
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@contextlib.contextmanager
def postgres_with_autovacuum(admin_url: str):
    """The server of `admin_url` if its autovacuum is on; otherwise a server of the benchmark's own
    (initdb in a temporary folder, PostgreSQL's default settings, autovacuum on), stopped and removed
    afterwards, so that autovacuum's pace is measured; the server as it is when neither can be had."""
    import psycopg

    with psycopg.connect(admin_url, autocommit=True, connect_timeout=5) as conn:
        version = conn.execute("SHOW server_version_num").fetchone()[0]
        if conn.execute("SHOW autovacuum").fetchone()[0] == "on":
            yield admin_url
            return
    bindir = Path(f"/usr/lib/postgresql/{int(version) // 10000}/bin")
    if not (bindir / "initdb").exists():
        print(f"  PostgreSQL: autovacuum is off on {admin_url} and no initdb in {bindir}: a VACUUM is timed instead")
        yield admin_url
        return
    run_as = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []  # the server refuses to run as root
    folder = Path(tempfile.mkdtemp(prefix="bench-postgres-"))
    data, port = folder / "data", free_port()
    if run_as:
        shutil.chown(folder, "postgres")
    try:
        subprocess.run([*run_as, str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust",
                        "-E", "UTF8", "--no-sync"], check=True, capture_output=True)
        options = f"-p {port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={folder} -c autovacuum=on"
        subprocess.run([*run_as, str(bindir / "pg_ctl"), "-D", str(data), "-l", str(folder / "server.log"), "-w",
                        "-o", options, "start"], check=True, capture_output=True)
        print(f"  PostgreSQL: autovacuum is off on {admin_url}: this benchmark runs its own server on port {port}, "
              "with PostgreSQL's defaults and autovacuum on", flush=True)
        try:
            yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
        finally:
            subprocess.run([*run_as, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                           capture_output=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


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
    result.load_live_seconds, loaded = load_seconds(location)
    print(f"  {store}: {loaded:,} labelled rows loaded from the live log in {result.load_live_seconds:.1f} s",
          flush=True)

    folder = workdir / f"archive-{store}"
    env = {**os.environ, "LATEST_DB": location}
    # The job's own speed: the same work on a copy of the log, with no service beside it.
    with copy_of_log(store, location, workdir) as copy:
        alone, result.archive_seconds, result.archive_peak_mb = run_archive(
            copy, workdir / f"archive-{store}-alone", DAYS - ARCHIVED_DAYS, {**env, "LATEST_DB": copy})
    result.seconds_by_step = alone["seconds_by_step"]
    result.notes.append(f"alone: {alone['rows_archived']:,} rows in {result.archive_seconds:.1f} s; by step: "
                        + ", ".join(f"{k} {v:.1f}" for k, v in alone["seconds_by_step"].items() if v))
    print(f"  {store}: alone, archived {alone['rows_archived']:,} rows in {result.archive_seconds:.1f} s, "
          f"peak {result.archive_peak_mb:.0f} MB", flush=True)
    auth = {"Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}"}
    script = wrk_script(workdir / "predict.lua", orjson.dumps({"data": [reg.row]}), auth)
    port = free_port()
    service = {**service_env(reg, workdir, store), "LATEST_DB": location, "PORT": str(port)}
    with serving(f"service ({store})", service_command(), service, port, "/ready", workdir / f"{store}.log") as server:
        wait_for_challenger(server.url, reg.challenger)
        # The copy's writes out of the page cache first, then the p99 alone: the best of three
        # rounds as long as those beside the job.
        os.sync()
        alone_rounds = [run_wrk(f"{store} alone", server.url + "/predict", script, CLIENTS, seconds,
                                warmup=round_ == 0) for round_ in range(3)]
        outcome: dict = {}

        def archive_job() -> None:
            # Its memory sampled once a second, not every 50 ms: a sample costs a few ms of CPU at
            # normal priority, which must not weigh on the p99 measured (the goal's peak is alone's).
            outcome["result"] = run_archive(location, folder, DAYS - ARCHIVED_DAYS, env, sample_seconds=1.0)

        job = threading.Thread(target=archive_job)
        job.start()
        # wrk runs in rounds for as long as the job does; the figure is the worst round's p99.
        during = [run_wrk(f"{store} while archiving", server.url + "/predict", script, CLIENTS, seconds,
                          warmup=False)]
        while job.is_alive():
            during.append(run_wrk(f"{store} while archiving", server.url + "/predict", script, CLIENTS, seconds,
                                  warmup=False))
        job.join()
    if "result" not in outcome:
        raise RuntimeError(f"the archive job of the {store} log failed")
    archived, result.beside_seconds, result.beside_peak_mb = outcome["result"]
    # The best round alone is the baseline: a round disturbed by the copy's I/O must not flatter the ratio.
    result.p99_alone_ms = min(r.p99_ms for r in alone_rounds)
    result.p99_during_ms = max(r.p99_ms for r in during)
    result.notes.append(f"p99 alone, by {seconds} s round: "
                        + ", ".join(f"{r.p99_ms:.1f}" for r in alone_rounds) + " ms (the best is the baseline)")
    result.notes.append(f"p99 while archiving, by {seconds} s round: "
                        + ", ".join(f"{r.p99_ms:.1f}" for r in during) + " ms")
    result.archived_rows = archived["rows_archived"]
    result.bytes_before, result.bytes_after = archived["log_bytes_before"], archived["log_bytes_after"]
    result.archive_bytes = archived["bytes_written"]
    result.notes.append(f"beside the service under wrk: {result.beside_seconds:.1f} s (the machine busy for "
                        f"{archived['seconds_busy']:.1f} s of it), peak {result.beside_peak_mb:.0f} MB; by step: "
                        + ", ".join(
                            f"{k} {v:.1f}" for k, v in archived["seconds_by_step"].items() if v))
    print(f"  {store}: beside the service, archived {result.archived_rows:,} rows in {result.beside_seconds:.1f} s, "
          f"peak {result.beside_peak_mb:.0f} MB; log {result.bytes_before / 1e9:.2f} → "
          f"{result.bytes_after / 1e9:.2f} GB ({archived['partitions_dropped']} partitions dropped, "
          f"{archived['pages_freed']} pages freed)", flush=True)
    if store == "PostgreSQL":
        result.autovacuum_seconds, result.vacuum_by = autovacuum_seconds(location)
        print(f"  {store}: {result.vacuum_by} cleared the dead rows after {result.autovacuum_seconds} s", flush=True)
    else:  # the off-hours step: the freed pages back to the filesystem, with the service idle
        reclaimed, result.reclaim_seconds, _ = run_archive(location, folder, DAYS - ARCHIVED_DAYS, env,
                                                           "--reclaim", "only")
        result.bytes_after = reclaimed["log_bytes_after"]
        result.reclaimed_bytes = reclaimed["log_bytes_before"] - reclaimed["log_bytes_after"]
        result.vacuum_by = (f"python -m monitoring.archive --reclaim only: {result.reclaimed_bytes / 1e9:.2f} GB in "
                            f"{result.reclaim_seconds:.1f} s, service idle")
        print(f"  {store}: {reclaimed['pages_freed']:,} pages given back in {result.reclaim_seconds:.1f} s, "
              f"log now {result.bytes_after / 1e9:.2f} GB", flush=True)

    run_archive(location, folder, 1e-6, env)  # the rest, so that every labelled row is read from the archive
    result.load_archive_seconds, loaded = load_seconds(location)
    print(f"  {store}: {loaded:,} labelled rows loaded from the archive in {result.load_archive_seconds:.1f} s",
          flush=True)
    return result


def print_table(results: list[StoreResult]) -> int:
    status = 0
    print(f"\n{'store':<11} {'rows':>11} {'archive s':>10} {'peak MB':>8} {'beside s':>9} {'p99 alone':>10} "
          f"{'during':>7} {'ratio':>6} {'load live s':>12} {'archive s':>10} {'ratio':>6} {'log GB before→after':>20} "
          f"{'parquet GB':>11} {'reclaim/vacuum s':>17}")
    for r in results:
        p99_ratio = r.p99_during_ms / r.p99_alone_ms
        load_ratio = r.load_archive_seconds / r.load_live_seconds
        if r.store == "SQLite":
            vacuum = f"{r.reclaim_seconds:.0f}" if r.reclaim_seconds is not None else "-"
        else:
            vacuum = f"{r.autovacuum_seconds:.0f}" if r.autovacuum_seconds is not None else "> 180"
        print(f"{r.store:<11} {r.rows:>11,} {r.archive_seconds:>10.1f} {r.archive_peak_mb:>8.0f} "
              f"{r.beside_seconds:>9.1f} {r.p99_alone_ms:>8.1f}ms {r.p99_during_ms:>5.1f}ms {p99_ratio:>6.2f} "
              f"{r.load_live_seconds:>12.1f} "
              f"{r.load_archive_seconds:>10.1f} {load_ratio:>6.2f} "
              f"{r.bytes_before / 1e9:>9.2f} → {r.bytes_after / 1e9:>6.2f} {r.archive_bytes / 1e9:>11.2f} {vacuum:>17}")
        r.notes.append(f"space given back by {r.vacuum_by}" if r.store == "SQLite"
                       else f"dead rows cleared by {r.vacuum_by}")
        for note in r.notes:
            print(f"  note: {note}")
        scale = 10_000_000 / r.rows
        checks = {"archive ≤ 2 min (alone, scaled to 10M rows)": r.archive_seconds * scale <= GOALS["archive_seconds"],
                  "archive peak ≤ 1 GB": max(r.archive_peak_mb, r.beside_peak_mb) <= GOALS["archive_peak_mb"],
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
    parser.add_argument("--seconds", type=int, default=WRK_ROUND_SECONDS,
                        help="the length of wrk's rounds: three without the job (the best one's p99 is the baseline), "
                             "then as many as the job takes (the worst one's p99 is the figure)")
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
            with postgres_with_autovacuum(args.postgres) as admin, throwaway_database(admin, "retention") as url:
                results.append(measure_store("PostgreSQL", url, rows, workdir, reg, args.seconds))
    return print_table(results)


if __name__ == "__main__":
    sys.exit(main())
