"""
What goes to the pod: the body with the model rewritten to the server's (not for LoRA
requests) and, for streams, usage asked for (and hidden again from a client that did not
ask); the client's headers minus the hop-by-hop ones (and C{Authorization} when
C{upstream.forwardAuthorization} is off), with the request id and C{X-Forwarded-For}.
Unchanged bodies go as received.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from twisted.web.http_headers import Headers

from kthena.interfaces import IExchange
from kthena.pipeline.headers import forwardable
from kthena.pipeline.parse import Parsed
from kthena.record import RequestRecord
from kthena.store import RouteMatch
from kthena.webutil import json_bytes


@dataclass(frozen=True, slots=True)
class Outgoing:
    """
    @ivar hide_usage: the router asked for the usage chunk; the client must not see it.
    """

    headers: Headers
    body: bytes
    hide_usage: bool

    def without_body(self) -> Outgoing:
        """The same, its body let go (C{dataclasses.replace} costs five times as much)."""
        return Outgoing(self.headers, b"", self.hide_usage)


def outgoing(
    exchange: IExchange,
    record: RequestRecord,
    parsed: Parsed,
    match: RouteMatch,
    skip: frozenset[bytes],
) -> Outgoing:
    """
    @param skip: request headers never forwarded (L{kthena.pipeline.headers.upstream_skip}).
    """
    body, hide_usage = _body(parsed, match.upstream_model(parsed.model))
    headers = Headers()
    for name, values in forwardable(exchange.headers, skip):
        headers.setRawHeaders(name, values)
    headers.setRawHeaders(b"x-request-id", [record.request_id.encode("ascii")])
    host = exchange.client_host
    if host:
        forwarded = exchange.header(b"x-forwarded-for")
        value = f"{forwarded.decode('latin-1')}, {host}" if forwarded else host
        headers.setRawHeaders(b"x-forwarded-for", [value.encode("latin-1")])
    return Outgoing(headers, body, hide_usage)


def _body(parsed: Parsed, upstream_model: str) -> tuple[bytes, bool]:
    body: dict[str, Any] = parsed.body
    changed = False
    hide_usage = False
    if body["model"] != upstream_model:
        body["model"] = upstream_model
        changed = True
    if parsed.stream:
        options = body.get("stream_options")
        if not (isinstance(options, dict) and options.get("include_usage") is True):
            body["stream_options"] = {
                **(options if isinstance(options, dict) else {}),
                "include_usage": True,
            }
            hide_usage = changed = True
    return (json_bytes(body) if changed else parsed.raw), hide_usage
