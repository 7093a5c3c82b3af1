"""MLflow helpers every stage needs: tracking setup, experiments, and the registry's stage/alias pairs.

Registry stages are deprecated in MLflow 3 in favour of aliases; this project keeps both in step:
Production <-> `champion`, Staging <-> `challenger`, and the version Production replaced gets
`previous` (stage Archived). Every stage change goes through `move_to_stage`.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import mlflow
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from common import settings

STAGE_ALIASES = {"Production": "champion", "Staging": "challenger"}
PREVIOUS_ALIAS = "previous"

TRAINING_EXPERIMENT = "fraud-training"
DRIFT_EXPERIMENT = "drift-monitoring"
PROMOTION_EXPERIMENT = "promotions"
PERFORMANCE_EXPERIMENT = "performance-monitoring"


@contextmanager
def stages_api() -> Iterator[None]:
    """Call the deprecated stage API without its FutureWarning: we keep stages on purpose, in
    step with aliases, because CI and users still promote by stage."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"mlflow\..*")
        warnings.filterwarnings("ignore", message=r".*[Ss]tage.*deprecated.*")
        # e.g. "``MlflowClient.get_latest_versions`` is deprecated since 2.9.0. Model registry stages ..."
        warnings.filterwarnings("ignore", message=r".*deprecated.*[Ss]tages?\b.*", category=FutureWarning)
        yield


def apply_credentials() -> None:
    """Give MLflow's client the tracking server's user and password when they come from files
    (MLFLOW_TRACKING_USERNAME_FILE, MLFLOW_TRACKING_PASSWORD_FILE): MLflow reads only the variables,
    so they are set in this process's environment, which subprocesses (`mlflow run` steps) inherit.

    Raises:
        SettingsError: a file cannot be read.
    """
    for name, value in zip(("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"), settings.tracking_credentials(),
                           strict=True):
        if value is not None and os.environ.get(name) != value:
            os.environ[name] = value


def configure_tracking(uri: str | None = None) -> str:
    """Point MLflow's tracking and registry at `uri` (default: MLFLOW_TRACKING_URI). Returns it."""
    uri = uri or settings.tracking_uri()
    apply_credentials()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return uri


@contextmanager
def use_tracking(uri: str) -> Iterator[str]:
    """Point MLflow's fluent API (tracking and registry) at `uri` for the block; then give the
    caller back the URIs MLflow resolved before and the MLFLOW_TRACKING_URI / MLFLOW_REGISTRY_URI
    environment it had."""
    saved_env = {key: os.environ.get(key) for key in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    saved_tracking, saved_registry = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    configure_tracking(uri)
    try:
        yield uri
    finally:
        # None unsets a URI set in code (MLflow's own code restores an unset URI so); then the
        # environment decides, as it did before. Only a URI the caller had set in code, different
        # from its environment, is set again.
        mlflow.set_tracking_uri(None)
        mlflow.set_registry_uri(None)
        _restore_environment(saved_env)
        if mlflow.get_tracking_uri() != saved_tracking:
            mlflow.set_tracking_uri(saved_tracking)
        if mlflow.get_registry_uri() != saved_registry:
            mlflow.set_registry_uri(saved_registry)
        _restore_environment(saved_env)  # setting a URI also exports it


def _restore_environment(saved: dict[str, str | None]) -> None:
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def client(uri: str | None = None) -> MlflowClient:
    """A client for `uri` (default: MLFLOW_TRACKING_URI), for both tracking and registry, logged in
    as MLFLOW_TRACKING_USERNAME when the server wants a user (`apply_credentials`)."""
    uri = uri or settings.tracking_uri()
    apply_credentials()
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def is_local_store(uri: str) -> bool:
    """True for the embedded stores (SQLite file, or a database without a tracking server)."""
    return not uri.startswith(("http://", "https://", "databricks"))


def ensure_experiment(name: str, uri: str | None = None) -> str:
    """Return the id of experiment `name`, creating it when missing.

    In the embedded store its artifacts go under MLFLOW_ARTIFACT_ROOT (default `mlruns/`); a
    tracking server chooses its own (proxied) artifact location.
    """
    uri = uri or settings.tracking_uri()
    mlflow_client = client(uri)
    experiment = mlflow_client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    location = None
    if is_local_store(uri):
        root = settings.artifact_root()
        location = root if "://" in root else f"file://{root}"
        location = f"{location.rstrip('/')}/{name}"
    try:
        return mlflow_client.create_experiment(name, artifact_location=location)
    except MlflowException:
        # Another process created it between our look-up and create.
        experiment = mlflow_client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


def version_in_stage(mlflow_client: MlflowClient, name: str, stage: str) -> ModelVersion | None:
    """The newest version of `name` in `stage`, or None (also when the model is not registered)."""
    try:
        with stages_api():
            versions = mlflow_client.get_latest_versions(name, stages=[stage])
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    return max(versions, key=lambda v: int(v.version)) if versions else None


def version_with_alias(mlflow_client: MlflowClient, name: str, alias: str) -> ModelVersion | None:
    """The version of `name` that holds `alias`, or None when none does (or the model is not registered).

    Raises:
        MlflowException: any other registry error (unreachable, a malformed name ...).
    """
    try:
        return mlflow_client.get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        if is_missing_alias(exc, alias) or exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise


def is_missing_alias(exc: MlflowException, alias: str) -> bool:
    """Whether `exc` is the registry's answer for an alias no version holds. MLflow 3 gives it no
    code of its own: INVALID_PARAMETER_VALUE, "Registered model alias <alias> not found." (the SQL
    store, and a tracking server in front of one)."""
    return exc.error_code == "INVALID_PARAMETER_VALUE" and f"alias {alias} not found" in exc.message


def production_version(mlflow_client: MlflowClient, name: str) -> ModelVersion | None:
    """The version the registry serves: the one with alias `champion`, else (a registry promoted by
    stage alone, before aliases) the newest version in stage Production.

    The alias, not the stage, because one alias names one version at every moment, and moving it is
    the single write that commits a promotion (`move_to_stage`); a stage may be held by two versions
    in the middle of one (docs/decisions/017-watcher-follows.md).
    """
    champion = version_with_alias(mlflow_client, name, STAGE_ALIASES["Production"])
    if champion is not None:
        return champion
    return version_in_stage(mlflow_client, name, "Production")


def challenger_version(mlflow_client: MlflowClient, name: str) -> ModelVersion | None:
    """The version the service scores in the shadow: the one with alias `challenger`. A registry kept by
    stage alone (no `champion` alias either) falls back to its newest Staging version; one with aliases
    does not, so that a promotion, which takes the alias with it, leaves no stale challenger behind.
    """
    challenger = version_with_alias(mlflow_client, name, STAGE_ALIASES["Staging"])
    if challenger is not None:
        return challenger
    if version_with_alias(mlflow_client, name, STAGE_ALIASES["Production"]) is not None:
        return None
    return version_in_stage(mlflow_client, name, "Staging")


def production_versions(mlflow_client: MlflowClient, name: str) -> list[ModelVersion]:
    """Every version of `name` in stage Production, oldest first (normally one; two in the middle of
    a promotion or after one was interrupted)."""
    with stages_api():
        found = mlflow_client.search_model_versions(f"name = '{name}'")
    return sorted((v for v in found if v.current_stage == "Production"), key=lambda v: int(v.version))


def move_to_stage(mlflow_client: MlflowClient, name: str, version: str | int, stage: str, *,
                  after_step: Callable[[str], None] | None = None) -> None:
    """Move a version to `stage` and keep the aliases in step.

    Production archives the version it replaces, which gets alias `previous`. Staging sets
    `challenger`. Archived and None remove the version's stage alias.

    A move to Production is a sequence of registry writes, in an order that a crash between any two
    leaves the served version (`production_version`) on a version in stage Production: the stage
    first ("stage"), then alias `champion` ("alias"), which commits the move, then the replaced
    version archived with alias `previous`. `after_step` is called with each quoted name once that
    step is written (the promotion gate's crash tests).
    """
    version = str(version)
    if stage != "Production":
        with stages_api():
            mlflow_client.transition_model_version_stage(name, version, stage, archive_existing_versions=False)
        alias = STAGE_ALIASES.get(stage)
        if alias:
            mlflow_client.set_registered_model_alias(name, alias, version)
        else:
            for stage_alias in STAGE_ALIASES.values():
                _drop_alias_if_on(mlflow_client, name, stage_alias, version)
        return
    current_production = production_version(mlflow_client, name)
    with stages_api():
        # Not archive_existing_versions=True: on a PostgreSQL-backed registry MLflow 3.17 compares the
        # integer version column with a text parameter there and fails. The versions this one replaces
        # are archived after it holds the stage and the alias, so readers never see no Production version.
        mlflow_client.transition_model_version_stage(name, version, stage, archive_existing_versions=False)
    if after_step is not None:
        after_step("stage")
    mlflow_client.set_registered_model_alias(name, STAGE_ALIASES["Production"], version)
    if after_step is not None:
        after_step("alias")
    with stages_api():
        for other in production_versions(mlflow_client, name):
            if str(other.version) != version:
                mlflow_client.transition_model_version_stage(name, str(other.version), "Archived")
    _drop_alias_if_on(mlflow_client, name, STAGE_ALIASES["Staging"], version)
    # The SQL registry returns versions as int, callers pass str: compare as text.
    if current_production is not None and str(current_production.version) != version:
        mlflow_client.set_registered_model_alias(name, PREVIOUS_ALIAS, current_production.version)


def _drop_alias_if_on(mlflow_client: MlflowClient, name: str, alias: str, version: str) -> None:
    holder = version_with_alias(mlflow_client, name, alias)
    if holder is not None and str(holder.version) == version:
        mlflow_client.delete_registered_model_alias(name, alias)
