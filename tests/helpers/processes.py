"""Real processes for end-to-end tests: a free loopback port, a server started with its output in a
log file, waiting on an HTTP endpoint with a deadline, a stop that always reaps the process, and what
/proc says about a process (its children, sockets and memory)."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import requests

from common.paths import REPO_ROOT

VENV_BIN = REPO_ROOT / ".venv" / "bin"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def settings_variables() -> frozenset[str]:
    """Every environment variable a reader in common/settings.py reads (`read_str("NAME")` and kin;
    `read_secret("NAME")` reads NAME and NAME_FILE)."""
    source = (REPO_ROOT / "common" / "settings.py").read_text()
    secrets = re.findall(r'read_secret\(\s*"([A-Z][A-Z0-9_]*)"', source)
    return frozenset([*re.findall(r'read_(?:str|int|float|bool)\(\s*"([A-Z][A-Z0-9_]*)"', source),
                      *secrets, *(f"{name}_FILE" for name in secrets)])


def clean_env(**overrides: str) -> dict[str, str]:
    """The current environment without variables the project reads, so a test sets what it means.

    The project venv's bin comes first on PATH (for `mlflow`, `gunicorn`, `python`).
    """
    env = {key: value for key, value in os.environ.items()
           if key not in settings_variables() and not key.startswith(("MLFLOW_", "PROMETHEUS_", "GUNICORN_"))}
    env["PATH"] = f"{VENV_BIN}:{env.get('PATH', '/usr/bin:/bin')}"
    env.update(overrides)
    return env


@dataclass
class Server:
    """A started process and where its output goes."""

    name: str
    process: subprocess.Popen
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-6000:] if self.log.exists() else ""

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM the process, as `docker stop` does (gunicorn's master then stops its workers);
        SIGKILL its whole process group if it lingers or leaves children behind.

        Returns:
            The process's exit code (negative: killed by that signal).
        """
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.process.wait(10)
        return self.process.returncode


def start(name: str, argv: list[str], *, env: dict[str, str], cwd: Path, log_dir: Path) -> Server:
    """Start `argv` in its own process group, stdout and stderr to `<log_dir>/<name>.log`."""
    log = log_dir / f"{name}.log"
    with log.open("wb") as fh:
        process = subprocess.Popen(argv, cwd=cwd, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    return Server(name, process, log)


def wait_until(server: Server, probe: Callable[[], bool], what: str, timeout: float = 90.0) -> None:
    """Poll `probe` until it returns True; fail with the server's output if it exits or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise AssertionError(f"{server.name} exited ({server.process.returncode}) before {what}:\n"
                                 f"{server.output()}")
        try:
            if probe():
                return
        except requests.RequestException:
            pass
        time.sleep(0.25)
    raise AssertionError(f"{server.name}: no {what} within {timeout:.0f}s:\n{server.output()}")


def http_ok(url: str, **kwargs) -> Callable[[], bool]:
    return lambda: requests.get(url, timeout=5, **kwargs).status_code == 200


def run(argv: list[str], *, env: dict[str, str], cwd: Path, timeout: float = 600.0,
        expect: int = 0) -> subprocess.CompletedProcess:
    """Run a command to completion; fail with its output unless it exits with `expect`."""
    result = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if result.returncode != expect:
        raise AssertionError(f"{' '.join(argv)} exited {result.returncode}, expected {expect}:\n"
                             f"{result.stdout[-4000:]}\n{result.stderr[-6000:]}")
    return result


# --- what /proc says --------------------------------------------------------------------------------


def children(pid: int) -> set[int]:
    """Pids of the live (not zombie) processes whose parent is `pid`."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name may hold spaces and parentheses; the fields after its last ')' do not.
        fields = stat[stat.rindex(")") + 2:].split()
        if fields[0] != "Z" and int(fields[1]) == pid:
            found.add(int(entry.name))
    return found


def socket_inodes(pid: int) -> set[int]:
    """Inodes of the sockets a process holds open (empty once it is gone)."""
    found = set()
    with contextlib.suppress(OSError):
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    found.add(int(target[8:-1]))
    return found


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    """Resident memory of a process in MB: now (VmRSS), or its peak so far (VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return 0.0


def wait_gone(pid: int, timeout: float = 10.0) -> float:
    """Wait until a killed process has released its sockets (it is a zombie or gone); return when.

    SIGKILL takes effect a little after kill() returns; until then the process may still accept.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            break
        if stat[stat.rindex(")") + 2] in "ZX":
            break
        time.sleep(0.001)
    return time.monotonic()
