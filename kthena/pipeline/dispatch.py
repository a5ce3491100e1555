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

import json
from itertools import islice
from typing import NoReturn

from twisted.internet import error as net_error
from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
from twisted.web.iweb import IResponse

from kthena.config.router import RouterConfig
from kthena.errors import ErrorType, ProxyError
from kthena.failures import describe
from kthena.interfaces import IKVConnector, IRequestObserver, IUpstream
from kthena.pd.connectors import connectors
from kthena.pd.pairs import Pair
from kthena.pipeline.call import Call
from kthena.pipeline.headers import upstream_skip
from kthena.pipeline.outlier import OutlierDetector
from kthena.pipeline.respond import relay_response
from kthena.pipeline.schedule import Scheduling
from kthena.podclient import BodyCollector, BufferedResponse
from kthena.pods import PodEndpoint
from kthena.record import Leg, RequestRecord
from kthena.store import Datastore
from kthena.webutil import json_bytes

CONNECT_RETRIES = 2
"""Retries on connection failure when the ModelServer sets no retry policy."""

SMALL_BODY = 64 * 1024
"""A 404 body read to tell why (the model is not served?) before it is relayed."""
PREFILL_BODY = 1024 * 1024
"""The most of a prefill leg's answer read (one token, and vLLM's kv_transfer_params)."""

_CONNECT_ERRORS = (
    net_error.ConnectError,
    net_error.DNSLookupError,
    net_error.TimeoutError,
)


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
        self.connectors: dict[str, IKVConnector] = connectors()
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
        pairs = _pairs(call, attempts)
        record.upstream_started = self.clock.seconds()
        for attempt in range(attempts):
            if attempt and interval:
                await deferLater(self.clock, interval, lambda: None)
            try:
                pod, body, background = await self._target(call, pairs, attempt, server.timeout)
            except _PrefillError as e:
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
                    if policy is None and not isinstance(e, _CONNECT_ERRORS):
                        break
                    continue
                response, verdict = await self._judge(call, pod, response, policy is not None, last)
                if verdict is None:
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
    ) -> tuple[PodEndpoint, bytes | None, _Background | None]:
        """The pod of an attempt, and its body when not the outgoing one (a decode leg's,
        after its pair's prefill leg, or beside it)."""
        if pairs is None:
            return call.candidates[attempt % len(call.candidates)], None, None
        pair = pairs[attempt % len(pairs)]
        body, background = await self._prefill(call, pair, timeout)
        _leg(call.record, pair.group, "decode", pair.decode, self.clock.seconds())
        return pair.decode, body, background

    async def _prefill(
        self, call: Call, pair: Pair, timeout: float | None
    ) -> tuple[bytes, _Background | None]:
        """
        The prefill leg of C{pair}; the decode leg's body. A connector whose legs run at
        once (SGLang) gets its prefill leg going in the background: the attempt cancels it
        if it is still running when the attempt ends.

        @raise _PrefillError: the pod could not be reached, failed, answered other than
            2xx, or without what the connector needs for the decode leg.
        """
        server = call.match.server
        transfer = self.connectors[server.kv_connector or "http"].transfer(
            call.body, pair.prefill.host
        )
        leg = _leg(call.record, pair.group, "prefill", pair.prefill, self.clock.seconds())
        body = json_bytes(transfer.prefill_body())
        if transfer.concurrent:
            background = _Background()
            running = self._prefill_leg(call, pair.prefill, leg, timeout, body, background)
            background.run(Deferred.fromCoroutine(running))
            return json_bytes(transfer.decode_body(None)), background
        raw = await self._prefill_leg(call, pair.prefill, leg, timeout, body)
        try:
            return json_bytes(transfer.decode_body(_json(raw))), None
        except ValueError as e:
            why = f"prefill pod {pair.prefill.name}: {e}"
            self.failed(call, pair.prefill, why)
            raise _PrefillError(ProxyError(503, ErrorType.PROXY, why)) from None

    async def _prefill_leg(
        self,
        call: Call,
        pod: PodEndpoint,
        leg: Leg,
        timeout: float | None,
        body: bytes,
        background: _Background | None = None,
    ) -> bytes:
        """Send a prefill leg; its whole (bounded) answer when the pod answered 2xx."""
        pod.in_flight += 1
        try:
            try:
                response = await self._send(call, pod, timeout, body)
                collector = BodyCollector(PREFILL_BODY)
                response.deliverBody(collector)
                raw = await collector.done
            except CancelledError:
                raise
            except Exception as e:
                if background is not None and background.stopped:
                    raise CancelledError() from None  # its attempt ended: not the pod's fault
                error = self._attempt_failed(call, pod, e, timeout)
                raise _PrefillError(error, isinstance(e, _CONNECT_ERRORS)) from None
            leg.status = response.code
            if not 200 <= response.code < 300:
                why = f"prefill pod {pod.name} answered {response.code}"
                self.failed(call, pod, why)
                raise _PrefillError(ProxyError(503, ErrorType.PROXY, why))
            return raw
        finally:
            pod.in_flight -= 1
            pod.state.finished += 1
            leg.ended = self.clock.seconds()

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
        if isinstance(error, _CONNECT_ERRORS):
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


def _pairs(call: Call, attempts: int) -> list[Pair] | None:
    """A PD call's pairs, one per attempt at most (C{None}: an aggregated call)."""
    if call.pd is None:
        return None
    pairs = list(islice(call.pd.pairs(), attempts))
    if not pairs:
        raise ProxyError(503, ErrorType.SCHEDULING, "no prefill/decode pair can take it")
    return pairs


def _leg(record: RequestRecord, group: str, role: str, pod: PodEndpoint, now: float) -> Leg:
    leg = Leg(group, role, pod.name, now)
    if record.legs is None:
        record.legs = []
    record.legs.append(leg)
    return leg


class _Background:
    """A prefill leg running beside its decode leg; stopped when their attempt ends."""

    def __init__(self) -> None:
        self.stopped = False
        self._running: Deferred[bytes] | None = None

    def run(self, running: Deferred[bytes]) -> None:
        # its failure is the pod's, recorded already; the decode leg's answer decides
        self._running = running.addErrback(lambda _: b"")

    def stop(self) -> None:
        self.stopped = True
        if self._running is not None and not self._running.called:
            self._running.cancel()


class _PrefillError(Exception):
    """A prefill leg failed; C{unreachable}: its pod never saw the request."""

    def __init__(self, error: ProxyError, unreachable: bool = False) -> None:
        self.error = error
        self.unreachable = unreachable


def _json(raw: bytes) -> object:
    try:
        return json.loads(raw)
    except ValueError:
        raise ValueError("its answer is not JSON") from None


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
