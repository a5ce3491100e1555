"""
What the router answers itself, without a pod: C{GET /v1/models} (every base model and
LoRA adapter a route knows), C{GET /v1/models/{id}} (one of them, as the openai SDK's
C{models.retrieve} asks; ids may hold C{/}), C{GET /healthz} (the process runs) and
C{GET /readyz} (L{kthena.pipeline.health.Readiness}).
"""

from __future__ import annotations

from kthena.config.resources import ModelRoute
from kthena.errors import ErrorType, ProxyError
from kthena.interfaces import IExchange
from kthena.pipeline.answers import answer_error, answer_json
from kthena.pipeline.health import Readiness
from kthena.record import RequestRecord
from kthena.store import Datastore

MODELS = b"/v1/models"
MODEL_PREFIX = b"/v1/models/"
PATHS = frozenset({MODELS, b"/healthz", b"/readyz"})


def answered_here(path: bytes) -> bool:
    return path in PATHS or path.startswith(MODEL_PREFIX)


class LocalAnswers:
    """
    @param started: the router's start, in epoch seconds (a model's C{created} when its
        route has no creation time).
    """

    def __init__(self, store: Datastore, readiness: Readiness, started: int) -> None:
        self.store = store
        self.readiness = readiness
        self.started = started

    def answer(self, exchange: IExchange, record: RequestRecord) -> None:
        path = exchange.path
        if path == b"/readyz":
            self._readyz(exchange, record)
        elif path == b"/healthz":
            answer_json(exchange, record, 200, {"message": "ok"})
        elif path == MODELS:
            names = self._names(exchange, record)
            data = [self._model(name, route) for name, route in names]
            answer_json(exchange, record, 200, {"object": "list", "data": data})
        else:
            name = path[len(MODEL_PREFIX) :].decode("utf-8", "replace")
            record.model = name
            for known, route in self._names(exchange, record):
                if known == name:
                    answer_json(exchange, record, 200, self._model(name, route))
                    return
            error = ProxyError(404, ErrorType.ROUTE_NOT_FOUND, f"the model `{name}` does not exist")
            answer_error(exchange, record, error)

    def _names(self, exchange: IExchange, record: RequestRecord) -> list[tuple[str, ModelRoute]]:
        """The models served through the Gateway listener the request came through: the
        config's for the proxy listener, the one that takes its host on a Gateway's port
        (none: no model; /readyz stays the router's there: probes ask it)."""
        port = record.gateway_port
        if port is None:
            return self.store.model_names(self.readiness.via)
        via = port.resolve((exchange.header(b"host") or b"").decode("latin-1"))
        return [] if via is None else self.store.model_names(via)

    def _model(self, name: str, route: ModelRoute) -> dict[str, object]:
        return {
            "id": name,
            "object": "model",
            "created": self.started
            if route.meta.created_at is None
            else int(route.meta.created_at),
            "owned_by": "kthena",
        }

    def _readyz(self, exchange: IExchange, record: RequestRecord) -> None:
        """
        200, or 503 with the outcome C{draining} or C{pod_discovery} (no first scrape yet,
        or a model without a healthy pod). The body is Kthena's C{{"message": ...}}.
        """
        ready, message, without = self.readiness.check()
        body: dict[str, object] = {"message": message}
        if not ready:
            if without:
                body["models_without_healthy_pods"] = without
            draining = self.readiness.draining
            record.fail(503, ErrorType.DRAINING if draining else ErrorType.NO_PODS, message)
        answer_json(exchange, record, 200 if ready else 503, body)
