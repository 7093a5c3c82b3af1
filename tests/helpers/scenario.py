"""What a reliability scenario did, and the one table of them that `make reliability` prints.

A test marked `@pytest.mark.scenario(name)` fills in a `ScenarioRecord` (the `scenario` fixture of
tests/reliability/conftest.py); the conftest adds the test's outcome as `result` and prints `table`
of every record in the terminal summary.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tests.helpers.load import Load

OK = "ok"
FAILED = "FAILED"
SKIPPED = "skipped"


@dataclass
class ScenarioRecord:
    """One row of the table; plain values only, so that it travels in a report's user_properties."""

    name: str
    load: str = "-"  # clients × seconds the load held
    requests: int = 0
    errors: int = 0  # requests that did not get the answer a healthy service gives
    faults: int = 0  # faults injected and survived
    inputs: int = 0  # hostile or generated inputs tried
    rows_lost: int | None = None  # rows reported as scored but missing from the request log
    duplicates: int | None = None  # rows the request log holds more than once (where a retried write could)
    repairs: int | None = None  # registry repairs a gate made after another was killed
    notes: list[str] = field(default_factory=list)
    result: str = OK  # OK, FAILED, or "skipped: <reason>": the test's outcome, set by the conftest
    began: float = field(default_factory=time.monotonic, repr=False)

    def step(self, what: str) -> None:
        """Say a step with its time since the scenario began (stderr: pytest shows it on failure)."""
        print(f"  [{self.name}] {time.monotonic() - self.began:6.1f} s  {what}", file=sys.stderr, flush=True)

    def took(self, load: Load) -> None:
        """Fill in the load column from a finished `Load`, and count its requests and failed ones."""
        outcomes = load.outcomes
        self.load = f"{load.clients} × {load.elapsed:.0f}"
        self.requests = len(outcomes)
        self.errors = sum(1 for o in outcomes if not o.ok)


HEADER = ("scenario", "load held (clients × s)", "requests", "errors", "faults survived", "inputs tried",
          "rows lost", "rows twice", "repairs", "result")


def _count(value: int | None) -> str:
    return "-" if value is None else f"{value:,}"


def table(records: list[ScenarioRecord]) -> str:
    """One line per scenario and a total, which is FAILED when any scenario failed, lost a row or
    logged one twice."""
    body = [(r.name, r.load, f"{r.requests:,}", f"{r.errors:,}", str(r.faults), f"{r.inputs:,}",
             _count(r.rows_lost), _count(r.duplicates), _count(r.repairs), r.result) for r in records]
    ran = [r for r in records if not r.result.startswith(SKIPPED)]
    lost = sum(r.rows_lost or 0 for r in ran)
    twice = sum(r.duplicates or 0 for r in ran)
    body.append(("total", "", f"{sum(r.requests for r in ran):,}", f"{sum(r.errors for r in ran):,}",
                 str(sum(r.faults for r in ran)), f"{sum(r.inputs for r in ran):,}", str(lost), str(twice),
                 str(sum(r.repairs or 0 for r in ran)),
                 OK if all(r.result == OK for r in ran) and lost == 0 and twice == 0 else FAILED))
    widths = [max(len(row[i]) for row in (HEADER, *body)) for i in range(len(HEADER))]
    left = (0, 1, len(HEADER) - 1)

    def line(row: tuple[str, ...]) -> str:
        return "  ".join(cell.ljust(w) if i in left else cell.rjust(w)
                         for i, (cell, w) in enumerate(zip(row, widths, strict=True))).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(HEADER), rule, *(line(row) for row in body[:-1]), rule, line(body[-1])])
