"""Settings: one small typed reader per environment variable, read at call time.

Nothing here runs at import. Every reader raises SettingsError naming the variable and the bad
value, so a misconfigured deployment fails with a message an operator can act on. The README's
table of variables mirrors this module.
"""

from __future__ import annotations

import os
from pathlib import Path

from common.paths import DATA_DIR, REPO_ROOT
from common.text import parse_bool


class SettingsError(ValueError):
    """An environment variable holds a value its reader cannot accept."""


def _raw(name: str) -> str | None:
    value = os.environ.get(name)
    if value is None or value.strip() == "":
        return None
    return value.strip()


def read_str(name: str, default: str | None = None) -> str | None:
    """Return the variable's stripped value, or `default` when unset or blank."""
    value = _raw(name)
    return default if value is None else value


def read_int(name: str, default: int, *, minimum: int | None = None, maximum: int | None = None) -> int:
    """Return the variable as an int within [minimum, maximum].

    Raises:
        SettingsError: the value is not an integer or is out of range.
    """
    value = _raw(name)
    if value is None:
        return default
    try:
        number = int(value)
    except ValueError:
        raise SettingsError(f"{name}={value!r} is not an integer") from None
    _check_range(name, number, minimum, maximum)
    return number


def read_float(
    name: str, default: float | None, *, minimum: float | None = None, maximum: float | None = None
) -> float | None:
    """Return the variable as a finite float within [minimum, maximum], or `default` when unset.

    Raises:
        SettingsError: the value is not a finite number or is out of range.
    """
    value = _raw(name)
    if value is None:
        return default
    try:
        number = float(value)
    except ValueError:
        raise SettingsError(f"{name}={value!r} is not a number") from None
    if number != number or number in (float("inf"), float("-inf")):
        raise SettingsError(f"{name}={value!r} is not a finite number")
    _check_range(name, number, minimum, maximum)
    return number


def read_bool(name: str, default: bool) -> bool:
    """Return the variable as a bool (1/0, true/false, yes/no, on/off).

    Raises:
        SettingsError: the value is none of those words.
    """
    value = _raw(name)
    if value is None:
        return default
    try:
        return parse_bool(value)
    except ValueError:
        raise SettingsError(f"{name}={value!r} is not a boolean (expected true/false, 1/0, yes/no, on/off)") from None


def _check_range(name: str, number: float, minimum: float | None, maximum: float | None) -> None:
    if minimum is not None and number < minimum:
        raise SettingsError(f"{name}={number!r} is below the minimum {minimum}")
    if maximum is not None and number > maximum:
        raise SettingsError(f"{name}={number!r} is above the maximum {maximum}")


def _path_or_url(value: str) -> str:
    """Resolve a relative file path against the repository; leave URLs alone."""
    if "://" in value:
        return value
    path = Path(value)
    return str(path if path.is_absolute() else REPO_ROOT / path)


# --- the variables -------------------------------------------------------------------------------


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI; default: the SQLite store `mlflow.db` at the repository root.

    That is MLflow's own default when its CLI runs from the repository root, so `mlflow run .`,
    `mlflow ui` and the service agree without any variable set. Artifacts go under `mlruns/`.
    """
    return read_str("MLFLOW_TRACKING_URI") or f"sqlite:///{REPO_ROOT / 'mlflow.db'}"


def artifact_root() -> str:
    """MLFLOW_ARTIFACT_ROOT; where new experiments keep artifacts in the embedded store."""
    return _path_or_url(read_str("MLFLOW_ARTIFACT_ROOT") or "mlruns")


def model_name() -> str:
    """MODEL_NAME; the registered model the service serves and training registers."""
    return read_str("MODEL_NAME", "fraud-detector")


def model_uri() -> str | None:
    """MODEL_URI; overrides the registry's Production version (e.g. models:/fraud-detector@champion)."""
    return read_str("MODEL_URI")


def request_log_url() -> str:
    """LATEST_DB; the request log: a SQLite file path (default data/requests.db) or a SQLAlchemy URL."""
    return _path_or_url(read_str("LATEST_DB") or "data/requests.db")


def reference_db_url() -> str:
    """REFERENCE_DB; the labelled reference data: a SQLite path (default data/reference_data.db) or URL."""
    return _path_or_url(read_str("REFERENCE_DB") or "data/reference_data.db")


def feature_config_path() -> Path:
    """FEATURE_CONFIG; the stored Amount scaler (default data/feature_config.json)."""
    return Path(_path_or_url(read_str("FEATURE_CONFIG") or str(DATA_DIR / "feature_config.json")))


def drift_config_path() -> Path:
    """DRIFT_CONFIG; drift features and thresholds (default data/drift_config.json)."""
    return Path(_path_or_url(read_str("DRIFT_CONFIG") or str(DATA_DIR / "drift_config.json")))


def drift_reference_path() -> Path:
    """DRIFT_REFERENCE; the Production model's training features (and scores) that drift checks compare
    against, rewritten atomically by the promotion gate (default data/drift_reference.parquet)."""
    return Path(_path_or_url(read_str("DRIFT_REFERENCE") or str(DATA_DIR / "drift_reference.parquet")))


def performance_config_path() -> Path:
    """PERFORMANCE_CONFIG; the performance check's maturity window, margins and evidence thresholds
    (default data/performance_config.json)."""
    return Path(_path_or_url(read_str("PERFORMANCE_CONFIG") or str(DATA_DIR / "performance_config.json")))


def retention_config_path() -> Path:
    """RETENTION_CONFIG; the request log's archive location, archive and retention ages, batch sizes
    (default data/retention_config.json)."""
    return Path(_path_or_url(read_str("RETENTION_CONFIG") or str(DATA_DIR / "retention_config.json")))


def promotion_config_path() -> Path:
    """PROMOTION_CONFIG; the promotion gate's margins and quality floor (default data/promotion_config.json)."""
    return Path(_path_or_url(read_str("PROMOTION_CONFIG") or str(DATA_DIR / "promotion_config.json")))


def fraud_threshold() -> float | None:
    """FRAUD_THRESHOLD; overrides the model's stored decision threshold when set (0..1)."""
    return read_float("FRAUD_THRESHOLD", None, minimum=0.0, maximum=1.0)


# A token shorter than this is refused: 16 characters of a random token are at least ~80 bits.
MIN_TOKEN_LENGTH = 16


def api_tokens() -> tuple[str, ...]:
    """API_TOKEN (comma-separated) and API_TOKEN_FILE (one token per line); all are valid at once.

    Raises:
        SettingsError: API_TOKEN_FILE cannot be read, or a token is shorter than MIN_TOKEN_LENGTH
            characters (the message names the variable, never the token).
    """
    tokens = _long_tokens("API_TOKEN", (read_str("API_TOKEN") or "").split(","))
    token_file = read_str("API_TOKEN_FILE")
    if token_file:
        try:
            lines = Path(token_file).read_text().splitlines()
        except OSError as exc:
            raise SettingsError(f"API_TOKEN_FILE={token_file!r} cannot be read: {exc.strerror}") from None
        tokens += _long_tokens("API_TOKEN_FILE", lines)
    return tuple(dict.fromkeys(tokens))


def _long_tokens(name: str, raw: list[str]) -> list[str]:
    tokens = [t.strip() for t in raw if t.strip()]
    short = [len(t) for t in tokens if len(t) < MIN_TOKEN_LENGTH]
    if short:
        raise SettingsError(f"{name} holds a token of {short[0]} characters; every token needs at least "
                            f"{MIN_TOKEN_LENGTH} (e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))')")
    return tokens


def read_secret(name: str) -> str | None:
    """A secret from the file `name`_FILE names (its content, surrounding whitespace stripped, as Docker
    and Kubernetes secrets are mounted), else from `name`; None when neither is set. The file wins, so
    that a rotated file is read again even after its value was copied into `name`
    (common.registry.apply_credentials).

    Raises:
        SettingsError: the file cannot be read or is empty (the message never holds the secret).
    """
    path = read_str(f"{name}_FILE")
    if path is None:
        return read_str(name)
    try:
        value = Path(path).read_text().strip()
    except OSError as exc:
        raise SettingsError(f"{name}_FILE={path!r} cannot be read: {exc.strerror}") from None
    if not value:
        raise SettingsError(f"{name}_FILE={path!r} is empty")
    return value


def tracking_credentials() -> tuple[str | None, str | None]:
    """MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, each also from its `_FILE`: the user this
    component logs in to an authenticated tracking server as (monitoring.access). MLflow's own client
    reads only the variables; common.registry.apply_credentials sets them from the files."""
    return read_secret("MLFLOW_TRACKING_USERNAME"), read_secret("MLFLOW_TRACKING_PASSWORD")


def user_password(user: str) -> str | None:
    """<USER>_MLFLOW_PASSWORD or its `_FILE`: the password `python -m monitoring.access` gives `user`."""
    return read_secret(f"{user.upper()}_MLFLOW_PASSWORD")


def shadow() -> bool:
    """SHADOW; on (default): each request is also scored by the registry's challenger (Staging) version,
    logged beside the champion's score; off: no challenger is loaded."""
    return read_bool("SHADOW", True)


def allow_ungated_models() -> bool:
    """ALLOW_UNGATED_MODELS; an emergency escape hatch: 1 serves a champion that has no promotion
    gate record, or whose artifacts differ from it (common.provenance). Logged at every such load."""
    return read_bool("ALLOW_UNGATED_MODELS", False)


def model_poll_seconds() -> float:
    """MODEL_POLL_SECONDS; how often each worker asks the registry for a new Production version."""
    return read_float("MODEL_POLL_SECONDS", 10.0, minimum=0.1, maximum=86400.0)


def max_rows() -> int:
    """MAX_ROWS; the most rows one request may score."""
    return read_int("MAX_ROWS", 5000, minimum=1, maximum=1_000_000)


def max_body_bytes() -> int:
    """MAX_BODY_BYTES; the largest request body accepted (413 above it)."""
    return read_int("MAX_BODY_BYTES", 4 * 1024 * 1024, minimum=1024, maximum=1024**3)


# --- serving (service/gunicorn.conf.py, service/launch.py) ----------------------------------------


def host() -> str:
    """HOST; the address gunicorn binds (default 127.0.0.1; 0.0.0.0 in the container)."""
    return read_str("HOST", "127.0.0.1")


def port() -> int:
    """PORT; the port gunicorn binds (default 5000)."""
    return read_int("PORT", 5000, minimum=0, maximum=65535)


def web_concurrency() -> int:
    """WEB_CONCURRENCY; gunicorn worker processes (default 2)."""
    return read_int("WEB_CONCURRENCY", 2, minimum=1, maximum=64)


def web_threads() -> int:
    """WEB_THREADS; request threads per worker (default 1: requests are served on each worker's event
    loop, service/worker.py; more than 1: gunicorn's gthread workers with that many threads; unset
    with WEB_WORKER=gthread: 4, service/worker_choice.py)."""
    return read_int("WEB_THREADS", 1, minimum=1, maximum=64)


WEB_WORKERS = ("event-loop", "gthread")


def web_worker() -> str:
    """WEB_WORKER; which gunicorn worker serves: `event-loop` (service/worker.py; the default with
    WEB_THREADS=1) or `gthread` (gunicorn's stock threaded worker; the default with WEB_THREADS>1).

    Raises:
        SettingsError: another value, or `event-loop` with WEB_THREADS>1 (that worker has one thread).
    """
    threads = web_threads()
    value = read_str("WEB_WORKER")
    if value is None:
        return "event-loop" if threads == 1 else "gthread"
    value = value.lower()
    if value not in WEB_WORKERS:
        raise SettingsError(f"WEB_WORKER={value!r} is neither event-loop nor gthread")
    if value == "event-loop" and threads > 1:
        raise SettingsError(f"WEB_WORKER=event-loop serves requests on one thread, but WEB_THREADS={threads}; "
                            "unset one of them, or choose WEB_WORKER=gthread")
    return value


def client_timeout() -> float:
    """CLIENT_TIMEOUT; seconds a client may stall one read or write while the default worker serves
    its request (default 10), after which the worker drops it and goes on."""
    return read_float("CLIENT_TIMEOUT", 10.0, minimum=0.1, maximum=25.0)


def keepalive_requests() -> int:
    """KEEPALIVE_REQUESTS; requests a client connection may carry before the service closes it
    (default 100; 0 = no limit). Bounds how long a kept-alive connection stays on one worker."""
    return read_int("KEEPALIVE_REQUESTS", 100, minimum=0, maximum=1_000_000)


def sqlite_synchronous() -> str:
    """SQLITE_SYNCHRONOUS; SQLite's `synchronous` for request-log and reference writes: NORMAL or FULL.

    NORMAL (default) with WAL: a commit survives a crash of the process (and of every worker), but
    the last commits before an operating-system crash or power loss may be lost (never corrupted).
    FULL also fsyncs the WAL on every commit, which costs about one disk flush per request.

    Raises:
        SettingsError: the value is neither.
    """
    value = (read_str("SQLITE_SYNCHRONOUS") or "NORMAL").upper()
    if value not in ("NORMAL", "FULL"):
        raise SettingsError(f"SQLITE_SYNCHRONOUS={value!r} is neither NORMAL nor FULL")
    return value


def prometheus_multiproc_dir() -> str | None:
    """PROMETHEUS_MULTIPROC_DIR; where gunicorn workers share metrics (default: a fresh temporary
    folder per server start, removed at exit)."""
    return read_str("PROMETHEUS_MULTIPROC_DIR")


def log_level() -> str:
    """LOG_LEVEL; the service's log level under gunicorn (default info)."""
    value = (read_str("LOG_LEVEL") or "info").lower()
    if value not in ("debug", "info", "warning", "error", "critical"):
        raise SettingsError(f"LOG_LEVEL={value!r} is not one of debug, info, warning, error, critical")
    return value
