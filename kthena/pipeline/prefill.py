"""
The prefill leg of a prefill/decode attempt (the dispatcher's L{PrefillLegs}): shaped by
the server's KV connector (L{kthena.pd.connectors}), its answer read whole and bounded;
or, for a connector whose legs run at once (SGLang), sent in the background beside the
decode leg and cancelled, without blaming its pod, if still running when the attempt
ends. Each leg sent is kept in the record (L{kthena.record.Leg}).
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import islice

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.web.iweb import IResponse

from kthena.errors import ErrorType, ProxyError
from kthena.failures import CONNECT_ERRORS
from kthena.interfaces import IKVConnector
from kthena.pd.connectors import connectors
from kthena.pd.pairs import Pair, PDPlan
from kthena.pd.transfer import kv_blocks
from kthena.pipeline.call import Call
from kthena.podclient import BodyCollector
from kthena.pods import PodEndpoint
from kthena.record import Leg, RequestRecord
from kthena.webutil import json_bytes, json_loads

PREFILL_BODY = 1024 * 1024
"""The most of a prefill leg's answer read (one token, and vLLM's kv_transfer_params)."""

Send = Callable[[Call, PodEndpoint, "float | None", "bytes | None"], Deferred[IResponse]]
Failed = Callable[[Call, PodEndpoint, str], None]
AttemptFailed = Callable[[Call, PodEndpoint, Exception, "float | None"], ProxyError]


class PrefillLegs:
    """
    @param send: the dispatcher's request to a pod (with a body of the leg's).
    @param failed: the dispatcher's record of a pod's failed attempt.
    @param attempt_failed: the dispatcher's verdict on an attempt that raised.
    @param succeeded: a pod served its leg (outlier detection's failures in a row end).
    """

    def __init__(
        self,
        send: Send,
        failed: Failed,
        attempt_failed: AttemptFailed,
        succeeded: Callable[[PodEndpoint], None],
        clock: IReactorTime,
    ) -> None:
        self.send = send
        self.failed = failed
        self.attempt_failed = attempt_failed
        self.succeeded = succeeded
        self.clock = clock
        self.connectors: dict[str, IKVConnector] = connectors()

    async def prefill(
        self, call: Call, pair: Pair, timeout: float | None
    ) -> tuple[bytes, Background | None]:
        """
        The prefill leg of C{pair}; the decode leg's body. A connector whose legs run at
        once (SGLang) gets its prefill leg going in the background: the attempt cancels it
        if it is still running when the attempt ends.

        @raise PrefillError: the pod could not be reached, failed, answered other than
            2xx, or without what the connector needs for the decode leg.
        """
        server, pod = call.match.server, pair.prefill
        assert pod is not None, "a decode-only pair has no prefill leg"
        transfer = self.connectors[server.kv_connector or "http"].transfer(call.body, pod.host)
        leg = add_leg(call.record, pair.group, "prefill", pod, self.clock.seconds())
        body = json_bytes(transfer.prefill_body())
        if transfer.concurrent:
            background = Background()
            running = self._leg(call, pod, leg, timeout, body, background)
            background.run(Deferred.fromCoroutine(running))
            return json_bytes(transfer.decode_body(None)), background
        reply = await self._leg(call, pod, leg, timeout, body)
        try:
            return json_bytes(transfer.decode_body(reply)), None
        except ValueError as e:
            why = f"prefill pod {pod.name}: {e}"
            self.failed(call, pod, why)
            raise PrefillError(ProxyError(503, ErrorType.PROXY, why)) from None

    async def _leg(
        self,
        call: Call,
        pod: PodEndpoint,
        leg: Leg,
        timeout: float | None,
        body: bytes,
        background: Background | None = None,
    ) -> object:
        """Send a prefill leg; when the pod answered 2xx, its whole (bounded) answer
        parsed (C{None}: not JSON) and the KV blocks it produced kept in C{leg}."""
        pod.in_flight += 1
        try:
            try:
                response = await self.send(call, pod, timeout, body)
                collector = BodyCollector(PREFILL_BODY)
                response.deliverBody(collector)
                raw = await collector.done
            except CancelledError:
                raise
            except Exception as e:
                if background is not None and background.stopped:
                    raise CancelledError() from None  # its attempt ended: not the pod's fault
                error = self.attempt_failed(call, pod, e, timeout)
                raise PrefillError(error, isinstance(e, CONNECT_ERRORS)) from None
            leg.status = response.code
            if not 200 <= response.code < 300:
                why = f"prefill pod {pod.name} answered {response.code}"
                self.failed(call, pod, why)
                raise PrefillError(ProxyError(503, ErrorType.PROXY, why))
            self.succeeded(pod)
            reply = _parsed(raw)
            estimate = call.record.input_estimate or 0
            leg.kv_blocks = kv_blocks(reply, call.match.server.kv_block_size, estimate)
            return reply
        finally:
            pod.in_flight -= 1
            pod.state.finished += 1
            leg.ended = self.clock.seconds()


def _parsed(raw: bytes) -> object:
    try:
        return json_loads(raw)
    except ValueError:  # UnicodeDecodeError too
        return None


def pd_pairs(call: Call, attempts: int) -> list[Pair] | None:
    """A PD call's pairs, one per attempt at most (C{None}: an aggregated call)."""
    plan = call.record.pd_plan
    if not isinstance(plan, PDPlan):
        return None
    pairs = list(islice(plan.pairs(), attempts))
    if not pairs:
        raise ProxyError(503, ErrorType.SCHEDULING, "no prefill/decode pair can take it")
    return pairs


def add_leg(record: RequestRecord, group: str, role: str, pod: PodEndpoint, now: float) -> Leg:
    leg = Leg(group, role, pod.name, now)
    if record.legs is None:
        record.legs = []
    record.legs.append(leg)
    return leg


class Background:
    """A prefill leg running beside its decode leg; stopped when their attempt ends."""

    def __init__(self) -> None:
        self.stopped = False
        self._running: Deferred[object] | None = None

    def run(self, running: Deferred[object]) -> None:
        # its failure is the pod's, recorded already; the decode leg's answer decides
        self._running = running.addErrback(lambda _: None)

    def stop(self) -> None:
        self.stopped = True
        if self._running is not None and not self._running.called:
            self._running.cancel()


class PrefillError(Exception):
    """A prefill leg failed; C{unreachable}: its pod never saw the request."""

    def __init__(self, error: ProxyError, unreachable: bool = False) -> None:
        self.error = error
        self.unreachable = unreachable
