"""Keep a background job out of a busy service's way: while the machine is busy, its child processes
run in short slices, a set share of the time.

A priority alone does not do it: on a VM's few cores, work at the lowest priority beside a saturated
service still halves its throughput (docs/decisions/035-archive-yields-to-a-busy-machine.md). So the
`Governor` measures what the rest of the machine uses (/proc/stat, less the job's own processes).
While that is above `busy_above`, it lets the children it watches run `slice_seconds` at a time,
`share` of the wall time, by stopping and continuing them (SIGSTOP, SIGCONT): their work is C code
(a database driver, Parquet) that cannot be paused from inside. On a machine with CPU to spare they
run freely. The job's own work (its deletes) takes its `turn()` with them, and waits after each
write with `wait_after()`.

Failing safe: the machine counts as busy until it is first measured, and when its CPU cannot be
measured; every watched child is continued when the governor stops, or when its thread fails; a
child that the kernel kills with its parent (PR_SET_PDEATHSIG) dies stopped or not.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time

log = logging.getLogger(__name__)


def machine_ticks() -> tuple[int, int] | None:
    """(busy, total) CPU ticks of the whole machine since boot, or None where /proc/stat is missing."""
    try:
        with open("/proc/stat") as stat:
            values = [int(v) for v in stat.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    # user nice system idle iowait irq softirq steal [guest guest_nice: already in user and nice]
    total = sum(values[:8])
    return total - values[3] - values[4], total


def proc_stat(pid: int | str) -> list[str] | None:
    """/proc/<pid>/stat's fields from the third (the state) on, or None for a process that has gone."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            text = stat.read()
    except OSError:
        return None
    return text[text.rindex(")") + 2:].split()


def process_ticks(pid: int, waited_children: bool = False) -> int:
    """CPU ticks (user + system) a process has used; with its waited-for children's when asked. 0 if gone."""
    fields = proc_stat(pid)
    if fields is None:
        return 0
    # utime, stime, cutime, cstime are fields 14 to 17
    ticks = int(fields[11]) + int(fields[12])
    return ticks + int(fields[13]) + int(fields[14]) if waited_children else ticks


class Governor:
    """Watches the machine's CPU in a thread and holds the watched child processes to `share` of the
    wall time while other processes use more than `busy_above` of it.

    Args:
        share: the share of wall time the children may run while the machine is busy; 1 never stops them.
        busy_above: the share of the machine's CPU (all cores) that other processes must use for it to
            count as busy.
        slice_seconds: how long the children run at a time while the machine is busy.
        sample_seconds: how often the machine is measured.
    """

    def __init__(self, share: float, busy_above: float, slice_seconds: float = 0.005, sample_seconds: float = 0.25):
        if not 0 < share <= 1:
            raise ValueError(f"share must be in (0, 1], got {share}")
        self.share, self.busy_above = share, busy_above
        self.slice_seconds, self.sample_seconds = slice_seconds, sample_seconds
        self.busy = False
        self.busy_seconds = 0.0  # wall time during which the machine counted as busy
        self._children: set[int] = set()
        self._lock = threading.Lock()
        self._turn = threading.Lock()  # held by a child's slice, or by the job's own work while busy
        self._owed = 0.0  # seconds of the job's own work that the children's next pause makes up for
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._last: tuple[int, int, int] | None = None  # (machine busy, machine total, the job's own) ticks

    @property
    def enabled(self) -> bool:
        return self.share < 1

    def __enter__(self) -> Governor:
        if self.enabled:
            self.busy = True  # until the first measurement says otherwise
            self._measure()
            self._thread = threading.Thread(target=self._run, name="archive-governor", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *_exc) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join()
        self._signal(signal.SIGCONT)

    def watch(self, pid: int) -> None:
        """Govern a child process from now on."""
        with self._lock:
            self._children.add(pid)

    def forget(self, pid: int) -> None:
        """Stop governing a child, and let it run: call it before the child is reaped, so that its id
        is never signalled once the system may have given it to another process."""
        with self._lock:
            self._children.discard(pid)
        _send(pid, signal.SIGCONT)

    @contextlib.contextmanager
    def turn(self):
        """Around the job's own work (its deletes): while the machine is busy, the children stay
        stopped meanwhile, and the time counts against the same share as theirs."""
        if not (self.enabled and self.busy):
            yield
            return
        with self._turn:
            started = time.monotonic()
            try:
                yield
            finally:
                self._owed += time.monotonic() - started

    def wait_after(self, took: float, otherwise: float) -> float:
        """How long the job's own process should wait after work that took `took` seconds: as long as
        keeps it to `share` while the machine is busy, `otherwise` times `took` when it is not."""
        if self.enabled and self.busy:
            return took * max(otherwise, (1 - self.share) / self.share)
        return took * otherwise

    # --- the thread ------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            measured, turn = time.monotonic(), 0
            while not self._stopping.is_set():
                now = time.monotonic()
                if now - measured >= self.sample_seconds:
                    if self.busy:
                        self.busy_seconds += now - measured
                    measured = now
                    self._measure()
                if self.busy:
                    # One child at a time, in turn: together they run `share` of the time.
                    turn += 1
                    with self._turn:
                        self._signal(signal.SIGSTOP, but=turn)
                        self._stopping.wait(self.slice_seconds)
                        self._signal(signal.SIGSTOP)
                        owed, self._owed = self._owed, 0.0
                    self._stopping.wait((self.slice_seconds + owed) * (1 - self.share) / self.share)
                else:
                    self._signal(signal.SIGCONT)
                    self._stopping.wait(self.sample_seconds)
        except Exception:  # never leave a child stopped
            log.exception("the archive's CPU governor failed; the job's children run freely")
            self.busy = False
        finally:
            self._signal(signal.SIGCONT)

    def _measure(self) -> None:
        machine = machine_ticks()
        if machine is None:
            self.busy = True
            return
        with self._lock:
            children = list(self._children)
        own = process_ticks(os.getpid(), waited_children=True) + sum(map(process_ticks, children))
        current = (*machine, own)
        if self._last is not None:
            busy, total = current[0] - self._last[0], current[1] - self._last[1]
            others = busy - max(0, current[2] - self._last[2])
            if total > 0:
                self.busy = others / total > self.busy_above
        self._last = current

    def _signal(self, signum: int, but: int | None = None) -> None:
        """Send `signum` to every watched child; with `but`, continue the child whose turn it is instead."""
        with self._lock:
            children = sorted(self._children)
            for index, pid in enumerate(children):
                _send(pid, signal.SIGCONT if but is not None and index == but % len(children) else signum)


def _send(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signum)
