"""
Stage 3, route: the ModelRoute for the request's model (by C{modelName}, then LoRA adapter
name), its first rule whose conditions hold, a target by weight: the model server. The
matching itself is the datastore's (L{kthena.store.Datastore.match}).
"""

from __future__ import annotations

from kthena.config.router import RouterConfig
from kthena.errors import ErrorType, ProxyError
from kthena.interfaces import IExchange
from kthena.pipeline.parse import Parsed
from kthena.record import RequestRecord
from kthena.store import Datastore, RouteMatch


class Routing:
    """
    @ivar via: the Gateway listener every request comes through (the config's
        C{gateway}; None: none), for routes with C{parentRefs}.
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

        match = self.store.match(parsed.model, header, record.path, self.via)
        if match is None:
            model = parsed.model
            raise ProxyError(404, ErrorType.ROUTE_NOT_FOUND, f"the model `{model}` does not exist")
        record.match = match
        return match
