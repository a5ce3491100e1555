"""
The proxy listener's resource: C{/v1/*} inference requests, C{GET /v1/models},
C{/healthz} and C{/readyz}.

An inference request is parsed once, matched to a route, scheduled to candidate pods and
handed to a L{ProxyCall}; anything the router refuses gets an OpenAI error object with
Kthena's status code and is recorded like every other request.
"""

from __future__ import annotations

import json
import os
from datetime import datetime
from typing import Any

from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from kthena.proxy.call import HOP_BY_HOP, ProxyCall, forwardable
from kthena.proxy.context import ProxyContext
from kthena.proxy.core import RouterCore
from kthena.proxy.errors import ErrorType, ProxyError, respond_error
from kthena.scheduler.framework import SchedulingRequest
from kthena.webutil import json_bytes, respond_json

_DROP_UPSTREAM = HOP_BY_HOP | {b"host", b"content-length", b"x-request-id"}


def _epoch(timestamp: str | None, default: int) -> int:
    if not timestamp:
        return default
    try:
        return int(datetime.fromisoformat(timestamp.replace("Z", "+00:00")).timestamp())
    except ValueError:
        return default


class ProxyResource(Resource):
    isLeaf = True

    def __init__(self, core: RouterCore) -> None:
        super().__init__()
        self.core = core

    def render(self, request: Request) -> bytes | int:
        path = request.path
        method = request.method
        if path.startswith(b"/v1/") and path != b"/v1/models":
            if method != b"POST":
                return self._refuse(
                    request,
                    ProxyError(
                        405,
                        ErrorType.METHOD_NOT_ALLOWED,
                        f"{method.decode()} is not allowed here; use POST",
                    ),
                    allow=b"POST",
                )
            return self._inference(request)
        if path == b"/v1/models":
            return self._get_only(request, self._models)
        if path == b"/healthz":
            return self._get_only(request, lambda r: respond_json(r, 200, {"message": "ok"}))
        if path == b"/readyz":
            return self._get_only(request, self._readyz)
        return self._refuse(request, ProxyError(404, ErrorType.NOT_FOUND, "no such path"))

    # -- router-answered requests

    def _get_only(self, request: Request, answer: Any) -> bytes:
        if request.method not in (b"GET", b"HEAD"):
            return self._refuse(
                request,
                ProxyError(
                    405,
                    ErrorType.METHOD_NOT_ALLOWED,
                    f"{request.method.decode()} is not allowed here",
                ),
                allow=b"GET, HEAD",
            )
        body: bytes = answer(request)
        return body

    def _readyz(self, request: Request) -> bytes:
        core = self.core
        if core.draining:
            return respond_json(request, 503, {"message": "draining"})
        if not core.ready:
            return respond_json(request, 503, {"message": "not ready"})
        return respond_json(request, 200, {"message": "ready"})

    def _models(self, request: Request) -> bytes:
        started = self.core.started
        data = [
            {
                "id": name,
                "object": "model",
                "created": _epoch(route.meta.created, started),
                "owned_by": "kthena",
            }
            for name, route in self.core.store.model_names()
        ]
        return respond_json(request, 200, {"object": "list", "data": data})

    def _context(self, request: Request) -> ProxyContext:
        given = request.getHeader(b"x-request-id")
        request_id = given.decode("latin-1") if given else os.urandom(16).hex()
        return ProxyContext(
            request_id=request_id,
            method=request.method.decode("latin-1"),
            path=request.path.decode("latin-1"),
            started=self.core.reactor.seconds(),
            protocol=request.clientproto.decode("latin-1"),
        )

    def _refuse(
        self,
        request: Request,
        error: ProxyError,
        ctx: ProxyContext | None = None,
        allow: bytes | None = None,
    ) -> bytes:
        """Answer with an error, and record the request like any other."""
        ctx = ctx or self._context(request)
        ctx.fail(error.status, error.error_type, error.message)
        ctx.finished = self.core.reactor.seconds()
        if allow is not None:
            request.setHeader(b"allow", allow)
        request.setHeader(b"x-request-id", ctx.request_id.encode("latin-1"))
        body = respond_error(request, error)
        self.core.request_done(ctx)
        return body

    # -- inference

    def _inference(self, request: Request) -> bytes | int:
        ctx = self._context(request)
        try:
            return self._route(request, ctx)
        except ProxyError as error:
            if error.error_type is ErrorType.DRAINING:
                request.setHeader(b"connection", b"close")
            return self._refuse(request, error, ctx)

    def _route(self, request: Request, ctx: ProxyContext) -> int:
        core = self.core
        if core.draining:
            raise ProxyError(503, ErrorType.DRAINING, "the router is shutting down")
        if getattr(request, "too_large", False):
            raise ProxyError(
                413, ErrorType.TOO_LARGE, f"request body over {core.config.max_body_bytes} bytes"
            )
        assert request.content is not None
        raw = request.content.getvalue()
        try:
            body = json.loads(raw)
        except ValueError as e:
            raise ProxyError(400, ErrorType.INVALID_REQUEST, f"invalid JSON body: {e}") from e
        if not isinstance(body, dict):
            raise ProxyError(400, ErrorType.INVALID_REQUEST, "the body must be a JSON object")
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise ProxyError(404, ErrorType.ROUTE_NOT_FOUND, "the request names no model")
        ctx.model = model
        ctx.stream = body.get("stream") is True

        def header(name: str) -> str:
            return request.getHeader(name) or ""

        match = core.store.match(model, header, request.path.decode("latin-1"))
        if match is None:
            raise ProxyError(404, ErrorType.ROUTE_NOT_FOUND, f"the model `{model}` does not exist")
        ctx.match = match
        pods = core.schedulable(match.server)
        if not pods:
            raise ProxyError(503, ErrorType.NO_PODS, f"no ready pod serves {match.server.meta.key}")
        ctx.input_estimate = core.estimator.estimate(body)
        decision = core.scheduler.schedule(SchedulingRequest(model, match, pods, body))
        ctx.decision = decision
        candidates = decision.candidates
        if not candidates:
            raise ProxyError(503, ErrorType.SCHEDULING, f"no pod to take it: {decision.why()}")
        core.metrics.decided(
            getattr(core.scheduler, "algorithm", "custom"), model, candidates[0].key
        )
        raw, hide_usage = _upstream_body(raw, body, match.upstream_model(model), ctx.stream)
        headers = Headers()
        for name, values in forwardable(request.requestHeaders, _DROP_UPSTREAM):
            headers.setRawHeaders(name, values)
        headers.setRawHeaders(b"x-request-id", [ctx.request_id.encode("latin-1")])
        client = request.getClientAddress()
        host = getattr(client, "host", None)
        if host:
            forwarded = request.getHeader(b"x-forwarded-for")
            value = f"{forwarded.decode('latin-1')}, {host}" if forwarded else host
            headers.setRawHeaders(b"x-forwarded-for", [value.encode("latin-1")])
        ProxyCall(core, request, ctx, match, candidates, headers, raw, hide_usage).start()
        return NOT_DONE_YET


def _upstream_body(
    raw: bytes, body: dict[str, Any], upstream_model: str, stream: bool
) -> tuple[bytes, bool]:
    """
    The body to send: the model rewritten to the server's, and usage asked for in streams
    (hidden again from a client that did not ask). Unchanged bodies are sent as received.

    @return: the body, and whether the usage chunk must be hidden from the client.
    """
    changed = False
    hide_usage = False
    if body["model"] != upstream_model:
        body["model"] = upstream_model
        changed = True
    if stream:
        options = body.get("stream_options")
        if not (isinstance(options, dict) and options.get("include_usage") is True):
            body["stream_options"] = {
                **(options if isinstance(options, dict) else {}),
                "include_usage": True,
            }
            hide_usage = changed = True
    return (json_bytes(body) if changed else raw), hide_usage
