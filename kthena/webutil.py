"""
Small pieces of twisted.web that the router and the simulator both need.
"""

from __future__ import annotations

import json
from typing import Any, cast

import orjson
from twisted.internet.interfaces import IReactorTime, ITCPTransport
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel
from twisted.web.iweb import IRequest
from twisted.web.server import Request, Site

JSON_TYPE = b"application/json"


class NoDelayHTTPChannel(HTTPChannel):
    """
    An HTTP/1.1 channel with Nagle's algorithm off: streamed events are small writes,
    and Nagle plus delayed ACKs would hold each one back by up to 40 ms.
    """

    def connectionMade(self) -> None:
        super().connectionMade()
        transport = ITCPTransport(self.transport, None)
        if transport is not None:
            transport.setTcpNoDelay(True)


class QuietSite(Site):
    """
    A site with no-delay channels, no tracebacks in error pages and no combined access
    log (which costs about a fifth of the throughput); the router logs through its own.
    """

    protocol = NoDelayHTTPChannel  # type: ignore[assignment]
    displayTracebacks = False
    noisy = False

    def __init__(self, resource: Any, reactor: IReactorTime | None = None, **kwargs: Any) -> None:
        # HTTPFactory keeps its own reactor for channel timeouts; pass ours along.
        super().__init__(resource, reactor=reactor, **kwargs)

    def log(self, request: object) -> None:
        pass


_DIGITS = bytes(0x30 if 0x30 <= b <= 0x39 else 0x2E for b in range(256))
"""Every digit to C{0}, every other byte to C{.}: a run of digits becomes a run of C{0},
found by a substring search (a regex class repeated costs 15 times as much: 48 us for a
2 KB body)."""
_LONG_RUN = b"0" * 19
"""Integers orjson reads as floats have 19 digits or more (below -2**63) or 20 (beyond
2**64 - 1)."""


def json_loads(raw: bytes) -> Any:
    """
    JSON from a client or a pod: by orjson (several times faster than the standard
    library), or by the standard library for what orjson refuses (a lone surrogate
    escape, C{NaN}) or reads otherwise (it makes an integer beyond 64 bits a float: a
    document with 19 digits in a row goes to the standard library).

    @raise ValueError: not JSON, with the standard library's message.
    """
    if _LONG_RUN not in raw.translate(_DIGITS):
        try:
            return orjson.loads(raw)
        except ValueError:  # orjson.JSONDecodeError
            pass
    return json.loads(raw)


def json_bytes(value: object) -> bytes:
    """
    Compact JSON, as the engines and the router send it: UTF-8 (by orjson, several times
    faster than the standard library on the request path), or, for what orjson refuses, a
    lone surrogate (valid JSON, C{"\\ud800"}, that UTF-8 cannot encode) or an integer
    beyond 64 bits, the standard library's ASCII with escapes.
    """
    try:
        # A copy of exactly its length: orjson's bytes keep the buffer they were written
        # in (4 KiB at least, 64 KiB for a 4 KiB body), and a body lives as long as its
        # request (a stream's: minutes).
        return memoryview(orjson.dumps(value)).tobytes()
    except TypeError:  # orjson.JSONEncodeError
        return json.dumps(value, separators=(",", ":")).encode()


def respond_json(request: IRequest, status: int, value: object) -> bytes:
    """Set the status and JSON content type on C{request}; return the body to send."""
    request.setResponseCode(status)
    request.setHeader(b"content-type", JSON_TYPE)
    return json_bytes(value)


READ_METHODS = (b"GET", b"HEAD")


def json_body(request: IRequest, status: int, value: object) -> bytes:
    """Set the status and JSON headers; return the (indented, for people) body."""
    request.setResponseCode(status)
    request.setHeader(b"content-type", JSON_TYPE)
    request.setHeader(b"cache-control", b"no-store")
    request.setHeader(b"x-content-type-options", b"nosniff")
    return json.dumps(value, indent=2, ensure_ascii=False, default=str).encode() + b"\n"


def method_not_allowed(request: IRequest) -> bytes:
    request.setHeader(b"allow", b"GET, HEAD")
    method = request.method.decode("latin-1")
    return json_body(request, 405, {"error": f"{method} is not allowed: the endpoint is read-only"})


def client_gone(request: IRequest) -> list[Failure]:
    """A list that gets a failure once the client has left (an answer still being made
    then is not worth finishing)."""
    gone: list[Failure] = []
    cast(Request, request).notifyFinish().addErrback(gone.append)
    return gone
