"""`python -m monitoring.access` (`make mlflow-users`): the tracking server's users and what each may do.

Against a tracking server started with `mlflow server --app-name basic-auth` and the shipped
`docker/mlflow/basic_auth.ini` (`default_permission = NO_PERMISSIONS`: a user may do only what is
granted here), run as the admin (MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD or its
`_FILE`), it makes these users exist with these grants, through MLflow's own auth client
(`mlflow.server.get_app_client("basic-auth", ...)`):

- `pipeline`: EDIT on every experiment (it creates and writes training, drift, performance and
  promotion runs), MANAGE on the registered model (MODEL_NAME): registers versions, moves stages and
  aliases, writes the gate record. The gate runs as `pipeline`.
- `service`: READ on the registered model, and on the experiments: a version's files are artifacts
  of the run that logged it, in whichever experiment that run is (`mlflow run` without
  `--experiment-name` puts it in Default), and MLflow authorizes artifact downloads by experiment.
  No write anywhere it matters: it cannot register a version, move a stage or an alias, or tag a
  version (MLflow 3.17 lets any user create an experiment of its own, which it then manages).
- `analyst`: READ on every experiment and every registered model.

The registered model is created here when missing, so that its grants hold before the first
training registers a version (until then the server answers 403 about a model nobody may see).

Each user's password comes from `<USER>_MLFLOW_PASSWORD` or `<USER>_MLFLOW_PASSWORD_FILE` (e.g.
SERVICE_MLFLOW_PASSWORD_FILE); a user whose password is not given is left out. Idempotent: an
existing user gets the given password (that is how a password is rotated) and its grants again.
This lives beside the gate because it is what makes the gate the only way to Production.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

from mlflow.exceptions import MlflowException

from common import registry, settings

EXPERIMENT, MODEL = "experiment", "registered_model"


@dataclass(frozen=True)
class Grant:
    resource_type: str
    resource: str  # a model name, or "*"
    permission: str


def grants(model_name: str) -> dict[str, tuple[Grant, ...]]:
    """What each user may do."""
    return {
        "pipeline": (Grant(EXPERIMENT, "*", "EDIT"), Grant(MODEL, model_name, "MANAGE")),
        "service": (Grant(MODEL, model_name, "READ"), Grant(EXPERIMENT, "*", "READ")),
        "analyst": (Grant(EXPERIMENT, "*", "READ"), Grant(MODEL, "*", "READ")),
    }


def apply(tracking_uri: str, passwords: dict[str, str], model_name: str) -> list[str]:
    """Create or update each user in `passwords` and grant it its permissions.

    Returns:
        One line per change, for the log (never a password).

    Raises:
        MlflowException: the server refused (e.g. the caller is not an admin) or is unreachable.
    """
    with warnings.catch_warnings():
        # Importing mlflow.server imports its FastAPI app, whose Starlette import warns of a deprecation
        # that is MLflow's to fix, not this command's user's.
        warnings.simplefilter("ignore")
        from mlflow.server import get_app_client

    auth = get_app_client("basic-auth", tracking_uri=tracking_uri)
    lines = []
    mlflow_client = registry.client(tracking_uri)
    try:
        mlflow_client.get_registered_model(model_name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        mlflow_client.create_registered_model(model_name)
        lines.append(f"registered model {model_name} created")
    for username, password in passwords.items():
        try:
            auth.get_user(username)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            auth.create_user(username, password)
            lines.append(f"user {username} created")
        else:
            auth.update_user_password(username, password)
            lines.append(f"user {username}: password set")
        for grant in grants(model_name)[username]:
            resource = grant.resource
            try:
                auth.grant_user_permission(username, grant.resource_type, resource, grant.permission)
            except MlflowException as exc:
                if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
                # Granted before, perhaps at another level: MLflow has no update, so revoke and grant.
                auth.revoke_user_permission(username, grant.resource_type, resource)
                auth.grant_user_permission(username, grant.resource_type, resource, grant.permission)
            lines.append(f"user {username}: {grant.permission} on {grant.resource_type} {grant.resource}")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m monitoring.access", description=__doc__.splitlines()[0])
    parser.add_argument("--model-name", "--model_name", dest="model_name", default=None,
                        help="registered model (default: MODEL_NAME)")
    args = parser.parse_args(argv)
    try:
        uri = settings.tracking_uri()
        if registry.is_local_store(uri):
            print(f"access: MLFLOW_TRACKING_URI={uri} is an embedded store: it has no users (see the README's "
                  "security section)", file=sys.stderr)
            return 2
        passwords = {user: pw for user in grants("") if (pw := settings.user_password(user)) is not None}
        if not passwords:
            print("access: no password given: set PIPELINE_MLFLOW_PASSWORD_FILE, SERVICE_MLFLOW_PASSWORD_FILE "
                  "and/or ANALYST_MLFLOW_PASSWORD_FILE (or the variables without _FILE)", file=sys.stderr)
            return 2
        registry.apply_credentials()
        for line in apply(uri, passwords, args.model_name or settings.model_name()):
            print(f"access: {line}")
    except settings.SettingsError as exc:
        print(f"access: {exc}", file=sys.stderr)
        return 2
    except MlflowException as exc:
        print(f"access: the tracking server refused: {exc.message.splitlines()[0][:300]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
