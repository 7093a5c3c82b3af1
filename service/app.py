"""The Flask app: thin views over `service.parsing` (bodies) and `service.scoring.score` (the model).

gunicorn runs `service.app:create_app()` in every worker (after fork: the model, the database
engine and the poller thread are per worker), with `service/gunicorn.conf.py`. Tests build the same
app through `create_app(config)` with a temporary store and registry.
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass, field

import orjson
from flask import Flask, Request, Response, request
from werkzeug.exceptions import ClientDisconnected, HTTPException, RequestEntityTooLarge

from common import settings
from common.features import AmountScaler, FeatureConfigError, load_feature_config
from common.store import StoreUnavailable
from service import connection, parsing, worker_choice
from service.auth import Tokens
from service.errors import ApiError, error_body
from service.metrics import Metrics
from service.openapi import openapi_document
from service.request_log import RequestLog, new_request_id
from service.scoring import Predictions, ServingModel, disagreements, score
from service.watcher import CHALLENGER, ModelWatcher

log = logging.getLogger("service")

# Mapped HTTP errors: status -> code (everything else becomes internal_error).
_HTTP_CODES = {400: "malformed_json", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed",
               413: "payload_too_large", 415: "unsupported_media_type"}
SERVICE_KEY = "fraud_service"


@dataclass
class Config:
    """Everything the app reads from the environment, read once per `create_app` call."""

    tokens: tuple[str, ...] = field(repr=False)
    request_log: str
    tracking_uri: str
    model_name: str
    model_uri: str | None
    fraud_threshold: float | None
    poll_seconds: float
    max_rows: int
    max_body_bytes: int
    feature_config: str
    shadow: bool = True
    allow_ungated_models: bool = False
    watch_model: bool = True
    model_wait_seconds: float = 20.0

    @classmethod
    def from_env(cls, overrides: dict | None = None) -> Config:
        """Settings from the environment; `overrides` (tests) replace any field by name."""
        overrides = dict(overrides or {})
        unknown = set(overrides) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown config keys {sorted(unknown)}")
        settings.sqlite_synchronous()  # fail at start, not at the first request, when it is invalid

        def pick(name, reader):
            return overrides[name] if name in overrides else reader()

        return cls(
            tokens=tuple(pick("tokens", settings.api_tokens)),
            request_log=pick("request_log", settings.request_log_url),
            tracking_uri=pick("tracking_uri", settings.tracking_uri),
            model_name=pick("model_name", settings.model_name),
            model_uri=pick("model_uri", settings.model_uri),
            fraud_threshold=pick("fraud_threshold", settings.fraud_threshold),
            poll_seconds=pick("poll_seconds", settings.model_poll_seconds),
            max_rows=pick("max_rows", settings.max_rows),
            max_body_bytes=pick("max_body_bytes", settings.max_body_bytes),
            feature_config=str(pick("feature_config", settings.feature_config_path)),
            shadow=pick("shadow", settings.shadow),
            allow_ungated_models=pick("allow_ungated_models", settings.allow_ungated_models),
            watch_model=overrides.get("watch_model", True),
            model_wait_seconds=overrides.get("model_wait_seconds", 20.0),
        )


@dataclass
class Service:
    """Per-app state: everything the views use besides the request."""

    config: Config
    tokens: Tokens
    metrics: Metrics
    watcher: ModelWatcher
    request_log: RequestLog
    challenger: ModelWatcher | None = None  # None: SHADOW=off, or MODEL_URI pins the champion
    _scaler: AmountScaler | None = field(default=None, repr=False)

    def model(self) -> ServingModel:
        """The model to score this request with (read once: the watcher may swap it any time).

        Raises:
            ApiError: model_unavailable while no version is loaded.
        """
        model = self.watcher.current
        if model is None:
            raise ApiError("model_unavailable", self.not_ready_reason())
        return model

    def not_ready_reason(self) -> str:
        watcher = self.watcher
        if watcher.registry_reachable is False:
            why = f"the model registry is unreachable ({watcher.registry_error})"
        elif watcher.refused is not None and watcher.refused.version == watcher.target_version:
            why = f"version {watcher.refused.version} was refused: {watcher.refused.error}"
        elif watcher.problem:
            why = watcher.problem
        else:
            why = "the first registry check has not finished"
        return (f"no model is loaded yet: {why}. The service polls {watcher.target} every "
                f"{watcher.poll_seconds:g} s and serves the first version it can load")

    def scaler(self) -> AmountScaler:
        """The stored Amount scaler, for records that give raw Amount.

        Raises:
            ApiError: feature_config_unavailable when it is missing or malformed.
        """
        if self._scaler is None:
            try:
                self._scaler = load_feature_config(self.config.feature_config)
            except FeatureConfigError as exc:
                raise ApiError("feature_config_unavailable",
                               f"raw 'Amount' cannot be scaled: {exc}; send 'Amount_scaled' instead") from None
        return self._scaler

    def shadow(self, rows, champion: ServingModel, predictions: Predictions) -> Predictions | None:
        """The challenger's scores of the rows the champion just scored, or None (counted, with the reason).

        Nothing the challenger does reaches the client: a missing, slow or failing challenger only
        leaves the shadow columns of the request log empty and adds to `fraud_shadow_skipped_rows`.
        """
        if self.challenger is None:
            return None
        challenger = self.challenger.current
        if challenger is None:
            reason = "none"
        elif (challenger.name, challenger.version) == (champion.name, champion.version):
            reason = "same_version"  # for the moment a promotion takes to reach both watchers
        elif challenger.bundle.flavor != "onnx":
            reason = "not_onnx"  # scikit-learn is ~100x slower per row: not on the request path
        else:
            try:
                shadow = score(rows, challenger)
            except Exception:
                log.exception("request %s: the challenger (%s version %s) failed to score; the answer is the "
                              "champion's", request.request_id, challenger.name, challenger.version)
                reason = "error"
            else:
                self.metrics.count_shadow(shadow.probabilities, disagreements(predictions, shadow))
                return shadow
        self.metrics.shadow_skipped.labels(reason).inc(len(rows))
        return None

    def close(self) -> None:
        self.watcher.stop()
        if self.challenger is not None:
            self.challenger.stop()
        self.request_log.dispose()


class ServiceRequest(Request):
    """Flask's request with what every response reports: when it started and its id.

    Set when the request is created, so the hot path needs no `before_request` hook and no `g`.
    """

    def __init__(self, environ: dict, *args, **kwargs) -> None:
        super().__init__(environ, *args, **kwargs)
        self.started = time.perf_counter()
        self.request_id = new_request_id()


def create_app(config: dict | None = None) -> Flask:
    """Build the app.

    Args:
        config: overrides of `Config` fields by name (tests); everything else comes from the
            environment (see the README's table).

    Raises:
        ValueError: no API token is configured, or a setting is invalid.
    """
    cfg = Config.from_env(config)
    app = Flask(__name__)
    app.request_class = ServiceRequest
    app.config["MAX_CONTENT_LENGTH"] = cfg.max_body_bytes
    metrics = Metrics()
    service = Service(
        config=cfg,
        tokens=Tokens(cfg.tokens),
        metrics=metrics,
        watcher=ModelWatcher(metrics, tracking_uri=lambda: cfg.tracking_uri, model_name=cfg.model_name,
                             model_uri=cfg.model_uri, poll_seconds=cfg.poll_seconds,
                             threshold_override=cfg.fraud_threshold, allow_ungated=cfg.allow_ungated_models),
        request_log=RequestLog(cfg.request_log),
        challenger=(ModelWatcher(metrics, tracking_uri=lambda: cfg.tracking_uri, model_name=cfg.model_name,
                                 poll_seconds=cfg.poll_seconds, role=CHALLENGER)
                    if cfg.shadow and not cfg.model_uri else None),
    )
    app.extensions[SERVICE_KEY] = service
    if cfg.allow_ungated_models:
        log.error("ALLOW_UNGATED_MODELS=1: this service serves champions that the promotion gate did not "
                  "approve or whose artifacts changed since; /ready shows it. Unset it once the emergency is over")
    _register_hooks(app, service)
    _register_routes(app, service)
    if cfg.watch_model:
        if service.challenger is not None:
            service.challenger.start()  # its first check runs beside the champion's, and nothing waits for it
        service.watcher.start(wait_seconds=cfg.model_wait_seconds)
    return app


def service_of(app: Flask) -> Service:
    return app.extensions[SERVICE_KEY]


# --- request plumbing ------------------------------------------------------------------------------------


def _register_hooks(app: Flask, service: Service) -> None:
    metrics = service.metrics
    max_body_bytes = service.config.max_body_bytes

    @app.after_request
    def finish_request(response: Response) -> Response:
        req = request._get_current_object()  # one proxy lookup instead of one per attribute
        elapsed = time.perf_counter() - req.started
        rule = req.url_rule
        status = response.status_code
        metrics.observe_latency(rule.rule if rule is not None else "unmatched", status, elapsed)
        headers = response.headers
        headers["Server-Timing"] = f"app;dur={elapsed * 1000:.3f}"
        headers["X-Request-ID"] = req.request_id
        # A POST view that succeeds has read its whole body; any other answer may have left some.
        if status >= 400 or req.method != "POST":
            _settle_connection(req, status, max_body_bytes, metrics)
        return response

    @app.errorhandler(ApiError)
    def api_error(error: ApiError):
        return _error_response(metrics, error.status, error.code, error.message, error.headers)

    @app.errorhandler(HTTPException)
    def http_error(error: HTTPException):
        status = error.code or 500
        code = _HTTP_CODES.get(status, "internal_error")
        headers = {}
        if status == 405 and getattr(error, "valid_methods", None):
            headers["Allow"] = ", ".join(sorted(error.valid_methods))
            message = f"{request.method} is not allowed on {request.path}; use {headers['Allow']}"
        elif status == 404:
            message = f"no endpoint {request.path}; see /openapi.json"
        elif status == 413:
            message = f"the body is larger than {service.config.max_body_bytes} bytes (MAX_BODY_BYTES)"
        else:
            message = error.description or error.name
        return _error_response(metrics, status, code, message, headers)

    @app.errorhandler(Exception)
    def unexpected_error(error: Exception):
        log.exception("request %s %s %s failed", request.request_id, request.method, request.path)
        return _error_response(metrics, 500, "internal_error",
                               f"internal error; the log has details under request id {request.request_id}")


def _settle_connection(req: ServiceRequest, status: int, max_body_bytes: int, metrics: Metrics) -> None:
    """Read the body this answer left unread, or close the connection after it (service/connection.py)."""
    outcome = connection.settle(req.environ, status, max_body_bytes, body=lambda: req.stream)
    if outcome is None:
        return
    metrics.unread_bodies.labels(outcome).inc()
    if outcome != connection.DRAINED:
        log.info("request %s %s %s -> %d: the connection closes after this answer (unread body: %s)",
                 req.request_id, req.method, req.path, status, outcome)


def _error_response(metrics: Metrics, status: int, code: str, message: str, headers: dict | None = None) -> Response:
    metrics.errors.labels(code).inc()
    if status < 500:
        log.info("request %s %s %s -> %d %s: %s", request.request_id, request.method, request.path,
                 status, code, message)
    elif code != "internal_error":
        log.warning("request %s %s %s -> %d %s: %s", request.request_id, request.method, request.path,
                    status, code, message)
    return Response(error_body(code, message), status=status, headers=headers, mimetype="application/json")


def _json(body: object, status: int = 200) -> Response:
    return Response(orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY), status=status,
                    mimetype="application/json")


def _json_body() -> object:
    """The request's JSON body, after the content-type and size checks.

    Raises:
        ApiError: unsupported_media_type, malformed_json or request_timeout; werkzeug raises 413
            for a large body.
    """
    req = request._get_current_object()  # one proxy lookup instead of one per attribute
    if req.mimetype != "application/json":
        given = req.mimetype or "none"
        raise ApiError("unsupported_media_type", f"Content-Type is {given}; send application/json")
    charset = req.mimetype_params.get("charset")
    if charset is not None and charset.lower().replace("-", "") != "utf8":
        raise ApiError("unsupported_media_type", f"charset {charset} is not accepted; JSON must be UTF-8")
    body = _body_bytes(req)
    try:
        return parsing.parse_json(body)
    except ApiError:
        log.debug("request %s body (first 512 bytes): %r", req.request_id, body[:512])
        raise


def _body_bytes(req: Request) -> bytes:
    """The whole request body, at most MAX_BODY_BYTES.

    Raises:
        ApiError: request_timeout; werkzeug raises 413 for a large body.
    """
    try:
        body = req.get_data(cache=False)
    except ClientDisconnected as exc:
        # werkzeug reports any failed read so; a timeout is the default worker's socket timeout
        # (service/worker.py), when the client stalled in the middle of the body.
        if isinstance(exc.__context__, TimeoutError):
            raise ApiError("request_timeout", f"the body stopped arriving for {settings.client_timeout():g} s "
                                              "(CLIENT_TIMEOUT); send it whole") from None
        raise
    limit = req.max_content_length
    if limit is not None and len(body) >= limit and req.content_length is None \
            and req.environ["wsgi.input"].read(1):
        # A chunked body has no Content-Length to refuse up front: werkzeug stops reading at the
        # limit and returns the start, which would read as malformed JSON instead of too large.
        raise RequestEntityTooLarge()
    return body


# --- endpoints ------------------------------------------------------------------------------------------


def _register_routes(app: Flask, service: Service) -> None:
    cfg = service.config
    metrics = service.metrics

    def route(rule: str, endpoint: str, methods: list[str], *, token: bool = False):
        """Register a view; with `token`, it runs only for a valid Bearer token (else 401)."""
        def register(view):
            handler = view
            if token:
                check = service.tokens.check

                @functools.wraps(view)
                def handler():
                    check(request.headers.get("Authorization"))
                    return view()
            app.add_url_rule(rule, endpoint, handler, methods=methods, provide_automatic_options=False)
            return view
        return register

    def score_and_log(batch: parsing.Batch):
        model = service.model()
        predictions = score(batch.X, model)
        shadow = service.shadow(batch.X, model, predictions)
        request_id = request.request_id
        try:
            ids = service.request_log.record(request_id, batch, predictions, shadow)
        except StoreUnavailable as exc:
            metrics.request_log_failures.inc()
            log.error("request %s: request log write failed, answering 503: %s", request_id, exc)
            raise ApiError("request_log_unavailable", "the request log cannot be written, so no score is returned; "
                                                      "retry later") from None
        metrics.logged_rows.inc(len(ids))
        metrics.count_predictions(predictions.probabilities, predictions.is_fraud)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("request %s: scored and logged %d rows with %s version %s", request_id, len(ids),
                      model.name, model.version)
        return predictions, ids

    def parse_or_log(parser, payload):
        try:
            return parser(payload, max_rows=cfg.max_rows, scaler=service.scaler)
        except ApiError as error:
            if error.status < 500 and log.isEnabledFor(logging.DEBUG):
                raw = payload if isinstance(payload, bytes) else orjson.dumps(payload)
                log.debug("request %s payload rejected (first 512 bytes): %r", request.request_id, raw[:512])
            raise

    @route("/predict", "predict", ["POST"], token=True)
    def predict():
        """Score rows; the original `{"data": [[29 numbers]]}` body or named `records`."""
        batch = parse_or_log(parsing.predict_batch, _json_body())
        predictions, ids = score_and_log(batch)
        return _json({
            "fraud_probability": predictions.probabilities,
            "is_fraud": predictions.is_fraud,
            "threshold": predictions.threshold,
            "model_name": predictions.model_name,
            "model_version": predictions.model_version,
            "request_id": ids,
        })

    @route("/invocations", "invocations", ["POST"], token=True)
    def invocations():
        """MLflow scoring protocol (JSON, CSV or Parquet); answers `{"predictions": [fraud probability per row]}`."""
        req = request._get_current_object()
        media_type = parsing.invocations_media_type(req.mimetype, req.mimetype_params)
        batch = parse_or_log(functools.partial(parsing.invocations_body, media_type), _body_bytes(req))
        predictions, _ = score_and_log(batch)
        return _json({"predictions": predictions.probabilities})

    @route("/feedback", "feedback", ["POST"], token=True)
    def feedback():
        """Attach true labels to earlier predictions by request_id; unknown ids are listed back."""
        payload = _json_body()
        labels = parsing.feedback_labels(payload, max_items=cfg.max_rows)
        try:
            result = service.request_log.feedback(labels)
        except StoreUnavailable as exc:
            metrics.request_log_failures.inc()
            log.error("request %s: feedback write failed, answering 503: %s", request.request_id, exc)
            raise ApiError("request_log_unavailable", "the request log cannot be written, so no label was "
                                                      "stored; retry later") from None
        if result.updated:
            metrics.feedback.labels("updated").inc(len(result.updated))
        if result.unknown:
            metrics.feedback.labels("unknown").inc(len(result.unknown))
        return _json({"updated": len(result.updated), "unknown": result.unknown})

    @route("/metrics", "metrics", ["GET"], token=True)
    def metrics_view():
        """Prometheus text format, summed over gunicorn workers."""
        body, content_type = metrics.render()
        return Response(body, mimetype=None, content_type=content_type)

    @route("/health", "health", ["GET"])
    def health():
        """Liveness: the process answers."""
        return _json({"status": "ok"})

    # MLflow's scoring server answers liveness on /ping; its clients (ScoringServerClient.wait_server_ready) call it.
    route("/ping", "ping", ["GET"])(health)

    @route("/ready", "ready", ["GET"])
    def ready():
        """Readiness: 200 once this worker has a model loaded, else 503; details either way."""
        details = {**service.watcher.status(), "request_log": service.request_log.status(),
                   "worker": worker_choice.describe(),
                   "challenger": service.challenger.status() if service.challenger is not None else None}
        if details["model"] is None:
            message = service.not_ready_reason()
            return _json({"status": "not_ready", "error": {"code": "model_unavailable", "message": message},
                          **details}, status=503)
        return _json({"status": "ready", **details})

    @route("/version", "version", ["GET"])
    def version():
        """The model this worker serves, and the challenger it shadow-scores with (or null)."""
        model = service.model()
        bundle = model.bundle
        challenger = service.challenger.current if service.challenger is not None else None
        return _json({
            "model_name": bundle.name, "model_version": bundle.version, "stage": bundle.stage,
            "threshold": model.threshold, "threshold_source": model.threshold_source, "run_id": bundle.run_id,
            "flavor": bundle.flavor, "loaded_at": model.loaded_at,
            "challenger": None if challenger is None else {
                "model_name": challenger.name, "model_version": challenger.version,
                "stage": challenger.bundle.stage, "threshold": challenger.threshold,
                "run_id": challenger.bundle.run_id, "flavor": challenger.bundle.flavor,
                "loaded_at": challenger.loaded_at},
            "shadow": "off" if service.challenger is None else "on",
        })

    spec = orjson.dumps(openapi_document(max_rows=cfg.max_rows, max_body_bytes=cfg.max_body_bytes))

    @route("/openapi.json", "openapi", ["GET"])
    def openapi():
        """This API's OpenAPI 3 description."""
        return Response(spec, mimetype="application/json")
