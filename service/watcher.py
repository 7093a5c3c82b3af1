"""Which models a worker holds: the registry's Production version (the champion, which answers), and
its Staging version (the challenger, which scores the same requests in the shadow), each loaded and
kept current.

Each gunicorn worker runs one `ModelWatcher` per role, started after fork when the app is created. A
background thread asks the registry every MODEL_POLL_SECONDS which version the role holds
(Production of MODEL_NAME, or what MODEL_URI names, for the champion; Staging for the challenger)
and, when that changes, loads the new version beside the old one and swaps them with one reference
assignment. Requests read `watcher.current` once, so each is scored by exactly one version, and none
fails during a swap.

- Registry unreachable: keep serving the loaded model; report it in `status()` and the
  `fraud_registry_reachable` gauge.
- No version yet: serve nothing (the app answers 503) until one is promoted.
- A version that cannot be loaded (`ModelLoadError`): refuse it, keep the old model, report it in
  `status()`, the log and `fraud_model_refused_version`; retry it only after `refused_retry_seconds`.
- The challenger is dropped when the registry has no Staging version any more (a promotion moved it
  to Production): a worker never shadow-scores with a version that is not the challenger.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from common import registry, settings
from common.model import ModelBundle, ModelLoadError, load_bundle
from common.text import first_line
from service.metrics import Metrics
from service.scoring import ServingModel

log = logging.getLogger("service.model")

CHAMPION, CHALLENGER = "champion", "challenger"
STAGES = {CHAMPION: "Production", CHALLENGER: "Staging"}


class _RoleMetrics:
    """What a watcher reports, by role: the champion's `fraud_model_*` gauges, the challenger's
    `fraud_shadow_*` ones (a missing challenger is normal and sets no alarm)."""

    def __init__(self, metrics: Metrics, role: str):
        self.metrics, self.champion = metrics, role == CHAMPION

    def loaded(self, old: ServingModel | None, new: ModelBundle) -> None:
        info = self.metrics.model_info if self.champion else self.metrics.shadow_model_info
        if old is not None:
            info.labels(old.name, old.version, old.bundle.flavor).set(0)
        info.labels(new.name, new.version, new.flavor).set(1)
        if self.champion:
            self.metrics.model_loaded.set(1)
            self.metrics.reloads.labels("loaded").inc()
        else:
            self.metrics.shadow_reloads.labels("loaded").inc()

    def dropped(self, old: ServingModel) -> None:
        self.metrics.shadow_model_info.labels(old.name, old.version, old.bundle.flavor).set(0)
        self.metrics.shadow_reloads.labels("dropped").inc()

    def refused(self, version: str) -> None:
        if not self.champion:
            self.metrics.shadow_reloads.labels("refused").inc()
            return
        self.metrics.reloads.labels("refused").inc()
        if version.isdigit():
            self.metrics.refused_version.set(int(version))

    def reachable(self, ok: bool) -> None:
        if self.champion:  # the challenger polls the same registry; one gauge says it
            self.metrics.registry_reachable.set(1 if ok else 0)


class _NoVersion(Exception):
    """The registry answered, but names no version to serve."""


@dataclass(frozen=True)
class Refusal:
    version: str
    error: str
    at: float


class ModelWatcher:
    """Loads the served version and polls the registry for a new one, in a daemon thread."""

    def __init__(self, metrics: Metrics, *, tracking_uri: Callable[[], str] = settings.tracking_uri,
                 model_name: str | None = None, model_uri: str | None = None, poll_seconds: float = 10.0,
                 threshold_override: float | None = None, refused_retry_seconds: float | None = None,
                 loader: Callable[..., ModelBundle] = load_bundle, role: str = CHAMPION):
        if role not in STAGES:
            raise ValueError(f"role must be one of {sorted(STAGES)}, got {role!r}")
        if role == CHALLENGER and model_uri:
            raise ValueError("a challenger follows the registry's Staging version; MODEL_URI names the champion only")
        self.role = role
        self.metrics = metrics
        self._report = _RoleMetrics(metrics, role)
        self._tracking_uri = tracking_uri
        self.model_name = model_name or settings.model_name()
        self.model_uri = model_uri
        self.poll_seconds = poll_seconds
        self.threshold_override = threshold_override
        self.refused_retry_seconds = refused_retry_seconds or max(60.0, 6 * poll_seconds)
        self._loader = loader

        # Read by request threads without a lock: each is replaced whole, never mutated.
        self.current: ServingModel | None = None
        self.registry_reachable: bool | None = None
        self.registry_error: str | None = None
        self.last_checked: float | None = None
        self.target_version: str | None = None
        self.problem: str | None = None
        self.refused: Refusal | None = None

        self._client = None
        self._client_uri: str | None = None
        self._check_lock = threading.Lock()
        self._stop = threading.Event()
        self._first_check = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def target(self) -> str:
        """What this watcher holds, for messages: the MODEL_URI, or `<name>` in its role's stage."""
        return self.model_uri or f"models:/{self.model_name}/{STAGES[self.role]}"

    # --- lifecycle ---------------------------------------------------------------------------------

    def start(self, wait_seconds: float = 0.0) -> None:
        """Start polling in a daemon thread; wait up to `wait_seconds` for the first check to finish,
        so a worker that can load its model takes traffic with it."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="model-watcher", daemon=True)
        self._thread.start()
        if wait_seconds > 0:
            self._first_check.wait(wait_seconds)

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.check()
            self._first_check.set()
            self._stop.wait(self.poll_seconds)

    # --- one poll ----------------------------------------------------------------------------------

    def check(self) -> None:
        """Ask the registry once and load a new version if there is one. Never raises."""
        with self._check_lock:
            try:
                self._check()
            except Exception:  # the poller must survive anything; the next poll tries again
                log.exception("model check failed unexpectedly; serving %s", self._describe_current())

    def _check(self) -> None:
        now = time.time()
        self.last_checked = now
        try:
            name, version = self._resolve()
        except _NoVersion as exc:
            self._registry_answered()
            self.target_version = None
            self.problem = str(exc)
            if self.role == CHALLENGER and self.current is not None:
                self._drop()
            return
        except Exception as exc:  # connection refused, timeouts, a locked or missing store ...
            self._registry_unreachable(exc)
            return
        self._registry_answered()
        self.target_version = version
        current = self.current
        if current is not None and (current.name, current.version) == (name, version):
            self.problem = None
            return
        refused = self.refused
        if refused is not None and refused.version == version and now - refused.at < self.refused_retry_seconds:
            return
        started = time.perf_counter()
        try:
            bundle = self._loader(self._client, name, version)
        except ModelLoadError as exc:
            self._refuse(version, str(exc))
            return
        self._swap(bundle, time.perf_counter() - started)

    def _resolve(self) -> tuple[str, str]:
        from mlflow.exceptions import MlflowException

        client = self._registry_client()
        if self.model_uri:
            from mlflow.store.artifact.utils.models import get_model_name_and_version

            try:
                with registry.stages_api():
                    resolved = get_model_name_and_version(client, self.model_uri)
            except MlflowException as exc:
                if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                    raise _NoVersion(f"MODEL_URI {self.model_uri} names no model version: {first_line(exc)}") from None
                raise
            if len(resolved) != 2:
                raise _NoVersion(f"MODEL_URI {self.model_uri} names a logged model, not a registered version")
            return resolved[0], str(resolved[1])
        stage = STAGES[self.role]
        found = registry.version_in_stage(client, self.model_name, stage)
        if found is None:
            raise _NoVersion(f"no version of {self.model_name!r} is in stage {stage}")
        return self.model_name, str(found.version)

    def _registry_client(self):
        uri = self._tracking_uri()
        if self._client is None or uri != self._client_uri:
            self._client, self._client_uri = registry.client(uri), uri
        return self._client

    # --- outcomes ----------------------------------------------------------------------------------

    def _registry_answered(self) -> None:
        if self.registry_reachable is False:
            log.warning("model registry reachable again")
        self.registry_reachable, self.registry_error = True, None
        self._report.reachable(True)

    def _registry_unreachable(self, exc: Exception) -> None:
        error = first_line(exc)
        if self.registry_reachable is not False:
            log.error("model registry unreachable (%s); %s %s", error, self._holding(), self._describe_current())
        self.registry_reachable, self.registry_error = False, error
        self._report.reachable(False)

    def _refuse(self, version: str, error: str) -> None:
        self.refused = Refusal(version, error, time.time())
        self._report.refused(version)
        # ModelLoadError messages already name the model and version.
        what = "model" if self.role == CHAMPION else "challenger"
        log.error("%s load refused: %s; %s %s", what, error, self._holding(), self._describe_current())

    def _swap(self, bundle: ModelBundle, seconds: float) -> None:
        if self.threshold_override is not None:
            threshold, source = self.threshold_override, "FRAUD_THRESHOLD"
        else:
            threshold, source = bundle.threshold, "model"
        old = self.current
        self.current = ServingModel(bundle, threshold, source, time.time())  # the swap
        self.problem = None
        self._report.loaded(old, bundle)
        log.info("%s %s %s version %s (%s, threshold %.4g from %s; was %s); loaded in %.2f s%s", self.role,
                 self._holding(), bundle.name, bundle.version, bundle.flavor, threshold, source,
                 f"version {old.version}" if old else "nothing", seconds,
                 f"; ONNX not used: {bundle.onnx_problem}" if bundle.onnx_problem else "")

    def _drop(self) -> None:
        """The challenger left Staging: stop shadow-scoring with it."""
        old = self.current
        self.current = None
        self._report.dropped(old)
        log.info("challenger %s version %s dropped: %s", old.name, old.version, self.problem)

    def _holding(self) -> str:
        return "serving" if self.role == CHAMPION else "shadow-scoring with"

    def _describe_current(self) -> str:
        current = self.current
        return f"{current.name} version {current.version}" if current else "no model"

    # --- reporting ---------------------------------------------------------------------------------

    def status(self) -> dict:
        """Details for /ready: the loaded model, the registry, the last refused version."""
        current, refused = self.current, self.refused
        return {
            "role": self.role,
            "model": None if current is None else {
                "name": current.name, "version": current.version, "flavor": current.bundle.flavor,
                "threshold": current.threshold, "loaded_at": current.loaded_at,
            },
            "registry": {
                "reachable": self.registry_reachable, "error": self.registry_error, "target": self.target,
                "target_version": self.target_version, "last_checked": self.last_checked,
                "poll_seconds": self.poll_seconds,
            },
            "problem": self.problem,
            "refused": None if refused is None else {"version": refused.version, "error": refused.error,
                                                      "at": refused.at},
        }
