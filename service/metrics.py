"""Prometheus metrics, correct across gunicorn workers.

Under gunicorn, `service/gunicorn.conf.py` points PROMETHEUS_MULTIPROC_DIR at a fresh folder before
any worker starts: every worker then writes its values to files there and `/metrics` sums them
(prometheus_client's multiprocess mode). Without the variable (the Flask test client, a single
process), the values live in this object's own registry.

Gauges say how they combine across workers: `fraud_model_info` counts the live workers serving each
version (so a roll-over shows both versions for a moment), `fraud_model_loaded` and
`fraud_registry_reachable` take the minimum over live workers (0 if any worker lacks a model or
cannot reach the registry), `fraud_model_onnx_retrying` the maximum (1 if any worker serves
scikit-learn while it retries its version's ONNX artifact).

The challenger that scores requests in the shadow has metrics of its own (`fraud_shadow_*`), so the
champion's are the same with or without one: the rows it scored, those on which the two models decide
differently (each at its own threshold), its probabilities, and the rows it did not score and why
(`none`: no challenger; `same_version`: the champion is the challenger; `not_onnx`: a challenger on the
slow scikit-learn flavour is not run on the request path; `error`: it raised).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from prometheus_client import (
    CONTENT_TYPE_PLAIN_0_0_4,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from common import settings
from service import connection

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
PROBABILITY_BUCKETS = (0.01, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)
SHADOW_SKIP_REASONS = ("none", "same_version", "not_onnx", "error")


class Metrics:
    """The service's metrics; create one per app."""

    def __init__(self) -> None:
        self.multiprocess_dir = settings.prometheus_multiproc_dir()
        self.registry = CollectorRegistry()
        r = self.registry
        self.predictions = Counter("fraud_predictions", "Scored rows, by decision.", ["decision"], registry=r)
        self.probability = Histogram("fraud_probability", "Fraud probability of scored rows.",
                                     buckets=PROBABILITY_BUCKETS, registry=r)
        self.latency = Histogram("fraud_http_request_duration_seconds",
                                 "Time from request parsed to response ready, by endpoint and status.",
                                 ["endpoint", "status"], buckets=LATENCY_BUCKETS, registry=r)
        self.errors = Counter("fraud_errors", "Error responses, by kind (the error code).", ["kind"], registry=r)
        self.model_info = Gauge("fraud_model_info", "Live workers serving each model version.",
                                ["model_name", "model_version", "flavor"], multiprocess_mode="livesum", registry=r)
        self.model_loaded = Gauge("fraud_model_loaded", "1 when every live worker has a model loaded.",
                                  multiprocess_mode="livemin", registry=r)
        self.reloads = Counter("fraud_model_reloads", "Model load attempts, by result (loaded or refused).",
                               ["result"], registry=r)
        self.refused_version = Gauge("fraud_model_refused_version",
                                     "The newest version a worker refused to load (0: none).",
                                     multiprocess_mode="livemax", registry=r)
        self.onnx_retrying = Gauge("fraud_model_onnx_retrying",
                                   "1 while a live worker serves scikit-learn because its version's ONNX artifact "
                                   "could not be downloaded, and retries it in the background.",
                                   multiprocess_mode="livemax", registry=r)
        self.registry_reachable = Gauge("fraud_registry_reachable",
                                        "1 when every live worker reached the model registry at its last poll.",
                                        multiprocess_mode="livemin", registry=r)
        self.request_log_failures = Counter("fraud_request_log_failures",
                                            "Requests answered 503 because the request log could not be written.",
                                            registry=r)
        self.logged_rows = Counter("fraud_request_log_rows", "Rows committed to the request log.", registry=r)
        self.feedback = Counter("fraud_feedback_labels", "Feedback labels, by result (updated or unknown).",
                                ["result"], registry=r)
        self.unread_bodies = Counter("fraud_unread_bodies",
                                     "Request bodies an answer left unread (401, 404, 413, 415...), by outcome: "
                                     "drained before the answer, or the connection closed after it (too_large, "
                                     "too_slow, failed).", ["outcome"], registry=r)
        self.shadow_rows = Counter("fraud_shadow_rows", "Rows the challenger scored in the shadow.", registry=r)
        self.shadow_disagreements = Counter("fraud_shadow_disagreements",
                                            "Shadow-scored rows on which champion and challenger decide differently, "
                                            "each at its own threshold.", registry=r)
        self.shadow_skipped = Counter("fraud_shadow_skipped_rows", "Rows the challenger did not score, by reason.",
                                      ["reason"], registry=r)
        self.shadow_probability = Histogram("fraud_shadow_probability",
                                            "The challenger's fraud probability of shadow-scored rows.",
                                            buckets=PROBABILITY_BUCKETS, registry=r)
        self.shadow_model_info = Gauge("fraud_shadow_model_info", "Live workers shadow-scoring with each version.",
                                       ["model_name", "model_version", "flavor"], multiprocess_mode="livesum",
                                       registry=r)
        self.shadow_reloads = Counter("fraud_shadow_model_reloads",
                                      "Challenger load attempts, by result (loaded, refused or dropped).", ["result"],
                                      registry=r)
        self.registry_reachable.set(1)
        self.model_loaded.set(0)
        self.refused_version.set(0)
        self.onnx_retrying.set(0)
        # Pre-create the label sets a dashboard expects, so they read 0 rather than absent.
        for decision in ("fraud", "legit"):
            self.predictions.labels(decision)
        for result in ("loaded", "refused"):
            self.reloads.labels(result)
        for result in ("updated", "unknown"):
            self.feedback.labels(result)
        for outcome in connection.OUTCOMES:
            self.unread_bodies.labels(outcome)
        for reason in SHADOW_SKIP_REASONS:
            self.shadow_skipped.labels(reason)
        for result in ("loaded", "refused", "dropped"):
            self.shadow_reloads.labels(result)
        self._fraud = self.predictions.labels("fraud")
        self._legit = self.predictions.labels("legit")
        self._latency_children: dict[tuple[str, int], Histogram] = {}

    def observe_latency(self, endpoint: str, status: int, seconds: float) -> None:
        """Observe one request's duration (label lookups cached: this runs on every request)."""
        child = self._latency_children.get((endpoint, status))
        if child is None:
            child = self._latency_children[(endpoint, status)] = self.latency.labels(endpoint, str(status))
        child.observe(seconds)

    def count_predictions(self, probabilities: Sequence[float], is_fraud: Sequence[bool]) -> None:
        """Count decisions and observe the probabilities of one scored batch."""
        if len(is_fraud) == 1:  # single row: no numpy call (docs/decisions/007-single-row-fast-path.md)
            (self._fraud if is_fraud[0] else self._legit).inc()
        else:
            frauds = int(np.count_nonzero(is_fraud))
            if frauds:
                self._fraud.inc(frauds)
            if len(is_fraud) - frauds:
                self._legit.inc(len(is_fraud) - frauds)
        observe_many(self.probability, probabilities)

    def count_shadow(self, probabilities: Sequence[float], disagreements: int) -> None:
        """Count one request's shadow-scored rows and the champion/challenger disagreements among them."""
        self.shadow_rows.inc(len(probabilities))
        if disagreements:
            self.shadow_disagreements.inc(disagreements)
        observe_many(self.shadow_probability, probabilities)

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type, summed over workers in multiprocess mode."""
        if self.multiprocess_dir:
            from prometheus_client import multiprocess

            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry, path=self.multiprocess_dir)
            return generate_latest(registry), CONTENT_TYPE_PLAIN_0_0_4
        return generate_latest(self.registry), CONTENT_TYPE_PLAIN_0_0_4


def observe_many(histogram: Histogram, values: Sequence[float]) -> None:
    """Observe every value, one increment per bucket rather than per value.

    A 1,000-row batch would otherwise cost 1,000 `observe` calls. This adds the same counts to the
    same bucket and sum values `Histogram.observe` updates (prometheus_client 0.26, pinned): each
    value counts in the first bucket whose upper bound is >= the value.
    """
    if len(values) == 1:
        histogram.observe(float(values[0]))
        return
    values = np.asarray(values, dtype=np.float64)
    bounds = np.asarray(histogram._upper_bounds, dtype=np.float64)
    counts = np.bincount(np.searchsorted(bounds, values, side="left"), minlength=len(bounds))
    histogram._sum.inc(float(values.sum()))
    for bucket, count in zip(histogram._buckets, counts[:len(bounds)], strict=True):
        if count:
            bucket.inc(int(count))
