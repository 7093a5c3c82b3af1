"""Full-size data generation and import: 284,807 rows, medians of repeated runs.

The baseline, measured in the same run, is `pandas.read_csv` of the same file: the least any
importer has to do. The import's ratio to it shows what validation, scaling, keys and the
transactional insert cost on top.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

from training.generate import FULL_ROWS, generate
from training.import_csv import import_csv

REPEATS = 3


def _timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    with tempfile.TemporaryDirectory(prefix="bench-generate-") as scratch:
        root = Path(scratch)
        csv = root / "creditcard.csv"
        gen_times, read_times, import_times, reimport_times = [], [], [], []
        for i in range(REPEATS):
            gen_times.append(_timed(lambda: generate(rows=FULL_ROWS, seed=0, out=csv)))
            read_times.append(_timed(lambda: pd.read_csv(csv)))
            db, config = root / f"ref-{i}.db", root / f"fc-{i}.json"
            import_times.append(_timed(lambda db=db, config=config: import_csv(csv, str(db), config)))
            reimport_times.append(_timed(lambda db=db, config=config: import_csv(csv, str(db), config)))
    read = statistics.median(read_times)
    rows = [
        ("generate 284,807 rows to CSV", statistics.median(gen_times)),
        ("baseline: pandas.read_csv of that file", read),
        ("import into an empty SQLite reference DB", statistics.median(import_times)),
        ("re-import (idempotent, adds 0 rows)", statistics.median(reimport_times)),
    ]
    print(f"{'step':<45} {'median s':>9} {'x read_csv':>11}")
    for name, seconds in rows:
        print(f"{name:<45} {seconds:>9.2f} {seconds / read:>11.2f}")
    total = rows[0][1] + rows[2][1]
    print(f"generation + import: {total:.1f} s (median of {REPEATS})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
