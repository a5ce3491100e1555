"""
The proxy listener's resource: the inference paths (C{inferencePaths}), C{GET /v1/models}
and C{/v1/models/{id}}, C{/healthz} and C{/readyz}. Any other path is answered 404
before any pod sees it: the engines' admin endpoints (C{/v1/load_lora_adapter}, ...)
are not reachable through the router, and paths are matched exactly, so dot segments
and escaped slashes never reach a pod either.

An inference request is parsed once, matched to a route, scheduled to candidate pods and
handed to a L{ProxyCall}; anything the router answers itself (errors, the model list,
health) gets its answer and is recorded like every other request: one metric count and
one access-log record each, whatever happens inside, an internal error included.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from kthena import prompt
from kthena.errors import ErrorType, ProxyError, respond_error
from kthena.proxy.call import ProxyCall
from kthena.proxy.core import RouterCore
from kthena.proxy.headers import forwardable
from kthena.record import RequestRecord, request_id
from kthena.scheduler.framework import SchedulingRequest
from kthena.webutil import json_bytes, respond_json

_MODELS = b"/v1/models"
_MODEL_PREFIX = b"/v1/models/"


def _epoch(timestamp: str | None, default: int) -> int:
    if not timestamp:
        return default
    try:
        return int(datetime.fromisoformat(timestamp.replace("Z", "+00:00")).timestamp())
    except ValueError:
        return default


_ROUTER_PATHS = frozenset({_MODELS, b"/healthz", b"/readyz"})


def _not_allowed(method: bytes) -> ProxyError:
    return ProxyError(
        405, ErrorType.METHOD_NOT_ALLOWED, f"{method.decode('latin-1')} is not allowed here"
    )


def _not_served(path: bytes) -> ProxyError:
    if b"%" in path or b"/." in path or b"//" in path or b"\\" in path:
        why = "paths with dot segments, empty segments or escapes are not served"
    else:
        why = "the router does not serve this path"
    return ProxyError(404, ErrorType.NOT_FOUND, f"{why}: {path.decode('latin-1')!r}")


class ProxyResource(Resource):
    isLeaf = True

    def __init__(self, core: RouterCore) -> None:
        super().__init__()
        self.core = core

    def render(self, request: Request) -> bytes | int:
        path = request.path
        method = request.method
        ctx = self._context(request)
        if path in self.core.inference_paths:
            if method != b"POST":
                return self._refuse(request, ctx, _not_allowed(method), allow=b"POST")
            return self._inference(request, ctx)
        if not (path in _ROUTER_PATHS or path.startswith(_MODEL_PREFIX)):
            return self._refuse(request, ctx, _not_served(path))
        if method not in (b"GET", b"HEAD"):
            return self._refuse(request, ctx, _not_allowed(method), allow=b"GET, HEAD")
        return self._answer(request, ctx, path)

    # -- router-answered requests

    def _answer(self, request: Request, ctx: RequestRecord, path: bytes) -> bytes:
        if path == b"/readyz":
            return self._readyz(request, ctx)
        if path == _MODELS:
            value: object = {"object": "list", "data": [self._model(*n) for n in self._names()]}
        elif path == b"/healthz":
            value = {"message": "ok"}
        else:
            name = path[len(_MODEL_PREFIX) :].decode("utf-8", "replace")
            ctx.model = name
            value = self._retrieve(name)
            if value is None:
                error = f"the model `{name}` does not exist"
                return self._refuse(request, ctx, ProxyError(404, ErrorType.ROUTE_NOT_FOUND, error))
        return self._respond(request, ctx, 200, value)

    def _names(self) -> list[tuple[str, Any]]:
        return self.core.store.model_names()

    def _model(self, name: str, route: Any) -> dict[str, object]:
        return {
            "id": name,
            "object": "model",
            "created": _epoch(route.meta.created, self.core.started),
            "owned_by": "kthena",
        }

    def _retrieve(self, name: str) -> dict[str, object] | None:
        """C{GET /v1/models/{id}} (the openai SDK's C{models.retrieve}); ids may hold C{/}."""
        for known, route in self._names():
            if known == name:
                return self._model(name, route)
        return None

    def _readyz(self, request: Request, ctx: RequestRecord) -> bytes:
        """
        200, or 503 with the outcome C{draining} or C{pod_discovery} (no first scrape yet,
        or a model without a healthy pod). The body is Kthena's C{{"message": ...}}.
        """
        ready, message, without = self.core.readiness()
        body: dict[str, object] = {"message": message}
        if ready:
            return self._respond(request, ctx, 200, body)
        if without:
            body["models_without_healthy_pods"] = without
        ctx.fail(503, ErrorType.DRAINING if self.core.draining else ErrorType.NO_PODS, message)
        return self._respond(request, ctx, 503, body)

    def _context(self, request: Request) -> RequestRecord:
        return RequestRecord(
            request_id=request_id(request.getHeader(b"x-request-id")),
            method=request.method.decode("latin-1"),
            path=request.path.decode("latin-1"),
            started=self.core.reactor.seconds(),
            protocol=request.clientproto.decode("latin-1"),
        )

    def _respond(self, request: Request, ctx: RequestRecord, status: int, value: object) -> bytes:
        """Answer with C{value} as JSON, and record the request like any other."""
        ctx.status = status
        ctx.finished = self.core.reactor.seconds()
        request.setHeader(b"x-request-id", ctx.request_id.encode("ascii"))
        body = respond_json(request, status, value)
        self.core.request_done(ctx)
        return body

    def _refuse(
        self,
        request: Request,
        ctx: RequestRecord,
        error: ProxyError,
        allow: bytes | None = None,
    ) -> bytes:
        """Answer with an error, and record the request like any other."""
        ctx.fail(error.status, error.error_type, error.message)
        ctx.finished = self.core.reactor.seconds()
        if allow is not None:
            request.setHeader(b"allow", allow)
        request.setHeader(b"x-request-id", ctx.request_id.encode("ascii"))
        body = respond_error(request, error)
        self.core.request_done(ctx)
        return body

    # -- inference

    def _inference(self, request: Request, ctx: RequestRecord) -> bytes | int:
        try:
            return self._route(request, ctx)
        except ProxyError as error:
            if error.error_type is ErrorType.DRAINING:
                request.setHeader(b"connection", b"close")
            return self._refuse(request, ctx, error)
        except Exception:
            self.core.internal_errors.report(Failure(), ctx.request_id)
            return self._refuse(
                request,
                ctx,
                ProxyError(
                    500,
                    ErrorType.INTERNAL,
                    f"internal router error; the router's log has it under {ctx.request_id}",
                ),
            )

    def _route(self, request: Request, ctx: RequestRecord) -> int:
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
        if model is not None and not isinstance(model, str):
            raise ProxyError(400, ErrorType.INVALID_REQUEST, "`model` must be a string")
        if not model:
            raise ProxyError(404, ErrorType.ROUTE_NOT_FOUND, "the request names no model")
        ctx.model = model
        ctx.stream = body.get("stream") is True

        def header(name: str) -> str:
            return request.getHeader(name) or ""

        match = core.store.match(model, header, request.path.decode("latin-1"))
        if match is None:
            raise ProxyError(404, ErrorType.ROUTE_NOT_FOUND, f"the model `{model}` does not exist")
        ctx.match = match
        try:
            prompt.check(body, ctx.path)
        except prompt.PromptError as e:
            raise ProxyError(400, ErrorType.INVALID_REQUEST, str(e)) from e
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
        for name, values in forwardable(request.requestHeaders, core.drop_upstream):
            headers.setRawHeaders(name, values)
        headers.setRawHeaders(b"x-request-id", [ctx.request_id.encode("ascii")])
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
