"""Which models a worker holds: the registry's Production version (the champion, which answers), and
its Staging version (the challenger, which scores the same requests in the shadow), each loaded and
kept current.

Each gunicorn worker runs one `ModelWatcher` per role, started after fork when the app is created. A
background thread asks the registry every MODEL_POLL_SECONDS which version the role holds (for the
champion, the version of MODEL_NAME with alias `champion`, which the promotion gate keeps in stage
Production, or what MODEL_URI names; for the challenger, the version with alias `challenger`, which
training keeps in stage Staging; a registry without aliases is read by stage: see
`common.registry.production_version`, `challenger_version` and docs/decisions/017-watcher-follows.md)
and, when that changes, loads the new version beside the old one and swaps them with one reference
assignment. Requests read `watcher.current` once, so each is scored by exactly one version, and none
fails during a swap.

- Registry unreachable: keep serving the loaded model; report it in `status()` and the
  `fraud_registry_reachable` gauge.
- No version yet: serve nothing (the app answers 503) until one is promoted.
- A version that cannot be loaded (`ModelLoadError`): refuse it, keep the old model, report it in
  `status()`, the log and `fraud_model_refused_version`; retry it only after `refused_retry_seconds`.
- A champion the registry names (alias, stage, or a MODEL_URI that is not a version number) without
  the promotion gate's record, or whose downloaded files differ from the digests it records
  (`common.provenance.check`): refused the same way. ALLOW_UNGATED_MODELS=1 serves it anyway, with
  an error in the log at each such load and `gate_check` in `status()` saying so.
- The challenger is dropped when the registry names none any more (a promotion took it to
  Production): a worker never shadow-scores with a version that is not the challenger.
- A version whose ONNX artifact could not be downloaded (a registry or artifact store that failed
  for a moment): serve it with scikit-learn, about a hundred times slower per row, and try the ONNX
  artifact again in a background thread, with exponential backoff from `onnx_retry_seconds` up to
  `onnx_retry_max_seconds`, until it loads; then swap in the ONNX flavor. Meanwhile `status()`
  (so /ready) and, for the champion, the `fraud_model_onnx_retrying` gauge say so.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import tenacity

from common import provenance, registry, settings
from common.model import ModelBundle, ModelLoadError, load_bundle, with_onnx
from common.text import first_line
from service.metrics import Metrics
from service.scoring import ServingModel

log = logging.getLogger("service.model")

CHAMPION, CHALLENGER = "champion", "challenger"
STAGES = {CHAMPION: "Production", CHALLENGER: "Staging"}
# A MODEL_URI that names a version number is the operator's own pin; any other follows the registry.
_PINNED_URI = re.compile(r"^models:/[^/@]+/\d+/?$")


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

    def onnx_retrying(self, retrying: bool) -> None:
        if self.champion:  # a challenger on scikit-learn is not run on the request path at all
            self.metrics.onnx_retrying.set(1 if retrying else 0)

    def flavor_changed(self, name: str, version: str, old: str, new: str) -> None:
        info = self.metrics.model_info if self.champion else self.metrics.shadow_model_info
        info.labels(name, version, old).set(0)
        info.labels(name, version, new).set(1)


class _NoVersion(Exception):
    """The registry answered, but names no version to serve."""


class _OnnxNotYet(Exception):
    """The ONNX artifact still could not be downloaded; another try may get it."""

    def __init__(self, bundle: ModelBundle):
        super().__init__(bundle.onnx_problem)
        self.bundle = bundle


class _Superseded(Exception):
    """Another version is served now: its own load decides its flavor."""


@dataclass(frozen=True)
class Refusal:
    version: str
    error: str
    at: float


@dataclass(frozen=True)
class OnnxRetry:
    """The served version's ONNX artifact, not loaded yet: why, tries so far (the load's included),
    and when the next one starts (None once the retries ended without it)."""

    version: str
    problem: str
    attempts: int
    next_at: float | None


class ModelWatcher:
    """Loads the served version and polls the registry for a new one, in a daemon thread."""

    def __init__(self, metrics: Metrics, *, tracking_uri: Callable[[], str] = settings.tracking_uri,
                 model_name: str | None = None, model_uri: str | None = None, poll_seconds: float = 10.0,
                 threshold_override: float | None = None, refused_retry_seconds: float | None = None,
                 loader: Callable[..., ModelBundle] = load_bundle, role: str = CHAMPION,
                 onnx_retry_seconds: float = 1.0, onnx_retry_max_seconds: float = 300.0,
                 allow_ungated: bool = False):
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
        self.onnx_retry_seconds = onnx_retry_seconds
        self.onnx_retry_max_seconds = onnx_retry_max_seconds
        # The gate's record is required of what the registry makes champion (not of a challenger,
        # which answers nothing, nor of a version number pinned by MODEL_URI).
        self.gated = role == CHAMPION and not (model_uri and _PINNED_URI.match(model_uri.strip()))
        self.allow_ungated = allow_ungated
        self.ungated: str | None = None  # why the served version failed the gate check (ALLOW_UNGATED_MODELS)

        # Read by request threads without a lock: each is replaced whole, never mutated.
        self.current: ServingModel | None = None
        self.registry_reachable: bool | None = None
        self.registry_error: str | None = None
        self.last_checked: float | None = None
        self.target_version: str | None = None
        self.problem: str | None = None
        self.refused: Refusal | None = None
        self.onnx_retry: OnnxRetry | None = None

        self._client = None
        self._client_uri: str | None = None
        self._check_lock = threading.Lock()
        self._stop = threading.Event()
        self._first_check = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def target(self) -> str:
        """What this watcher holds, for messages: the MODEL_URI, or `<name>`'s alias for its role."""
        return self.model_uri or f"models:/{self.model_name}@{registry.STAGE_ALIASES[STAGES[self.role]]}"

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
            ungated = self._gate_check(bundle)
        except ModelLoadError as exc:
            self._refuse(version, str(exc))
            return
        self._swap(bundle, time.perf_counter() - started)
        self.ungated = ungated

    def _gate_check(self, bundle: ModelBundle) -> str | None:
        """Check the promotion gate's record of a champion (`common.provenance.check`).

        Returns:
            None when it passes (or is not required); the failure when ALLOW_UNGATED_MODELS lets the
            version be served anyway.

        Raises:
            UngatedModelError: it fails, and ungated models are not allowed.
        """
        if not self.gated:
            return None
        try:
            provenance.check(bundle.gate_record, bundle.name, bundle.version, bundle.digests,
                             onnx_pending=bundle.onnx_retryable)
        except provenance.UngatedModelError as exc:
            if not self.allow_ungated:
                raise
            log.error("ALLOW_UNGATED_MODELS=1: serving a version the promotion gate did not approve: %s", exc)
            return str(exc)
        return None

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
        if self.role == CHAMPION:
            found = registry.production_version(client, self.model_name)
        else:
            found = registry.challenger_version(client, self.model_name)
        if found is None:
            alias = registry.STAGE_ALIASES[STAGES[self.role]]
            raise _NoVersion(f"no version of {self.model_name!r} has alias {alias} or is in stage {STAGES[self.role]}")
        return self.model_name, str(found.version)

    def _registry_client(self):
        # Each poll reads MLFLOW_TRACKING_PASSWORD_FILE again: a rotated password needs no restart.
        registry.apply_credentials()
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

        if bundle.onnx_retryable:
            self._retry_onnx_in_background(self.current)
        else:
            self.onnx_retry = None
            self._report.onnx_retrying(False)

    # --- the ONNX flavor, tried again -----------------------------------------------------------------

    def _retry_onnx_in_background(self, served: ServingModel) -> None:
        bundle = served.bundle
        self.onnx_retry = OnnxRetry(bundle.version, bundle.onnx_problem, 1, time.time() + self.onnx_retry_seconds)
        self._report.onnx_retrying(True)
        log.warning("%s %s version %s is on scikit-learn until its ONNX artifact loads; retrying it in the "
                    "background: %s", self.role, bundle.name, bundle.version, bundle.onnx_problem)
        threading.Thread(target=self._retry_onnx, args=(served,), name="onnx-retry", daemon=True).start()

    def _retry_onnx(self, served: ServingModel) -> None:
        """Try the served version's ONNX artifact until it loads, the version is replaced, or the
        watcher stops; then swap in the ONNX flavor."""
        version = served.version

        def attempt() -> ModelBundle:
            if self.current is not served:
                raise _Superseded
            bundle = with_onnx(self._registry_client(), served.bundle)
            if bundle.onnx_retryable:
                raise _OnnxNotYet(bundle)
            return bundle

        def before_sleep(state: tenacity.RetryCallState) -> None:
            self.onnx_retry = OnnxRetry(version, str(state.outcome.exception()), state.attempt_number + 1,
                                        time.time() + state.next_action.sleep)

        retrying = tenacity.Retrying(
            wait=tenacity.wait_exponential(multiplier=self.onnx_retry_seconds, max=self.onnx_retry_max_seconds),
            retry=tenacity.retry_if_exception_type(_OnnxNotYet), stop=tenacity.stop_when_event_set(self._stop),
            sleep=self._stop.wait, before_sleep=before_sleep, reraise=True)
        try:
            if self._stop.wait(self.onnx_retry_seconds):  # the load just failed: wait before the first retry
                return
            bundle = retrying(attempt)
        except (_Superseded, _OnnxNotYet):  # another version is served, or the watcher stopped
            return
        except Exception:  # never let the thread die silently; the next version's load starts over
            log.exception("retrying the ONNX artifact of version %s failed unexpectedly", version)
            self._onnx_given_up(served, "the retries failed unexpectedly; see the log")
            return
        attempts = retrying.statistics.get("attempt_number", 0) + 1
        try:
            self.ungated = self._gate_check(bundle) or self.ungated
        except provenance.UngatedModelError as exc:  # the ONNX file is not the one the gate checked
            self._onnx_given_up(served, str(exc), attempts)
            return
        with self._check_lock:  # not in the middle of a poll's swap
            if self.current is not served:
                return
            if bundle.flavor != "onnx":
                self._onnx_given_up(served, bundle.onnx_problem, attempts)
                return
            self.current = ServingModel(bundle, served.threshold, served.threshold_source, time.time())
            self._report.flavor_changed(bundle.name, bundle.version, served.bundle.flavor, bundle.flavor)
            self.onnx_retry = None
            self._report.onnx_retrying(False)
        log.info("%s version %s is served with ONNX now, after %d tries of its artifact", bundle.name, version,
                 attempts)

    def _onnx_given_up(self, served: ServingModel, problem: str, attempts: int | None = None) -> None:
        previous = self.onnx_retry
        self.onnx_retry = OnnxRetry(served.version, problem, attempts or (previous.attempts if previous else 1), None)
        self._report.onnx_retrying(False)
        log.error("%s version %s stays on scikit-learn: its ONNX artifact cannot be used: %s", served.name,
                  served.version, problem)

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
        current, refused, onnx = self.current, self.refused, self.onnx_retry
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
            "gate_check": None if not self.gated else {
                "required": not self.allow_ungated, "ungated_allowed": self.allow_ungated,
                "served_version_failed": self.ungated},
            "refused": None if refused is None else {"version": refused.version, "error": refused.error,
                                                      "at": refused.at},
            "onnx": None if onnx is None else {"version": onnx.version, "problem": onnx.problem,
                                               "attempts": onnx.attempts, "retrying": onnx.next_at is not None,
                                               "next_attempt_at": onnx.next_at},
        }
