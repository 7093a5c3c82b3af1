"""What the service tests share: tokens, the serving registry, the error shape, Prometheus parsing,
file corruption."""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from tests.helpers.builders import (
    MlflowStore,
    ReferenceData,
    TrainedModel,
    new_mlflow_store,
    promote_by_hand,
    record_as_gate,
    train_model,
)

TOKEN = "test-token-primary"
OTHER_TOKEN = "test-token-rotated"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
POLL_SECONDS = 0.2
DEADLINE_SECONDS = 30


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


def build_serving_registry(root: Path, data: ReferenceData) -> ServingRegistry:
    """Train versions 1 (seed 0, moved to Production) and 2 (seed 1, Staging) into a new store. Both carry
    the promotion gate's record, so a test may move version 2 to Production by hand and see it served."""
    store = new_mlflow_store(root)
    v1 = train_model(store, data, seed=0)
    v2 = train_model(store, data, seed=1)
    promote_by_hand(store.client(), v1.name, v1.version)
    record_as_gate(store.client(), v2.name, v2.version)
    return ServingRegistry(store, data, v1, v2)


def is_error_shape(answer: object, code: str) -> bool:
    """`{"error": {"code": code, "message": "..."}}` and nothing else: the service's one error shape."""
    return (isinstance(answer, dict) and set(answer) == {"error"} and isinstance(answer["error"], dict)
            and set(answer["error"]) == {"code", "message"} and answer["error"]["code"] == code
            and isinstance(answer["error"]["message"], str) and bool(answer["error"]["message"]))


def parse_metrics(text: str) -> dict[tuple, float]:
    """Prometheus text -> {(name, sorted label pairs): value}, via prometheus_client's own parser."""
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def corrupt_copy_of(path: Path) -> None:
    """Overwrite a file in place with bytes no reader can parse (same inode, so open handles see it)."""
    size = path.stat().st_size
    with path.open("r+b") as fh:
        fh.write(b"\x00garbage" * (size // 8 + 1))


def restore(src: Path, dest: Path) -> None:
    shutil.copyfile(src, dest)


def wait_for(condition, what: str, timeout: float = DEADLINE_SECONDS):
    """Poll `condition` every 50 ms until it returns something true (returned), or fail the test."""
    import pytest

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    pytest.fail(f"timed out after {timeout} s waiting for {what}")
