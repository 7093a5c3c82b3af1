"""Fixtures for the service: a registry with two trained versions, private copies of it for tests
that move stages, and apps built through `create_app` against them."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from common.registry import move_to_stage
from tests.conftest import MlflowStore, ReferenceData, TrainedModel, new_mlflow_store, train_model

TOKEN = "test-token-primary"
OTHER_TOKEN = "test-token-rotated"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
POLL_SECONDS = 0.2


@dataclass(frozen=True)
class ServingRegistry:
    """A registry where version 1 is in Production and version 2 (another seed) in Staging."""

    store: MlflowStore
    data: ReferenceData
    v1: TrainedModel
    v2: TrainedModel

    @property
    def name(self) -> str:
        return self.v1.name

    def copy(self, dest: Path) -> MlflowStore:
        """A private copy of the registry database (artifacts are shared read-only by path)."""
        return self.store.copy(dest)


@pytest.fixture(scope="session")
def serving_registry(tmp_path_factory, reference_data) -> ServingRegistry:
    store = new_mlflow_store(tmp_path_factory.mktemp("serving-registry"))
    v1 = train_model(store, reference_data, seed=0)
    v2 = train_model(store, reference_data, seed=1)
    move_to_stage(store.client(), v1.name, v1.version, "Production")
    return ServingRegistry(store, reference_data, v1, v2)


@pytest.fixture
def private_registry(serving_registry, tmp_path) -> MlflowStore:
    """A copy of `serving_registry` this test may change (stages, new versions)."""
    return serving_registry.copy(tmp_path / "registry")


@pytest.fixture
def make_app(tmp_path, serving_registry) -> Iterator[Callable]:
    """Build apps through `create_app`; every one is stopped (poller, engines) after the test.

    Defaults: the shared registry (read-only), a SQLite request log under tmp_path, two tokens,
    a 0.2 s poll. Keyword arguments override `service.app.Config` fields.
    """
    from service.app import create_app, service_of

    apps = []

    def factory(**overrides):
        config = {
            "tokens": (TOKEN, OTHER_TOKEN),
            "request_log": str(tmp_path / "requests.db"),
            "tracking_uri": serving_registry.store.tracking_uri,
            "model_name": serving_registry.name,
            "model_uri": None,
            "fraud_threshold": None,
            "poll_seconds": POLL_SECONDS,
            "max_rows": 5000,
            "max_body_bytes": 4 * 1024 * 1024,
            "feature_config": str(serving_registry.data.feature_config),
            **overrides,
        }
        app = create_app(config)
        apps.append(app)
        return app

    yield factory
    for app in apps:
        service_of(app).close()


@pytest.fixture
def app(make_app):
    return make_app()


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture(scope="session")
def sample_rows(reference_data) -> list[list[float]]:
    """Real rows of the reference data (frauds first), in FEATURES order."""
    from common.schema import FEATURES, LABEL
    from common.store import RequestStore

    frame = RequestStore(str(reference_data.db), create=False).read_frame((*FEATURES, LABEL))
    frame = frame.sort_values(LABEL, ascending=False, kind="stable")
    return frame[list(FEATURES)].head(50).to_numpy().tolist()


def corrupt_copy_of(path: Path) -> None:
    """Overwrite a file in place with bytes no reader can parse (same inode, so open handles see it)."""
    size = path.stat().st_size
    with path.open("r+b") as fh:
        fh.write(b"\x00garbage" * (size // 8 + 1))


def restore(src: Path, dest: Path) -> None:
    shutil.copyfile(src, dest)
