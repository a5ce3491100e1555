"""
One request through the stages, in order: parse -> identify -> route -> admit ->
schedule -> dispatch (with the relay) -> settle. Any stage may answer the request itself
(an error); whatever happens (an answer, an error in a stage, the client leaving, a
shutdown cutting the call, a bug) the request is settled exactly once: one record, every
observer told once.

Only the inference paths (C{inferencePaths}, exactly) go through the stages; the router
answers C{/v1/models}, C{/healthz} and C{/readyz} itself (L{kthena.pipeline.local}), and
every other path is 404 before any pod sees it: the engines' admin endpoints are never
reachable, nor paths with dot segments or escapes.
"""

from __future__ import annotations

from dataclasses import dataclass

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from kthena.config.gateway import PortListeners
from kthena.config.router import RouterConfig
from kthena.errors import ErrorType, ProxyError
from kthena.interfaces import IExchange, IRequestObserver
from kthena.pipeline import parse
from kthena.pipeline.admit import Admission
from kthena.pipeline.answers import answer_error, end_with_error
from kthena.pipeline.call import Call
from kthena.pipeline.dispatch import Dispatcher
from kthena.pipeline.health import Readiness
from kthena.pipeline.identify import Identification
from kthena.pipeline.inflight import InFlight
from kthena.pipeline.internal import InternalErrors
from kthena.pipeline.local import LocalAnswers, answered_here
from kthena.pipeline.outgoing import outgoing
from kthena.pipeline.route import Routing
from kthena.pipeline.schedule import Scheduling
from kthena.pipeline.settle import Settlement
from kthena.record import RequestRecord, request_id

_CLOSE = [(b"connection", b"close")]


@dataclass(eq=False, slots=True)
class _Run:
    """One inference request while the stages run it."""

    exchange: IExchange
    record: RequestRecord
    call: Call | None = None
    client_gone: bool = False
    settled: bool = False
    running: Deferred[None] | None = None

    def cancel(self) -> None:
        """Stop the request wherever it is (the client left, or a shutdown cuts it)."""
        if self.call is not None:
            self.call.cancelled = True
        if self.running is not None and not self.running.called:
            self.running.cancel()


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


class Pipeline:
    def __init__(
        self,
        clock: IReactorTime,
        config: RouterConfig,
        identification: Identification,
        routing: Routing,
        admission: Admission,
        scheduling: Scheduling,
        dispatcher: Dispatcher,
        observers: IRequestObserver,
        settlement: Settlement,
        readiness: Readiness,
        local: LocalAnswers,
        inflight: InFlight,
        internal_errors: InternalErrors,
    ) -> None:
        self.clock = clock
        self.identification = identification
        self.routing = routing
        self.admission = admission
        self.scheduling = scheduling
        self.dispatcher = dispatcher
        self.observers = observers
        self.settlement = settlement
        self.readiness = readiness
        self.local = local
        self.inflight = inflight
        self.internal_errors = internal_errors
        self.reconfigure(config)

    def reconfigure(self, config: RouterConfig) -> None:
        self.inference_paths = frozenset(p.encode() for p in config.inference_paths)
        self.max_body_bytes = config.max_body_bytes

    # -- every request

    def handle(self, exchange: IExchange, gateway_port: PortListeners | None = None) -> None:
        """
        @param gateway_port: the listeners of the Gateway port it came through (None: the
            proxy listener).
        """
        record = RequestRecord(
            request_id=request_id(exchange.header(b"x-request-id")),
            method=exchange.method.decode("latin-1"),
            path=exchange.path.decode("latin-1"),
            started=self.clock.seconds(),
            protocol=exchange.protocol,
            gateway_port=gateway_port,
        )
        path = exchange.path
        method = exchange.method
        if path in self.inference_paths:
            if method != b"POST":
                self._refuse(exchange, record, _not_allowed(method), [(b"allow", b"POST")])
            else:
                self._inference(_Run(exchange, record))
        elif not answered_here(path):
            self._refuse(exchange, record, _not_served(path))
        elif method not in (b"GET", b"HEAD"):
            self._refuse(exchange, record, _not_allowed(method), [(b"allow", b"GET, HEAD")])
        else:
            self.local.answer(exchange, record)
            self.settlement.settle(record)

    def refused(self, record: RequestRecord) -> None:
        """A request the HTTP layer answered itself (408, 414, 431, 400): settled too."""
        self.settlement.settle(record)

    def _refuse(
        self,
        exchange: IExchange,
        record: RequestRecord,
        error: ProxyError,
        headers: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        answer_error(exchange, record, error, headers or ())
        self.settlement.settle(record)

    # -- inference

    def _inference(self, run: _Run) -> None:
        d = Deferred.fromCoroutine(self._stages(run))
        d.addErrback(self._broke, run)
        d.addBoth(self._settle, run)
        if not run.settled:  # still going: a pod is at work
            run.running = d
            self.inflight.add(run)
            run.exchange.when_gone(lambda: self._client_lost(run))

    async def _stages(self, run: _Run) -> None:
        run.call = await self._prepare(run)
        run.record.dispatched = True
        self.observers.started(run.record)
        await self.dispatcher.dispatch(run.call)

    async def _prepare(self, run: _Run) -> Call:
        """Every stage before the pods; a coroutine of its own, so that what only they use
        (the parsed body, the outgoing one) is not held while a stream is relayed."""
        exchange, record = run.exchange, run.record
        if self.readiness.draining:
            raise ProxyError(503, ErrorType.DRAINING, "the router is shutting down")
        parsed = parse.parse(exchange, record, self.max_body_bytes)
        identifying = self.identification.identify(exchange, record)
        if identifying is not None:  # the key set is read again for an unknown key
            await identifying
        match = self.routing.route(exchange, record, parsed)
        await self.admission.admit(record, parsed)
        candidates = self.scheduling.schedule(record, parsed, match)
        out = outgoing(exchange, record, parsed, match, self.dispatcher.skip)
        return Call(exchange, record, match, candidates, out, parsed.body)

    def _broke(self, failure: Failure, run: _Run) -> None:
        """A stage answered with an error, the call was cut, or something broke."""
        exchange, record, call = run.exchange, run.record, run.call
        if run.client_gone:
            return
        if call is not None and call.relay is not None:
            exchange.unregister_producer()
        error = failure.value
        sse = call is not None and call.relay is not None and call.relay.sse
        if isinstance(error, ProxyError):
            draining = error.error_type is ErrorType.DRAINING
            if exchange.started:
                end_with_error(exchange, record, error, sse)
            else:
                answer_error(exchange, record, error, _CLOSE if draining else ())
        elif isinstance(error, CancelledError):  # a shutdown cut the call
            cut = ProxyError(503, ErrorType.DRAINING, "the router shut down mid-response")
            end_with_error(exchange, record, cut, sse)
        else:
            self.internal_errors.report(failure, record.request_id)
            internal = ProxyError(
                500,
                ErrorType.INTERNAL,
                f"internal router error; the router's log has it under {record.request_id}",
            )
            if exchange.started:
                record.fail(record.status or 502, ErrorType.INTERNAL, internal.message)
                exchange.abort()
            else:
                answer_error(exchange, record, internal)

    def _client_lost(self, run: _Run) -> None:
        if run.settled:
            return
        run.client_gone = True
        record = run.record
        record.error_type = ErrorType.CLIENT_DISCONNECT
        record.error_message = "the client closed the connection"
        if run.call is not None:
            run.call.client_gone = True
        run.cancel()

    def _settle(self, result: object, run: _Run) -> None:
        run.settled = True
        if run.running is not None:
            self.inflight.remove(run)
        self.settlement.settle(run.record, run.client_gone)
