"""
The C{/debug} resource: L{DebugGate} (access, read-only methods, UTF-8 paths) in front of a
Klein app routing each endpoint to its view. Klein installs the global reactor when
imported: it is imported inside L{make_debug_resource} only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource, Resource

from kthena.observability.debug.access import DebugAccess
from kthena.observability.debug.common import DebugError, DebugSources, _int_arg, _text_arg
from kthena.observability.debug.config_dump import KINDS, ConfigDump
from kthena.observability.debug.inference import InferenceExtension
from kthena.observability.debug.pd import PDGroups
from kthena.observability.debug.routing import Routing
from kthena.observability.debug.servers import Servers
from kthena.observability.decisions import DECISIONS_KEPT
from kthena.webutil import READ_METHODS, json_body, method_not_allowed

log = Logger()

ENDPOINTS = (
    *(f"/debug/config_dump/{kind}" for kind in KINDS),
    *(f"/debug/config_dump/namespaces/{{namespace}}/{kind}/{{name}}" for kind in KINDS),
    "/debug/router/state",
    "/debug/routing/table",
    "/debug/routing/decisions?limit=N&model=M",
    "/debug/routing/backends",
    "/debug/model-servers",
    "/debug/model-servers/{name}/status?namespace=NS",
    "/debug/model-servers/{name}/metrics?namespace=NS",
    "/debug/pd-groups",
    "/debug/pd-groups/{group_key}/status",
    "/debug/kv-cache/connectors",
    "/debug/inference-extension/pools",
    "/debug/inference-extension/pools/{pool}/endpoints?namespace=NS",
    "/debug/inference-extension/decisions?limit=N",
)


class DebugGate(Resource):
    """
    In front of the Klein app: refuses (403) clients L{DebugAccess} does not let in,
    and (405) any method but GET and HEAD, before any route is looked at.
    """

    isLeaf = True

    def __init__(self, app: IResource, access: DebugAccess) -> None:
        super().__init__()
        self.app = app
        self.access = access

    def render(self, request: IRequest) -> bytes | int:
        refusal = self.access.refusal(request)
        if refusal is not None:
            return json_body(request, 403, {"error": refusal})
        if request.method not in READ_METHODS:
            return method_not_allowed(request)
        try:
            b"/".join(request.postpath or ()).decode("utf-8")
        except UnicodeDecodeError:
            return json_body(request, 400, {"error": "the URL is not UTF-8"})
        result: bytes | int = self.app.render(request)
        return result


def _answer(request: IRequest, build: Callable[[], object]) -> bytes | Deferred[bytes]:
    """A view's answer as JSON; a view whose source must be asked (Redis) answers later."""
    try:
        value = build()
    except DebugError as e:
        return json_body(request, e.status, e.body)
    if isinstance(value, Deferred):
        return value.addCallback(lambda later: json_body(request, 200, later))
    return json_body(request, 200, value)


def _routes(sources: DebugSources) -> list[tuple[str, str, Callable[..., object]]]:
    """Each endpoint: its Klein path, its name, and what builds its answer."""
    config, routing, servers = ConfigDump(sources), Routing(sources), Servers(sources)
    pd, inference = PDGroups(sources), InferenceExtension(sources)

    def server(request: IRequest, name: str) -> Any:
        return servers.find_server(name, _text_arg(request, b"namespace"))

    def pool(request: IRequest, name: str) -> Any:
        return inference.find_pool(name, _text_arg(request, b"namespace"))

    return [
        ("/", "index", lambda r: {"endpoints": list(ENDPOINTS)}),
        ("/config_dump/<kind>", "config_kind", lambda r, kind: config.listing(kind)),
        (
            "/config_dump/namespaces/<namespace>/<kind>/<name>",
            "config_object",
            lambda r, namespace, kind, name: config.config_object(namespace, kind, name),
        ),
        ("/router/state", "router_state", lambda r: routing.router_state()),
        ("/routing/table", "routing_table", lambda r: routing.routing_table()),
        (
            "/routing/decisions",
            "decisions",
            lambda r: routing.decisions(
                _int_arg(r, b"limit", DECISIONS_KEPT), _text_arg(r, b"model")
            ),
        ),
        ("/routing/backends", "backends", lambda r: routing.backends()),
        ("/model-servers", "model_servers", lambda r: servers.model_servers()),
        (
            "/model-servers/<name>/status",
            "server_status",
            lambda r, name: servers.server_status(server(r, name)),
        ),
        (
            "/model-servers/<name>/metrics",
            "server_metrics",
            lambda r, name: servers.server_metrics(server(r, name)),
        ),
        ("/pd-groups", "pd_groups", lambda r: pd.pd_groups()),
        (
            "/pd-groups/<group_key>/status",
            "pd_group",
            lambda r, group_key: pd.pd_group_status(group_key),
        ),
        ("/kv-cache/connectors", "kv_connectors", lambda r: pd.kv_connectors()),
        ("/inference-extension/pools", "pools", lambda r: inference.pools()),
        (
            "/inference-extension/pools/<name>/endpoints",
            "pool_endpoints",
            lambda r, name: inference.pool_endpoints(pool(r, name)),
        ),
        (
            "/inference-extension/decisions",
            "pool_decisions",
            lambda r: inference.decisions(_int_arg(r, b"limit", DECISIONS_KEPT)),
        ),
    ]


def _handler(build: Callable[..., object]) -> Callable[..., bytes | Deferred[bytes]]:
    def handler(request: IRequest, **params: str) -> bytes | Deferred[bytes]:
        return _answer(request, lambda: build(request, **params))

    return handler


def make_debug_resource(sources: DebugSources) -> IResource:
    """
    The C{/debug} resource: L{DebugGate} in front of a Klein app over the view families.
    """
    from klein import Klein
    from werkzeug.exceptions import HTTPException

    app = Klein()

    for path, endpoint, build in _routes(sources):
        app.route(path, endpoint=endpoint, strict_slashes=False)(_handler(build))

    @app.handle_errors(HTTPException)
    def http_error(request: IRequest, failure: Any) -> bytes:
        code = int(getattr(failure.value, "code", None) or 404)
        if code == 405:
            return method_not_allowed(request)
        if code != 404:
            # A redirect or anything else werkzeug would answer: one clear 404 instead.
            code = 404
        return json_body(request, code, {"error": f"no debug endpoint at {request.path.decode()}"})

    @app.handle_errors(Exception)
    def crashed(request: IRequest, failure: Any) -> bytes:
        log.failure("debug endpoint {path} failed", failure, path=request.path)
        return json_body(request, 500, {"error": "internal error; see the router's log"})

    return DebugGate(app.resource(), sources.access)
