"""The governor holds the archive job's children to their share of a busy machine, and lets them run
on an idle one (monitoring/throttle.py)."""

from __future__ import annotations

import multiprocessing
import os
import time

import pytest

from monitoring.throttle import Governor, proc_stat, process_ticks

TICKS = os.sysconf("SC_CLK_TCK")
# busy_above below zero: every machine counts as busy; at 1, none does (others cannot use more than all of it).
ALWAYS_BUSY, NEVER_BUSY = -1.0, 1.0


def _spin(seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        pass


def _state(pid: int) -> str:
    return proc_stat(pid)[0]


@pytest.fixture
def spinner():
    """The id of a child process that spins for a minute, killed after the test."""
    child = multiprocessing.get_context("fork").Process(target=_spin, args=(60,), daemon=True)
    child.start()
    yield child.pid
    child.kill()
    child.join()


def _cpu_seconds_governed(pid: int, governor: Governor, wall: float = 2.0) -> float:
    with governor:
        governor.watch(pid)
        time.sleep(0.5)  # the first measurements
        before = process_ticks(pid)
        time.sleep(wall)
        used = (process_ticks(pid) - before) / TICKS
    assert _state(pid) != "T"  # continued when the governor stopped
    return used


def test_on_a_busy_machine_a_child_runs_about_its_share_of_the_time(spinner):
    governor = Governor(share=0.1, busy_above=ALWAYS_BUSY)
    used = _cpu_seconds_governed(spinner, governor)
    # 0.2 s of 2 s; alone it would use all 2, and even beside the suite's other workers more than 0.6.
    assert 0 < used < 0.45, used
    assert governor.busy and governor.busy_seconds > 1.5
    assert governor.wait_after(0.01, otherwise=1.0) == pytest.approx(0.09)


def test_on_an_idle_machine_a_child_runs_freely(spinner):
    governor = Governor(share=0.1, busy_above=NEVER_BUSY)
    used = _cpu_seconds_governed(spinner, governor)
    assert used > 0.5, used
    assert not governor.busy and governor.busy_seconds <= 0.3  # busy only until the first measurement
    assert governor.wait_after(0.01, otherwise=1.0) == pytest.approx(0.01)


def test_a_forgotten_child_is_continued_and_never_signalled_again(spinner):
    with Governor(share=0.01, busy_above=ALWAYS_BUSY) as governor:
        governor.watch(spinner)
        deadline = time.monotonic() + 5
        while _state(spinner) != "T" and time.monotonic() < deadline:
            time.sleep(0.01)
        assert _state(spinner) == "T"  # stopped most of the time at a share of 1%
        governor.forget(spinner)
        time.sleep(0.3)
        assert _state(spinner) != "T"


def test_the_jobs_own_work_keeps_the_children_stopped_then_they_run_again(spinner):
    with Governor(share=0.5, busy_above=ALWAYS_BUSY) as governor:
        governor.watch(spinner)
        time.sleep(0.5)
        with governor.turn():
            before = process_ticks(spinner)
            time.sleep(0.5)
            assert process_ticks(spinner) - before <= 1  # a tick (10 ms) of rounding at most
        before = process_ticks(spinner)
        time.sleep(1.0)  # after a pause that makes up for the turn, the child runs again
        assert process_ticks(spinner) > before


def test_share_must_be_a_fraction_of_the_time():
    for share in (0, -0.5, 1.5):
        with pytest.raises(ValueError, match="share"):
            Governor(share=share, busy_above=0.25)
    assert not Governor(share=1.0, busy_above=0.25).enabled
