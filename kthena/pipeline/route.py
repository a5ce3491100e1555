"""
Stage 3, route: the ModelRoute for the request's model (by C{modelName}, then LoRA adapter
name), its first rule whose conditions hold, a target by weight: the model server. Failing
that (as Kthena), the HTTPRoute attached to the request's Gateway listener that takes its
host and path, and an InferencePool of its rule by weight. The matching itself is the
datastore's (L{kthena.store.Datastore.match}, L{kthena.store.Datastore.match_http_route}).
"""

from __future__ import annotations

from kthena.config.resources import GatewayListener
from kthena.config.router import RouterConfig
from kthena.errors import ErrorType, ProxyError
from kthena.interfaces import IExchange
from kthena.pipeline.parse import Parsed
from kthena.record import RequestRecord
from kthena.store import Datastore, RouteMatch


class Routing:
    """
    @ivar via: the Gateway listener requests through the proxy listener come through
        (the config's C{gateway}; None: none), for routes with C{parentRefs}; a request
        through a port opened for Gateway listeners comes through the one of them that
        takes its host (none: 404).
    """

    def __init__(self, store: Datastore, config: RouterConfig) -> None:
        self.store = store
        self.via = config.gateway

    def reconfigure(self, config: RouterConfig) -> None:
        self.via = config.gateway

    def route(self, exchange: IExchange, record: RequestRecord, parsed: Parsed) -> RouteMatch:
        """@raise ProxyError: 404 when no route takes the model."""

        def header(name: str) -> str:
            value = exchange.header(name.encode("latin-1"))
            return value.decode("latin-1") if value is not None else ""

        via = self.via
        host = None  # read only where it is needed: not for a ModelRoute through the proxy
        port = record.gateway_port
        if port is not None:
            host = header("host")
            found_via = port.resolve(host)
            if found_via is None:
                raise ProxyError(
                    404,
                    ErrorType.ROUTE_NOT_FOUND,
                    f"no Gateway listener on port {port.number} takes the host {host!r}",
                )
            via = found_via
        match = self.store.match(parsed.model, header, record.path, via)
        if match is None:
            match = self._http_route(exchange, record, parsed, host, via)
        record.match = match
        return match

    def _http_route(
        self,
        exchange: IExchange,
        record: RequestRecord,
        parsed: Parsed,
        host: str | None,
        via: GatewayListener | None,
    ) -> RouteMatch:
        def header(name: str) -> str | None:
            value = exchange.header(name.encode("latin-1"))
            return value.decode("latin-1") if value is not None else None

        if host is None:
            host = header("host") or ""
        found = self.store.match_http_route(
            parsed.model, host, record.method, record.path, header, via
        )
        if found is None:
            model = parsed.model
            raise ProxyError(404, ErrorType.ROUTE_NOT_FOUND, f"the model `{model}` does not exist")
        choice, match = found
        if match is None:
            route = choice.route.meta.key
            raise ProxyError(
                500,
                ErrorType.POOL_SELECTION,
                f"HTTPRoute {route} rule {choice.rule.name} has no InferencePool to send to",
            )
        return match
