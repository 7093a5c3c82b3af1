"""The retention benchmark's own logic, without its logs and servers (`make bench` runs the rest)."""

from __future__ import annotations

import os
import subprocess
import sys

from benchmarks.retention import StoreResult, print_table, tree_rss_mb


def test_the_memory_of_a_process_tree_counts_its_children():
    alone = tree_rss_mb(os.getpid())
    child = subprocess.Popen([sys.executable, "-c", "import time; b = bytearray(200_000_000); time.sleep(30)"])
    try:
        for _ in range(100):
            if tree_rss_mb(os.getpid()) > alone + 150:
                break
            subprocess.run(["sleep", "0.05"], check=True)
        assert tree_rss_mb(os.getpid()) > alone + 150
    finally:
        child.kill()
        child.wait()


def test_the_table_judges_each_goal(capsys):
    good = StoreResult("SQLite", 10_000_000, load_live_seconds=10, load_archive_seconds=12, p99_alone_ms=5,
                       p99_during_ms=7, archive_seconds=100, archive_peak_mb=800)
    assert print_table([good]) == 0
    slow = StoreResult("SQLite", 1_000_000, load_live_seconds=10, load_archive_seconds=14, p99_alone_ms=5,
                       p99_during_ms=8, archive_seconds=13, archive_peak_mb=800)
    assert print_table([slow]) == 1
    out = capsys.readouterr().out
    assert out.count("MISSED") == 3  # 13 s at 1M rows is 130 s at 10M; 1.6× the p99; 1.4× the load
