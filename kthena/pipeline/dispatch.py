"""
Stage 6, dispatch: the attempts on the candidates, best first, until one answers; then
the relay. For a prefill/decode server each attempt is a pair (L{kthena.pd.pairs}): the
prefill leg first, shaped by the server's KV connector (L{kthena.pd.connectors}; its
answer read whole, bounded), then the decode leg, which is attempted, judged and relayed
exactly as an aggregated attempt. A failed prefill leg fails its attempt the same way;
when every pair failed the client gets Kthena's 500.

Retries follow the ModelServer's C{trafficPolicy.retry} (attempts, interval), on the next
candidate pod, for failures before the first response byte: connection failures,
timeouts and 5xx answers. Without a retry policy only connection failures, where the pod
never saw the request, are retried. A pod's 404 naming the requested model (an adapter it
has not loaded: it does not serve the model) moves on to the next candidate the same
way; other 4xx answers are the client's and pass through. When more than one attempt was
made and all failed, the client gets Kthena's 503 C{request to all pods failed}; a single
attempt's 5xx is relayed as the pod sent it. Post-schedule hooks (the prefix index) learn
only from a 2xx, as Kthena's.
"""

from __future__ import annotations

from typing import NoReturn

from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
from twisted.web.iweb import IResponse

from kthena.config.router import RouterConfig
from kthena.errors import ErrorType, ProxyError
from kthena.failures import CONNECT_ERRORS, describe
from kthena.interfaces import IRequestObserver, IUpstream
from kthena.pd.pairs import Pair
from kthena.pipeline.call import Call
from kthena.pipeline.headers import upstream_skip
from kthena.pipeline.outlier import OutlierDetector
from kthena.pipeline.prefill import Background, PrefillError, PrefillLegs, add_leg, pd_pairs
from kthena.pipeline.respond import relay_response
from kthena.pipeline.schedule import Scheduling
from kthena.podclient import BodyCollector, BufferedResponse
from kthena.pods import PodEndpoint
from kthena.record import RequestRecord
from kthena.store import Datastore

CONNECT_RETRIES = 2
"""Retries on connection failure when the ModelServer sets no retry policy."""

SMALL_BODY = 64 * 1024
"""A 404 body read to tell why (the model is not served?) before it is relayed."""


class _Discard:
    """Swallows a response body that is not relayed (a 5xx before a retry)."""

    def makeConnection(self, transport: object) -> None:
        stop = getattr(transport, "stopProducing", None)
        if stop is not None:
            stop()

    def dataReceived(self, data: bytes) -> None:
        pass

    def connectionLost(self, reason: Failure) -> None:
        pass


class Dispatcher:
    """
    @ivar skip: request headers never forwarded to pods.
    """

    def __init__(
        self,
        upstream: IUpstream,
        outliers: OutlierDetector,
        store: Datastore,
        scheduling: Scheduling,
        observers: IRequestObserver,
        clock: IReactorTime,
        config: RouterConfig,
    ) -> None:
        self.upstream = upstream
        self.outliers = outliers
        self.store = store
        self.scheduling = scheduling
        self.observers = observers
        self.clock = clock
        self.prefills = PrefillLegs(
            self._send, self.failed, self._attempt_failed, outliers.succeeded, clock
        )
        self.reconfigure(config)

    def reconfigure(self, config: RouterConfig) -> None:
        self.idle_timeout = config.upstream.idle_timeout
        self.skip = upstream_skip(config.upstream.forward_authorization)

    async def dispatch(self, call: Call) -> None:
        """
        Try the candidates (or pairs); relay the first answer to relay.

        @raise ProxyError: when no attempt got an answer to relay.
        """
        server = call.match.server
        policy = server.retry
        attempts = 1 + (policy.attempts if policy is not None else CONNECT_RETRIES)
        interval = policy.interval if policy is not None else 0.0
        record = call.record
        failure: ProxyError | None = None
        pairs = pd_pairs(call, attempts)
        record.upstream_started = self.clock.seconds()
        for attempt in range(attempts):
            if attempt and interval:
                await deferLater(self.clock, interval, lambda: None)
            try:
                pod, body, background = await self._target(call, pairs, attempt, server.timeout)
            except PrefillError as e:
                failure = e.error
                if policy is None and not e.unreachable:
                    break
                continue
            last = attempt + 1 == attempts
            self._acquire(record, pod)
            try:
                try:
                    response = await self._send(call, pod, server.timeout, body)
                except CancelledError:
                    raise
                except Exception as e:
                    failure = self._attempt_failed(call, pod, e, server.timeout)
                    # Connection failures never reached the pod: always worth another.
                    if policy is None and not isinstance(e, CONNECT_ERRORS):
                        break
                    continue
                response, verdict = await self._judge(call, pod, response, policy is not None, last)
                if verdict is None:
                    # No other attempt now: the bytes sent go (a stream lasts minutes).
                    call.outgoing = call.outgoing.without_body()
                    body = None
                    await relay_response(
                        call, pod, response, self.clock, self.idle_timeout, self.failed,
                        self.outliers.succeeded,
                    )  # fmt: skip
                    return
                failure, retry = verdict
                if not retry:
                    break
            finally:
                self._release(record, pod)
                if background is not None:
                    background.stop()
        record.upstream_ended = self.clock.seconds()
        assert failure is not None
        if pairs is not None:
            raise self._all_failed(record, failure, 500, "all prefill/decode pairs failed")
        raise self._all_failed(record, failure) if record.attempts > 1 else failure

    # -- a prefill leg

    async def _target(
        self, call: Call, pairs: list[Pair] | None, attempt: int, timeout: float | None
    ) -> tuple[PodEndpoint, bytes | None, Background | None]:
        """The pod of an attempt, and its body when not the outgoing one (a decode leg's,
        after its pair's prefill leg, or beside it)."""
        if pairs is None:
            return call.candidates[attempt % len(call.candidates)], None, None
        pair = pairs[attempt % len(pairs)]
        body, background = None, None
        if pair.prefill is not None:
            body, background = await self.prefills.prefill(call, pair, timeout)
        add_leg(call.record, pair.group, "decode", pair.decode, self.clock.seconds())
        return pair.decode, body, background

    # -- one attempt

    def _acquire(self, record: RequestRecord, pod: PodEndpoint) -> None:
        record.pod = pod
        record.attempts += 1
        pod.in_flight += 1
        self.observers.attempt_started(record)

    def _release(self, record: RequestRecord, pod: PodEndpoint) -> None:
        pod.in_flight -= 1
        pod.state.finished += 1
        if record.legs is not None:  # the attempt's decode leg ended
            record.legs[-1].ended = self.clock.seconds()
        self.observers.attempt_ended(record)

    def _send(
        self, call: Call, pod: PodEndpoint, timeout: float | None, body: bytes | None = None
    ) -> Deferred[IResponse]:
        """@param body: what to send instead of the outgoing body (a PD leg's)."""
        exchange = call.exchange
        out = call.outgoing
        d: Deferred[IResponse] = self.upstream.request(
            pod,
            call.match.server.protocol,
            exchange.method,
            exchange.uri,
            out.headers,
            out.body if body is None else body,
        )

        def if_cancelled(failure: Failure) -> Failure:
            # Agent fails a cancelled request with ResponseNeverReceived, not
            # CancelledError: the attempt loop would take it for a pod failure (and retry).
            if call.cancelled:
                raise CancelledError()
            return failure

        d.addErrback(if_cancelled)
        if timeout:
            d.addTimeout(timeout, self.clock, onTimeoutCancel=_timed_out)
        return d

    async def _judge(
        self, call: Call, pod: PodEndpoint, response: IResponse, retry_5xx: bool, last: bool
    ) -> tuple[IResponse, tuple[ProxyError, bool] | None]:
        """
        Whether a pod's answer is relayed (C{None}), or the attempt failed: why, and
        whether the next candidate is tried.

        @param retry_5xx: the server has a retry policy (5xx answers are retried).
        @param last: no attempt is left after this one.
        """
        code = response.code
        record = call.record
        record.upstream_status = code
        if record.legs is not None:  # a decode leg's answer
            record.legs[-1].status = code
        if code >= 500:
            why = f"pod {pod.name} answered {code}"
            self.failed(call, pod, why)
            retry = retry_5xx and not last
            if retry or record.attempts > 1:
                response.deliverBody(_Discard())
                return response, (ProxyError(503, ErrorType.PROXY, why), retry)
        elif code == 404 and not last:
            response = await _read_small(response)
            if _does_not_serve(call, response):
                why = f"pod {pod.name} does not serve the model (404)"
                _tried(record, pod, why)
                return response, (ProxyError(503, ErrorType.PROXY, why), True)
        if 200 <= code < 300:
            self.scheduling.served(record, pod)
        return response, None

    def _attempt_failed(
        self, call: Call, pod: PodEndpoint, error: Exception, timeout: float | None
    ) -> ProxyError:
        if isinstance(error, CONNECT_ERRORS):
            failure = ProxyError(
                503, ErrorType.PROXY, f"pod {pod.name} unreachable: {describe(error)}"
            )
        elif isinstance(error, TimeoutError):
            failure = ProxyError(
                504, ErrorType.TIMEOUT, f"pod {pod.name} sent no response within {timeout}s"
            )
        else:
            failure = ProxyError(503, ErrorType.PROXY, f"pod {pod.name} failed: {describe(error)}")
        self.failed(call, pod, failure.message)
        return failure

    def failed(self, call: Call, pod: PodEndpoint, why: str) -> None:
        """
        An attempt on C{pod} failed: kept on the pod and in the request's record, and
        counted by outlier detection.
        """
        pod.failed(why)
        self.outliers.failed(pod, why, self.store.server_pods(call.match.server))
        _tried(call.record, pod, why)

    @staticmethod
    def _all_failed(
        record: RequestRecord,
        last: ProxyError,
        status: int = 503,
        what: str = "request to all pods failed",
    ) -> ProxyError:
        """Kthena's answer when every attempt failed, with what the last one said."""
        attempts = record.failed_attempts or []
        reason = attempts[-1][1] if attempts else last.message
        tried = len(attempts) or record.attempts
        return ProxyError(status, ErrorType.PROXY, f"{what}: {tried} attempts, the last: {reason}")


def _tried(record: RequestRecord, pod: PodEndpoint, why: str) -> None:
    """An attempt on C{pod} did not serve the request: kept in its record."""
    if record.failed_attempts is None:
        record.failed_attempts = []
    record.failed_attempts.append((pod.name, why))


async def _read_small(response: IResponse) -> IResponse:
    """The response with its (small, error) body read, to look at before relaying."""
    collector = BodyCollector(SMALL_BODY)
    response.deliverBody(collector)
    try:
        body = await collector.done
    except Exception:
        body = b""
    return BufferedResponse(response, body)


def _does_not_serve(call: Call, response: IResponse) -> bool:
    """A pod's 404 that names the model asked of it: it does not serve that model."""
    body = response.body if isinstance(response, BufferedResponse) else b""
    model = call.match.upstream_model(call.record.model or "")
    return model.encode("utf-8", "surrogatepass") in body


def _timed_out(result: object, timeout: float) -> NoReturn:
    # A cancelled Agent request fails with ResponseNeverReceived, not CancelledError, so
    # addTimeout's default translation would miss it and the timeout would look like a 503.
    raise TimeoutError(timeout, "Deferred")
