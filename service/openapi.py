"""The OpenAPI 3.1 description of the service, built from the same limits the app enforces.

It is meant to be exact, so that a schema-driven fuzzer can hold the service to it both ways: every
body the schemas accept is scored (or meets a documented 401/503), and every body they refuse gets
a 4xx. Hence the precise bounds (FEATURE_LIMIT, MAX_ROWS), `additionalProperties: false`, and the
`oneOf`s that say "Amount_scaled or Amount, not both".
"""

from __future__ import annotations

from common.schema import FEATURES, N_FEATURES
from service.errors import ERROR_STATUS
from service.parsing import (
    CSV,
    FEATURE_LIMIT,
    INVOCATION_FORMATS,
    JSON,
    MAX_REQUEST_ID_LENGTH,
    NAMED_COLUMNS,
    PARQUET,
    RAW_AMOUNT,
    SCALED,
    V_FEATURES,
)

API_VERSION = "1.0.0"
_FEEDBACK_CODES = ("malformed_json", "invalid_input", "too_many_rows", "unauthorized", "request_timeout",
                   "payload_too_large", "unsupported_media_type", "request_log_unavailable")


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _error_response(description: str, codes: list[str]) -> dict:
    return {
        "description": f"{description} Error codes: {', '.join(codes)}.",
        "content": {"application/json": {"schema": {
            "allOf": [_ref("Error")],
            "properties": {"error": {"properties": {"code": {"enum": codes}}}},
        }}},
    }


_STATUS_TEXT = {
    400: "Malformed JSON or input the endpoint does not take; the message names the row and value.",
    401: "Missing or invalid Bearer token.",
    408: "The client stopped sending the body for CLIENT_TIMEOUT seconds; nothing was scored or stored.",
    413: "The body is larger than MAX_BODY_BYTES.",
    415: "Content-Type is not one the endpoint takes: application/json (UTF-8); /invocations also takes text/csv "
         "and application/vnd.apache.parquet, with no Content-Type parameter but a UTF-8 charset.",
    503: "The service cannot answer this now; nothing was scored or stored.",
}


def _errors(*statuses: int, only: tuple[str, ...] | None = None) -> dict:
    """Error responses for these statuses, each listing its possible codes (`only` narrows them)."""
    out = {}
    for status in statuses:
        codes = [code for code, s in ERROR_STATUS.items() if s == status and (only is None or code in only)]
        out[str(status)] = _error_response(_STATUS_TEXT[status], codes)
    return out


def _schemas(max_rows: int) -> dict:
    feature = {"type": "number", "minimum": -FEATURE_LIMIT, "maximum": FEATURE_LIMIT,
               "description": f"A finite number within ±{FEATURE_LIMIT:g} (JSON numbers only: no strings, "
                              "booleans, null, NaN or Infinity)."}
    record_properties = {name: _ref("Feature") for name in NAMED_COLUMNS}
    return {
        "Feature": feature,
        "Row": {
            "type": "array", "items": _ref("Feature"), "minItems": N_FEATURES, "maxItems": N_FEATURES,
            "description": f"The {N_FEATURES} features in order: {', '.join(FEATURES)}.",
        },
        "Rows": {"type": "array", "items": _ref("Row"), "minItems": 1, "maxItems": max_rows,
                 "description": f"1 to {max_rows} rows (MAX_ROWS), numbered from 0 in error messages."},
        "Record": {
            "type": "object",
            "description": "One transaction by feature name: V1..V28 and exactly one of Amount_scaled or the raw "
                           "Amount (scaled with the stored feature config).",
            "properties": record_properties,
            "required": list(V_FEATURES),
            "additionalProperties": False,
            "oneOf": [{"required": ["Amount_scaled"]}, {"required": ["Amount"]}],
        },
        "Records": {"type": "array", "items": _ref("Record"), "minItems": 1, "maxItems": max_rows,
                    "description": f"1 to {max_rows} records (MAX_ROWS)."},
        "Columns": {
            "type": "object",
            "description": "pandas `to_dict(orient='list')`: one array per column, V1..V28 and exactly one of "
                           f"Amount_scaled or Amount, each of 1 to {max_rows} numbers (MAX_ROWS). All arrays must have "
                           "the same length; JSON Schema cannot say so, and the service refuses unequal lengths with "
                           "400.",
            "properties": {name: {"type": "array", "items": _ref("Feature"), "minItems": 1, "maxItems": max_rows}
                           for name in NAMED_COLUMNS},
            "required": list(V_FEATURES),
            "additionalProperties": False,
            "oneOf": [{"required": [SCALED]}, {"required": [RAW_AMOUNT]}],
        },
        "Table": {
            "description": f"A table of 1 to {max_rows} rows (MAX_ROWS), shown here as its records: one column per "
                           "feature, V1..V28 and either Amount_scaled or the raw Amount for every row. As text/csv: a "
                           "header row of the column names in any order, then one row per transaction (pandas "
                           "`to_csv(index=False)`; rows are numbered from 0 after the header). As Parquet: pandas "
                           "`to_parquet()`, integer or floating-point columns without nulls; a stored index is "
                           "ignored.",
            "oneOf": [_table(max_rows, SCALED), _table(max_rows, RAW_AMOUNT)],
        },
        "ColumnNames": {
            "type": "array",
            "description": "The column names of `data`, in any order: V1..V28 and exactly one of Amount_scaled "
                           "or Amount.",
            "items": {"type": "string", "enum": list(NAMED_COLUMNS)},
            "minItems": N_FEATURES, "maxItems": N_FEATURES, "uniqueItems": True,
            "allOf": [{"contains": {"const": name}} for name in V_FEATURES],
        },
        "PredictRequest": {
            "description": "The original body (`data`, positional rows) or named `records`; not both.",
            "oneOf": [
                {"type": "object", "properties": {"data": _ref("Rows")}, "required": ["data"],
                 "additionalProperties": False},
                {"type": "object", "properties": {"records": _ref("Records")}, "required": ["records"],
                 "additionalProperties": False},
            ],
        },
        "PredictResponse": {
            "type": "object",
            "required": ["fraud_probability", "is_fraud", "threshold", "model_name", "model_version", "request_id"],
            "additionalProperties": False,
            "properties": {
                "fraud_probability": {"type": "array", "items": {"type": "number", "minimum": 0, "maximum": 1},
                                      "description": "One probability per row, in request order."},
                "is_fraud": {"type": "array", "items": {"type": "boolean"},
                             "description": "fraud_probability >= threshold, per row."},
                "threshold": {"type": "number", "minimum": 0, "maximum": 1,
                              "description": "The model's threshold, or FRAUD_THRESHOLD when set."},
                "model_name": {"type": "string"},
                "model_version": {"type": "string"},
                "request_id": {"type": "array", "items": {"type": "string", "maxLength": MAX_REQUEST_ID_LENGTH},
                               "description": "One id per row (`<X-Request-ID>-<row>`), for /feedback."},
            },
        },
        "InvocationsRequest": {
            "description": "MLflow's scoring protocol: exactly one input format, and optionally `params` (an object "
                           "or null, accepted and ignored: the model takes no parameters). `instances` and `inputs` "
                           "take rows, records, columns by name, or one record.",
            "oneOf": [_invocation_format(name) for name in INVOCATION_FORMATS],
        },
        "DataframeSplit": {
            "type": "object",
            "description": "pandas `to_dict(orient='split')`. Without `columns`, rows are in feature order.",
            "properties": {
                "columns": _ref("ColumnNames"),
                "data": _ref("Rows"),
                "index": {"type": "array", "description": "Ignored."},
            },
            "required": ["data"],
            "additionalProperties": False,
        },
        "InvocationsResponse": {
            "type": "object", "required": ["predictions"], "additionalProperties": False,
            "properties": {"predictions": {
                "type": "array", "items": {"type": "number", "minimum": 0, "maximum": 1},
                "description": "The fraud probability of each row. (`mlflow models serve` of the same version "
                               "answers the forest's argmax class instead; /predict has the thresholded decision.)",
            }},
        },
        "FeedbackRequest": {
            "type": "object", "required": ["labels"], "additionalProperties": False,
            "properties": {"labels": {
                "type": "array", "minItems": 1, "maxItems": max_rows,
                "description": "True labels for earlier predictions; for a repeated request_id the last label counts.",
                "items": {
                    "type": "object", "required": ["request_id", "is_fraud"], "additionalProperties": False,
                    "properties": {
                        "request_id": {"type": "string", "minLength": 1, "maxLength": MAX_REQUEST_ID_LENGTH,
                                       "description": "A request_id that /predict returned for a row."},
                        "is_fraud": {"enum": [True, False, 0, 1]},
                    },
                },
            }},
        },
        "FeedbackResponse": {
            "type": "object", "required": ["updated", "unknown"], "additionalProperties": False,
            "properties": {
                "updated": {"type": "integer", "minimum": 0, "description": "Rows whose label was stored."},
                "unknown": {"type": "array", "items": {"type": "string"},
                            "description": "Request ids the request log does not have; nothing was stored for them."},
            },
        },
        "Error": {
            "type": "object", "required": ["error"], "additionalProperties": False,
            "properties": {"error": _ref("ErrorDetail")},
        },
        "ErrorDetail": {
            "type": "object", "required": ["code", "message"], "additionalProperties": False,
            "properties": {
                "code": {"type": "string", "enum": list(ERROR_STATUS)},
                "message": {"type": "string", "description": "What was wrong and what was expected."},
            },
        },
        "ReadyResponse": {
            "type": "object",
            "required": ["status", "model", "registry", "problem", "refused", "request_log", "worker"],
            "properties": {
                "status": {"type": "string", "enum": ["ready", "not_ready"]},
                "error": _ref("ErrorDetail"),
                "model": {"oneOf": [{"type": "null"}, {
                    "type": "object", "required": ["name", "version", "flavor", "threshold", "loaded_at"],
                    "properties": {"name": {"type": "string"}, "version": {"type": "string"},
                                   "flavor": {"type": "string", "enum": ["onnx", "sklearn"]},
                                   "threshold": {"type": "number"}, "loaded_at": {"type": "number"}},
                }]},
                "registry": {
                    "type": "object",
                    "required": ["reachable", "error", "target", "target_version", "last_checked", "poll_seconds"],
                    "properties": {
                        "reachable": {"type": ["boolean", "null"], "description": "null before the first poll."},
                        "error": {"type": ["string", "null"]},
                        "target": {"type": "string", "description": "MODEL_URI, or models:/<MODEL_NAME>/Production."},
                        "target_version": {"type": ["string", "null"]},
                        "last_checked": {"type": ["number", "null"]},
                        "poll_seconds": {"type": "number"},
                    },
                },
                "problem": {"type": ["string", "null"], "description": "Why the registry names nothing to serve."},
                "refused": {"oneOf": [{"type": "null"}, {
                    "type": "object", "required": ["version", "error", "at"],
                    "properties": {"version": {"type": "string"}, "error": {"type": "string"},
                                   "at": {"type": "number"}},
                }], "description": "The last version this worker refused to load, and why."},
                "request_log": {
                    "type": "object", "required": ["location", "last_error", "last_error_at"],
                    "properties": {"location": {"type": "string"}, "last_error": {"type": ["string", "null"]},
                                   "last_error_at": {"type": ["number", "null"]}},
                },
                "worker": {
                    "type": "object", "required": ["class", "fallback_reason"],
                    "properties": {
                        "class": {"type": ["string", "null"],
                                  "description": "The gunicorn worker class serving; null outside gunicorn."},
                        "fallback_reason": {"type": ["string", "null"],
                                            "description": "Why gunicorn's stock gthread worker serves instead of "
                                                           "the event-loop worker (WEB_WORKER)."},
                    },
                },
                "role": {"type": "string", "enum": ["champion"]},
                "challenger": {"oneOf": [{"type": "null"}, {
                    "type": "object", "required": ["role", "model", "registry", "problem", "refused"],
                    "description": "The Staging version this worker scores requests with in the shadow, in the "
                                   "same shape as the champion's fields; null when SHADOW=off or MODEL_URI is set.",
                }]},
            },
        },
        "VersionResponse": {
            "type": "object",
            "required": ["model_name", "model_version", "stage", "threshold", "threshold_source", "run_id", "flavor",
                         "loaded_at"],
            "additionalProperties": False,
            "properties": {
                "model_name": {"type": "string"}, "model_version": {"type": "string"},
                "stage": {"type": ["string", "null"]},
                "threshold": {"type": "number", "minimum": 0, "maximum": 1},
                "threshold_source": {"type": "string", "enum": ["model", "FRAUD_THRESHOLD"]},
                "run_id": {"type": ["string", "null"]},
                "flavor": {"type": "string", "enum": ["onnx", "sklearn"]},
                "loaded_at": {"type": "number", "description": "Unix time the worker loaded it."},
                "challenger": {"oneOf": [{"type": "null"}, {
                    "type": "object",
                    "required": ["model_name", "model_version", "stage", "threshold", "run_id", "flavor", "loaded_at"],
                    "description": "The Staging version that scores every request in the shadow; its scores are "
                                   "logged, never answered.",
                }]},
                "shadow": {"type": "string", "enum": ["on", "off"], "description": "SHADOW."},
            },
        },
    }


def _invocation_format(name: str) -> dict:
    if name == "dataframe_split":
        value = _ref("DataframeSplit")
    elif name == "dataframe_records":
        value = _ref("Records")
    else:
        value = {"oneOf": [_ref("Rows"), _ref("Records"), _ref("Columns"), _ref("Record")]}
    return {"type": "object", "required": [name], "additionalProperties": False,
            "properties": {name: value, "params": {"type": ["object", "null"], "description": "Ignored."}}}


def _table(max_rows: int, amount: str) -> dict:
    """The records of a table whose amount column is `amount` in every row."""
    names = (*V_FEATURES, amount)
    return {"type": "array", "minItems": 1, "maxItems": max_rows, "items": {
        "type": "object", "properties": {name: _ref("Feature") for name in names}, "required": list(names),
        "additionalProperties": False,
    }}


def openapi_document(*, max_rows: int, max_body_bytes: int) -> dict:
    """The OpenAPI 3.1 document for these limits."""
    bearer = [{"bearerAuth": []}]
    request_id_header = {
        "X-Request-ID": {"description": "This request's id, also in the service log: a UUID version 7 as 32 hex "
                                        "digits, so ids sort by the time they were made.",
                         "schema": {"type": "string"}},
        "Server-Timing": {"description": "`app;dur=<ms>`: time spent in the app, from parsed request to response.",
                          "schema": {"type": "string"}},
    }

    def json_body(schema: str) -> dict:
        return {"required": True, "content": {"application/json": {"schema": _ref(schema)}}}

    def ok(schema: str, description: str) -> dict:
        return {"description": description, "headers": request_id_header,
                "content": {"application/json": {"schema": _ref(schema)}}}

    scoring_errors = _errors(400, 401, 408, 413, 415, 503)
    alive = {"200": {"description": "The process answers.", "content": {"application/json": {
        "schema": {"type": "object", "required": ["status"], "additionalProperties": False,
                   "properties": {"status": {"const": "ok"}}}}}}}
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Fraud detection service",
            "version": API_VERSION,
            "description": (
                "Scores card transactions with the MLflow registry's Production model, logs every scored row, "
                "and takes true labels back. Every error is `{\"error\": {\"code\", \"message\"}}`. "
                f"Bodies are JSON (UTF-8) up to {max_body_bytes} bytes (MAX_BODY_BYTES)."
            ),
        },
        "components": {
            "securitySchemes": {"bearerAuth": {"type": "http", "scheme": "bearer",
                                               "description": "API_TOKEN / API_TOKEN_FILE; any configured token."}},
            "schemas": _schemas(max_rows),
        },
        "paths": {
            "/predict": {"post": {
                "operationId": "predict",
                "summary": "Score transactions",
                "description": "Scores each row, decides at the threshold and commits every row to the request "
                               "log before answering. A 200 means the rows are logged.",
                "security": bearer,
                "requestBody": json_body("PredictRequest"),
                "responses": {"200": ok("PredictResponse", "One probability, decision and request_id per row."),
                              **scoring_errors},
            }},
            "/invocations": {"post": {
                "operationId": "invocations",
                "summary": "MLflow scoring protocol",
                "description": "For MLflow clients and tools: the bodies MLflow's scoring server takes, as JSON, "
                               "CSV or Parquet. Rows are logged as with /predict; row i's request_id is "
                               "`<X-Request-ID>-<i>`.",
                "security": bearer,
                "requestBody": {"required": True, "content": {
                    JSON: {"schema": _ref("InvocationsRequest")},
                    CSV: {"schema": _ref("Table")},
                    PARQUET: {"schema": _ref("Table")},
                }},
                "responses": {"200": ok("InvocationsResponse", "The fraud probability of each row."),
                              **scoring_errors},
            }},
            "/feedback": {"post": {
                "operationId": "feedback",
                "summary": "Store true labels of earlier predictions",
                "security": bearer,
                "requestBody": json_body("FeedbackRequest"),
                "responses": {"200": ok("FeedbackResponse", "How many labels were stored; unknown ids listed."),
                              **_errors(400, 401, 408, 413, 415, 503, only=_FEEDBACK_CODES)},
            }},
            "/metrics": {"get": {
                "operationId": "metrics",
                "summary": "Prometheus metrics, summed over workers",
                "security": bearer,
                "responses": {
                    "200": {"description": "Prometheus text format 0.0.4.",
                            "content": {"text/plain": {"schema": {"type": "string"}}}},
                    **_errors(401),
                },
            }},
            "/health": {"get": {"operationId": "health", "summary": "Liveness", "security": [],
                                "responses": alive}},
            "/ping": {"get": {"operationId": "ping", "security": [], "responses": alive,
                              "summary": "Liveness, under the name MLflow's scoring server and its clients use"}},
            "/ready": {"get": {
                "operationId": "ready",
                "summary": "Readiness of the answering worker",
                "security": [],
                "responses": {
                    "200": {"description": "A model is loaded; details of model, registry and request log.",
                            "content": {"application/json": {"schema": _ref("ReadyResponse")}}},
                    "503": {"description": "No model loaded yet; `error.code` is model_unavailable and the "
                                           "details say why (registry unreachable, nothing in Production, a refused "
                                           "version).",
                            "content": {"application/json": {"schema": _ref("ReadyResponse")}}},
                },
            }},
            "/version": {"get": {
                "operationId": "version",
                "summary": "The model the answering worker serves",
                "security": [],
                "responses": {"200": ok("VersionResponse", "Name, version, stage, threshold, run id, load time."),
                              **_errors(503, only=("model_unavailable",))},
            }},
            "/openapi.json": {"get": {
                "operationId": "openapi",
                "summary": "This document",
                "security": [],
                "responses": {"200": {"description": "OpenAPI 3.1.",
                                      "content": {"application/json": {"schema": {"type": "object"}}}}},
            }},
        },
    }
