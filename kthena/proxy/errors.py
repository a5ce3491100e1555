"""
The closed set of request outcomes (the C{error_type} label and log field) and the
OpenAI-style error objects clients receive.

Kthena answers errors with bare JSON strings; OpenAI clients parse C{{"error": {...}}}, so
that is what we send, with Kthena's status codes.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable

from twisted.internet import error as net_error
from twisted.internet.defer import CancelledError
from twisted.python.failure import Failure
from twisted.web.client import ResponseFailed, ResponseNeverReceived
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import IRequest

from kthena.webutil import respond_json


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
    INTERNAL = "internal"
    BAD_REQUEST = "bad_request"
    REQUEST_TIMEOUT = "request_timeout"
    URI_TOO_LONG = "uri_too_long"
    HEADERS_TOO_LARGE = "headers_too_large"


_OPENAI_TYPES = {
    400: "invalid_request_error",
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


class IncompleteBodyError(Exception):
    """The pod closed the connection before its JSON body was complete."""


class ProxyError(Exception):
    """A request the router answers itself, with a status, an outcome and a message."""

    def __init__(self, status: int, error_type: ErrorType, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.error_type = error_type
        self.message = message


def error_object(status: int, error_type: ErrorType, message: str) -> dict[str, object]:
    return {
        "error": {
            "message": message,
            "type": _OPENAI_TYPES.get(status, "server_error"),
            "code": error_type.value,
        }
    }


def respond_error(request: IRequest, error: ProxyError) -> bytes:
    """Set status and headers on C{request}; return the JSON error body."""
    return respond_json(
        request, error.status, error_object(error.status, error.error_type, error.message)
    )


def describe(error: BaseException | None) -> str:
    """
    What went wrong with an attempt, in words for a log line, an access-log record or a
    client's error object: never a Python repr.
    """
    if error is None:
        return "unknown error"
    if isinstance(error, ResponseFailed | ResponseNeverReceived):
        reasons = _unique(describe(r.value) for r in error.reasons if isinstance(r, Failure))
        return "; ".join(reasons) or "the response failed"
    for kind, text in _DESCRIPTIONS:
        if isinstance(error, kind):
            return text
    if isinstance(error, net_error.ConnectError):
        detail = error.osError if isinstance(error.osError, str) else None
        return f"connection failed ({detail})" if detail else "connection failed"
    message = str(error)
    name = error.__class__.__name__
    return f"{name}: {message}" if message and "<" not in message else name


def _unique(texts: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(texts))


_DESCRIPTIONS: tuple[tuple[type[BaseException], str], ...] = (
    (net_error.ConnectionRefusedError, "connection refused"),
    (net_error.TCPTimedOutError, "connection timed out"),
    (net_error.TimeoutError, "connection timed out"),
    (net_error.DNSLookupError, "DNS lookup failed"),
    (net_error.NoRouteError, "no route to host"),
    (net_error.ConnectionDone, "the pod closed the connection"),
    (net_error.ConnectionLost, "the connection to the pod was lost"),
    (net_error.ConnectionAborted, "the connection to the pod was aborted"),
    (PotentialDataLoss, "the pod closed the connection before the body was complete"),
    (IncompleteBodyError, "the pod closed the connection before its JSON body was complete"),
    (CancelledError, "cancelled"),
)
