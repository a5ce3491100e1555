"""
What went wrong with a connection or a response, in words: for a log line, an access-log
record or a client's error object, never a Python repr (C{[<twisted.python.failure.Failure
...>]}) and never a bare class name without its reason.
"""

from __future__ import annotations

from collections.abc import Iterable

from twisted.internet import error as net_error
from twisted.internet.defer import CancelledError
from twisted.internet.defer import TimeoutError as DeferredTimeoutError
from twisted.python.failure import Failure
from twisted.web.client import ResponseFailed, ResponseNeverReceived
from twisted.web.http import PotentialDataLoss


class IncompleteBodyError(Exception):
    """The pod closed the connection before its JSON body was complete."""


CONNECT_ERRORS = (
    net_error.ConnectError,
    net_error.DNSLookupError,
    net_error.TimeoutError,
)
"""Failures to reach a pod at all: it never saw the request (always worth another)."""


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
    (net_error.ConnectingCancelledError, "the connection attempt timed out"),
    (net_error.NoRouteError, "no route to host"),
    (net_error.ConnectionDone, "the pod closed the connection"),
    (net_error.ConnectionLost, "the connection to the pod was lost"),
    (net_error.ConnectionAborted, "the connection to the pod was aborted"),
    (PotentialDataLoss, "the pod closed the connection before the body was complete"),
    (IncompleteBodyError, "the pod closed the connection before its JSON body was complete"),
    (CancelledError, "cancelled"),
    (DeferredTimeoutError, "timed out"),
)
