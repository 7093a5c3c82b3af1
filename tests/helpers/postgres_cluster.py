"""A private PostgreSQL cluster that a test may stop and start: never the machine's shared server."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from tests.helpers import processes


class PrivatePostgres:
    """A cluster made with initdb in a temporary folder, listening on a free loopback port.

    Stopping it disturbs nobody, which a shared server (the `postgres_url` fixture's) cannot promise.
    initdb refuses to run as root, so as root the cluster runs as user `postgres`. Use as a context
    manager: the cluster is always stopped and its folder removed.
    """

    def __init__(self) -> None:
        reason = self.unavailable()
        if reason:
            raise RuntimeError(reason)
        self.bin = self.binaries()
        self.root = Path(tempfile.mkdtemp(prefix="private-postgres-"))
        self.data = self.root / "data"
        self.port = processes.free_port()
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        self._as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []

    @staticmethod
    def binaries() -> Path | None:
        """The newest /usr/lib/postgresql/<version>/bin with initdb and pg_ctl."""
        found = [p for p in Path("/usr/lib/postgresql").glob("*/bin")
                 if (p / "initdb").exists() and (p / "pg_ctl").exists()]
        found.sort(key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0)
        return found[-1] if found else None

    @classmethod
    def unavailable(cls) -> str | None:
        """Why no private cluster can be made here, or None."""
        if cls.binaries() is None:
            return "no PostgreSQL server binaries (initdb, pg_ctl) under /usr/lib/postgresql/*/bin"
        if os.geteuid() == 0:
            try:
                import pwd

                pwd.getpwnam("postgres")
            except KeyError:
                return "running as root and there is no user 'postgres' to run initdb as"
            if shutil.which("runuser") is None:
                return "running as root and runuser is missing (initdb refuses root)"
        return None

    def _pg(self, tool: str, *args: str, timeout: float = 120) -> None:
        subprocess.run([*self._as_user, str(self.bin / tool), *args], check=True, capture_output=True,
                       timeout=timeout)

    def __enter__(self) -> PrivatePostgres:
        try:
            if self._as_user:
                shutil.chown(self.root, "postgres", "postgres")
            self._pg("initdb", "-D", str(self.data), "--auth=trust", "--username=postgres", "--encoding=UTF8",
                     "--no-sync")
            self.start()
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        self.remove()

    def start(self) -> None:
        # fsync off: a test cluster; listen on loopback only, socket in our own folder.
        options = f"-p {self.port} -k {self.root} -h 127.0.0.1 -F"
        self._pg("pg_ctl", "-D", str(self.data), "-l", str(self.root / "server.log"), "-o", options, "-w",
                 "-t", "60", "start")

    def stop(self, mode: str = "fast") -> None:
        self._pg("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")

    def remove(self) -> None:
        if (self.data / "postmaster.pid").exists():
            with contextlib.suppress(subprocess.SubprocessError, OSError):
                self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)
