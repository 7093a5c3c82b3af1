"""Shared fixtures: real MLflow stores, reference data and a tiny trained model, real PostgreSQL.

Everything is built for real and cheaply: a SQLite MLflow store under tmp_path, a few thousand
generated rows imported with the project's own importer (fraud rate 0.02, so a 15-tree forest is
meaningful), and a model trained and registered by `training.train.train`.

Environment handling is explicit. Session fixtures set variables only inside
`pytest.MonkeyPatch.context()` while they build, and hand back an `env` dict; a test that wants
the variables applies them with its own `monkeypatch` (or the `use_env` helper fixture), so
nothing leaks from one test to another.

Fixtures:
    reference_data      session: ReferenceData (db, csv, feature_config, rows, frauds, env()).
    mlflow_store        session: MlflowStore (tracking_uri, artifact_root, env()); shared, so tests
                        that move stages should use `make_mlflow_store` instead.
    trained_model       session: TrainedModel registered in `mlflow_store` (name, version, run_id,
                        threshold, result, env()), stage Staging, alias challenger.
    serving_registry    session: ServingRegistry, versions 1 (Production) and 2 (Staging).
    private_registry    function: a copy of `serving_registry`'s store this test may change.
    sample_rows         session: 50 real rows of the reference data (frauds first), FEATURES order.
    make_mlflow_store   function: factory, () -> a fresh MlflowStore under tmp_path.
    train_tiny_model    function: factory, (store, data=reference_data, **TrainParams fields) ->
                        TrainedModel; trains and registers with the env scoped to the call.
    use_env             function: (dict) -> None; applies an env dict through monkeypatch.
    postgres_url        function: a fresh, uniquely named PostgreSQL database URL, dropped after;
                        skipped when PostgreSQL is unreachable unless REQUIRE_POSTGRES=1 (fails).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator

import pytest

from tests.helpers.builders import (
    MlflowStore,
    ReferenceData,
    TrainedModel,
    build_reference_data,
    new_mlflow_store,
    train_model,
)
from tests.helpers.service import ServingRegistry, build_serving_registry

POSTGRES_HOST = "127.0.0.1"
POSTGRES_PORT = 5432


@pytest.fixture(scope="session")
def reference_data(tmp_path_factory) -> ReferenceData:
    return build_reference_data(tmp_path_factory.mktemp("reference"))


@pytest.fixture(scope="session")
def mlflow_store(tmp_path_factory) -> MlflowStore:
    return new_mlflow_store(tmp_path_factory.mktemp("mlflow"))


@pytest.fixture(scope="session")
def trained_model(mlflow_store, reference_data) -> TrainedModel:
    return train_model(mlflow_store, reference_data)


@pytest.fixture(scope="session")
def serving_registry(tmp_path_factory, reference_data) -> ServingRegistry:
    """Versions 1 (Production) and 2 (Staging) of the tiny model, for the service and reliability tests."""
    return build_serving_registry(tmp_path_factory.mktemp("serving-registry"), reference_data)


@pytest.fixture
def private_registry(serving_registry, tmp_path) -> MlflowStore:
    """A copy of `serving_registry` this test may change (stages, new versions)."""
    return serving_registry.copy(tmp_path / "registry")


@pytest.fixture(scope="session")
def sample_rows(reference_data) -> list[list[float]]:
    """Real rows of the reference data (frauds first, so both decisions occur), in FEATURES order."""
    from common.schema import FEATURES, LABEL
    from common.store import RequestStore

    store = RequestStore(str(reference_data.db), create=False)
    try:
        frame = store.read_frame((*FEATURES, LABEL))
    finally:
        store.dispose()
    frame = frame.sort_values(LABEL, ascending=False, kind="stable")
    return frame[list(FEATURES)].head(50).to_numpy().tolist()


@pytest.fixture
def make_mlflow_store(tmp_path) -> Callable[[], MlflowStore]:
    counter = iter(range(1_000_000))
    return lambda: new_mlflow_store(tmp_path / f"mlflow-{next(counter)}")


@pytest.fixture
def train_tiny_model(reference_data) -> Callable[..., TrainedModel]:
    def factory(store: MlflowStore, data: ReferenceData | None = None, **overrides) -> TrainedModel:
        return train_model(store, data or reference_data, **overrides)
    return factory


@pytest.fixture
def use_env(monkeypatch) -> Callable[[dict[str, str]], None]:
    def apply(env: dict[str, str]) -> None:
        for key, value in env.items():
            monkeypatch.setenv(key, value)
    return apply


# --- PostgreSQL -----------------------------------------------------------------------------------


def _postgres_admin_url() -> str | None:
    """A reachable admin URL (users postgres, then root), or None."""
    import psycopg

    for user in ("postgres", "root"):
        url = f"postgresql://{user}@{POSTGRES_HOST}:{POSTGRES_PORT}/postgres"
        try:
            with psycopg.connect(url, connect_timeout=3):
                return url
        except psycopg.Error:
            continue
    return None


def _postgres_admin_url_or_skip() -> str:
    """The admin URL, or skip the test (fail it with REQUIRE_POSTGRES=1) when PostgreSQL is not reachable."""
    admin = _postgres_admin_url()
    if admin is None:
        reason = f"PostgreSQL is not reachable at {POSTGRES_HOST}:{POSTGRES_PORT} (users postgres, root)"
        if os.environ.get("REQUIRE_POSTGRES") == "1":
            pytest.fail(f"{reason}, and REQUIRE_POSTGRES=1")
        pytest.skip(reason)
    return admin


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh PostgreSQL database (postgresql://user@127.0.0.1:5432/test_<random>), dropped afterwards."""
    import psycopg

    admin = _postgres_admin_url_or_skip()
    name = f"test_{uuid.uuid4().hex[:16]}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield admin.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def make_postgres_url() -> Iterator[Callable[[str], str]]:
    """Factory for several fresh databases in one test: `make_postgres_url("tracking")` returns
    postgresql://user@127.0.0.1:5432/test_<random>_tracking; every one is dropped afterwards.
    Skipped (or failed, with REQUIRE_POSTGRES=1) like `postgres_url`."""
    import psycopg

    admin = _postgres_admin_url_or_skip()
    prefix = f"test_{uuid.uuid4().hex[:12]}"
    created: list[str] = []

    def create(label: str) -> str:
        if not label.isidentifier():
            raise ValueError(f"database label {label!r} must be an identifier")
        name = f"{prefix}_{label}"
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        created.append(name)
        return admin.rsplit("/", 1)[0] + f"/{name}"

    try:
        yield create
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            for name in created:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Modules that hold a slow test run first; the order within each group is kept.

    xdist's `loadscope` gives each worker whole modules. Its own reordering (largest module first)
    would start the longest end-to-end modules, which hold one or two tests each, last, so the run
    would end on one worker alone; pyproject.toml turns it off (`--no-loadscope-reorder`) for this.
    """
    slow = {item.nodeid.split("::")[0] for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.nodeid.split("::")[0] not in slow)
