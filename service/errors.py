"""The one error shape every response uses: `{"error": {"code": ..., "message": ...}}`."""

from __future__ import annotations

import orjson

# code -> HTTP status. The OpenAPI document lists the same codes per response.
ERROR_STATUS: dict[str, int] = {
    "malformed_json": 400,
    "invalid_input": 400,
    "unauthorized": 401,
    "not_found": 404,
    "method_not_allowed": 405,
    # The default worker gives a client CLIENT_TIMEOUT seconds per read of the body (service/worker.py).
    "request_timeout": 408,
    "payload_too_large": 413,
    # 400, not 413: the body may be small; the row count is a limit of this endpoint (MAX_ROWS).
    "too_many_rows": 400,
    "unsupported_media_type": 415,
    "internal_error": 500,
    "model_unavailable": 503,
    "request_log_unavailable": 503,
    "feature_config_unavailable": 503,
}


class ApiError(Exception):
    """An error answered to the client as JSON; `code` is one of ERROR_STATUS."""

    def __init__(self, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.code = code
        self.status = ERROR_STATUS[code]
        self.message = message
        self.headers = headers or {}


def invalid(message: str) -> ApiError:
    """A 400 for input that parsed as JSON but is not what the endpoint takes."""
    return ApiError("invalid_input", message)


def error_body(code: str, message: str) -> bytes:
    return orjson.dumps({"error": {"code": code, "message": message}})
