"""
The closed set of request outcomes (the C{error_type} label and log field) and the
OpenAI-style error objects clients receive.

Kthena answers errors with bare JSON strings; OpenAI clients parse C{{"error": {...}}}, so
that is what we send, with Kthena's status codes.
"""

from __future__ import annotations

import enum


class ErrorType(enum.Enum):
    """Why a request ended as it did. The values are metric label values: never add one
    without documenting it."""

    SUCCESS = "successful_request"
    INVALID_REQUEST = "prompt_parsing"
    ROUTE_NOT_FOUND = "route_not_found"
    NO_PODS = "pod_discovery"
    SCHEDULING = "scheduling"
    PROXY = "proxy"
    TIMEOUT = "timeout"
    UPSTREAM = "upstream_error"
    STREAM_INTERRUPTED = "stream_interrupted"
    CLIENT_DISCONNECT = "client_disconnect"
    TOO_LARGE = "request_too_large"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    NOT_FOUND = "not_found"
    DRAINING = "draining"
    RATE_LIMIT = "rate_limit"
    QUEUE_TIMEOUT = "queue_timeout"  # waited past its fairness queue's timeout (504)
    SHED = "shed"  # refused or evicted by a full fairness queue (503)
    INTERNAL = "internal"
    BAD_REQUEST = "bad_request"
    REQUEST_TIMEOUT = "request_timeout"
    URI_TOO_LONG = "uri_too_long"
    HEADERS_TOO_LARGE = "headers_too_large"
    UNAUTHORIZED = "unauthorized"
    POOL_SELECTION = "inference_pool_selection"  # an HTTPRoute rule with no pool (500)


_OPENAI_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "timeout_error",
    413: "invalid_request_error",
    414: "invalid_request_error",
    431: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    502: "server_error",
    503: "service_unavailable_error",
    504: "timeout_error",
}


class ProxyError(Exception):
    """
    A request the router answers itself, with a status, an outcome and a message.

    @ivar code: the error object's C{code} when it is not the outcome's label value
        (OpenAI's C{rate_limit_exceeded} for a 429 whose outcome is C{rate_limit}).
    @ivar headers: response headers that go with the answer (C{Retry-After},
        C{WWW-Authenticate}).
    """

    def __init__(
        self,
        status: int,
        error_type: ErrorType,
        message: str,
        *,
        code: str | None = None,
        headers: tuple[tuple[bytes, bytes], ...] = (),
    ) -> None:
        super().__init__(message)
        self.status = status
        self.error_type = error_type
        self.message = message
        self.code = code
        self.headers = headers


def error_object(
    status: int, error_type: ErrorType, message: str, code: str | None = None
) -> dict[str, object]:
    return {
        "error": {
            "message": message,
            "type": _OPENAI_TYPES.get(status, "server_error"),
            "code": code or error_type.value,
        }
    }
