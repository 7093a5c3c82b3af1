"""MLflow bookkeeping the drift check and the promotion gate share: their runs, and promotion times.

Each check or gate decision is its own run in its own experiment (`drift-monitoring`,
`promotions`), created through the client rather than the fluent API: under `mlflow run` the
project run (MLFLOW_RUN_ID) lives in whatever experiment the caller chose and already holds the
entry point's parameters, so the stage links to it with tags instead of logging into it.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping

from mlflow.entities import Metric, Param, RunTag
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from common import registry

PROMOTED_AT_TAG = "promoted_at"
PROJECT_RUN_TAG = "mlflow_project_run_id"
_BATCH = 100  # MLflow's log_batch limit is 1000 metrics; stay well below it


def start_run(mlflow_client: MlflowClient, experiment: str, run_name: str, tags: Mapping[str, str] | None = None,
              uri: str | None = None) -> str:
    """Create a run in `experiment` (created if missing) and return its id.

    Under `mlflow run`, the project run and this run are linked by tags both ways.
    """
    experiment_id = registry.ensure_experiment(experiment, uri or mlflow_client.tracking_uri)
    project_run = os.environ.get("MLFLOW_RUN_ID")
    all_tags = dict(tags or {})
    if project_run:
        all_tags[PROJECT_RUN_TAG] = project_run
    run = mlflow_client.create_run(experiment_id, run_name=run_name, tags=all_tags)
    if project_run:
        try:
            mlflow_client.set_tag(project_run, f"{experiment}_run_id", run.info.run_id)
        except MlflowException:
            pass  # the link is a convenience; the stage's own run holds everything
    return run.info.run_id


def log(mlflow_client: MlflowClient, run_id: str, *, params: Mapping[str, object] | None = None,
        metrics: Mapping[str, float | None] | None = None, tags: Mapping[str, object] | None = None) -> None:
    """Log params, finite metrics and tags in batches. Non-finite or missing metrics are skipped."""
    now = int(time.time() * 1000)
    param_list = [Param(k, _text(v, 6000)) for k, v in (params or {}).items()]
    metric_list = [Metric(k, float(v), now, 0) for k, v in (metrics or {}).items()
                   if v is not None and math.isfinite(float(v))]
    tag_list = [RunTag(k, _text(v, 5000)) for k, v in (tags or {}).items()]
    for start in range(0, max(len(param_list), len(metric_list), len(tag_list)), _BATCH):
        mlflow_client.log_batch(run_id, metrics=metric_list[start:start + _BATCH],
                                params=param_list[start:start + _BATCH], tags=tag_list[start:start + _BATCH])


def _text(value: object, limit: int) -> str:
    text = "" if value is None else str(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def promoted_at(version: ModelVersion) -> float:
    """When `version` became Production (epoch seconds): the gate's `promoted_at` tag, else the
    registry's last update of the version (a version promoted outside the gate)."""
    raw = (version.tags or {}).get(PROMOTED_AT_TAG)
    try:
        return float(raw)
    except (TypeError, ValueError):
        return (version.last_updated_timestamp or version.creation_timestamp or 0) / 1000.0
