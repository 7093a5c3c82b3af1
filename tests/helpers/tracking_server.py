"""A real `mlflow server` as a registry the service polls, and model versions that cannot be served."""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Callable
from pathlib import Path

from common.schema import FEATURES
from tests.helpers import processes
from tests.helpers.builders import MlflowStore
from tests.helpers.gunicorn import OFFLINE, START_SECONDS

# What every `mlflow server` of the tests runs with, as compose's: without MLflow's job runners
# (huey consumers), which this project never uses (docs/decisions/032-suite-time.md).
SERVER_ENV = {**OFFLINE, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


class TrackingServer:
    """`mlflow server` over a registry, on a loopback port fixed at construction so it can come back."""

    def __init__(self, store: MlflowStore, workdir: Path):
        self.store, self.workdir = store, workdir
        self.port = processes.free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server: processes.Server | None = None
        self.starts = 0

    def start(self, wait: bool = True) -> None:
        """Start it; with `wait`, until /health answers (AssertionError with its output otherwise)."""
        self.starts += 1
        argv = [str(processes.VENV_BIN / "mlflow"), "server", "--backend-store-uri", self.store.tracking_uri,
                "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"]
        self.server = processes.start(f"mlflow-server-{self.starts}", argv, env=processes.clean_env(**SERVER_ENV),
                                      cwd=self.workdir, log_dir=self.workdir)
        if wait:
            self.wait()

    def wait(self) -> None:
        assert self.server is not None, "the tracking server was not started"
        processes.wait_until(self.server, processes.http_ok(f"{self.url}/health"), "tracking server health",
                             timeout=START_SECONDS)

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None

    def kill(self) -> None:
        """Gone at once, as in a crash (a graceful stop waits for the workers' keep-alive connections)."""
        if self.server is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.server.process.pid, signal.SIGKILL)
            self.server.process.wait(30)
            self.server = None


def corrupt_version(store: MlflowStore, name: str, version: str, dest: Path) -> str:
    """Register a copy of `name` `version` whose serialized model is garbage; returns the new version."""
    return _altered_copy(store, name, version, dest, lambda model_dir: (model_dir / "model.skops").write_bytes(
        b"\x00this is not a model\x00" * 64))


def incompatible_version(store: MlflowStore, name: str, version: str, dest: Path) -> str:
    """Register a copy of `name` `version` whose signature takes 28 inputs (no Amount_scaled)."""
    from mlflow.models import Model, ModelSignature
    from mlflow.types import ColSpec, Schema

    def alter(model_dir: Path) -> None:
        model = Model.load(model_dir)
        model.signature = ModelSignature(inputs=Schema([ColSpec("double", name) for name in FEATURES[:-1]]),
                                         outputs=model.signature.outputs)
        model.save(model_dir / "MLmodel")

    return _altered_copy(store, name, version, dest, alter)


def _altered_copy(store: MlflowStore, name: str, version: str, dest: Path, alter: Callable[[Path], None]) -> str:
    import mlflow

    client = store.client()
    source = client.get_model_version_download_uri(name, version)
    model_dir = Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(dest),
                                                         tracking_uri=client.tracking_uri))
    alter(model_dir)
    return str(client.create_model_version(name, source=str(model_dir), run_id=None).version)
