"""
One proxied request, from the first upstream attempt to the last byte relayed.

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

from twisted.internet import error as net_error
from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IResponse
from twisted.web.server import Request

from kthena.errors import ErrorType, ProxyError, error_object, respond_error
from kthena.failures import describe
from kthena.podclient import BodyCollector, BufferedResponse
from kthena.pods import PodEndpoint
from kthena.proxy.core import RouterCore
from kthena.proxy.headers import HOP_BY_HOP, STREAM_SKIP, forwardable
from kthena.proxy.relay import Relay
from kthena.record import RequestRecord
from kthena.store import RouteMatch
from kthena.webutil import json_bytes

log = Logger()

CONNECT_RETRIES = 2
"""Retries on connection failure when the ModelServer sets no retry policy."""

SMALL_BODY = 64 * 1024
"""A 404 body read to tell why (the model is not served?) before it is relayed."""

_CONNECT_ERRORS = (
    net_error.ConnectError,
    net_error.DNSLookupError,
    net_error.TimeoutError,
)


class _Discard:
    """Swallows a response body we will not relay (a 5xx before a retry)."""

    def makeConnection(self, transport: object) -> None:
        stop = getattr(transport, "stopProducing", None)
        if stop is not None:
            stop()

    def dataReceived(self, data: bytes) -> None:
        pass

    def connectionLost(self, reason: Failure) -> None:
        pass


class ProxyCall:
    """
    Drives one request through attempts and the relay, and ends it exactly once.
    """

    def __init__(
        self,
        core: RouterCore,
        request: Request,
        ctx: RequestRecord,
        match: RouteMatch,
        candidates: list[PodEndpoint],
        headers: Headers,
        body: bytes,
        hide_usage: bool,
    ) -> None:
        self.core = core
        self.request = request
        self.ctx = ctx
        self.match = match
        self.candidates = candidates
        self.headers = headers
        self.body = body
        self.hide_usage = hide_usage
        self.client_gone = False
        self.cancelled = False
        self.relay: Relay | None = None
        self._run: Deferred[None] | None = None

    def start(self) -> None:
        self.core.call_started(self)
        self.core.metrics.request_started(self.ctx)
        self.request.notifyFinish().addErrback(self._client_lost)
        self._run = Deferred.fromCoroutine(self._proxy())
        self._run.addErrback(self._crashed)
        self._run.addBoth(self._ended)

    def cancel(self) -> None:
        """Stop wherever the call is (client gone, or shutdown)."""
        if self._run is not None and not self._run.called:
            self.cancelled = True
            self._run.cancel()

    # -- the attempts

    async def _proxy(self) -> None:
        server = self.match.server
        policy = server.retry
        attempts = 1 + (policy.attempts if policy is not None else CONNECT_RETRIES)
        interval = policy.interval if policy is not None else 0.0
        timeout = server.timeout
        clock = self.core.reactor
        failure: ProxyError | None = None
        ctx = self.ctx
        ctx.upstream_started = clock.seconds()
        for attempt in range(attempts):
            if attempt and interval:
                await deferLater(clock, interval, lambda: None)
            pod = self.candidates[attempt % len(self.candidates)]
            ctx.pod = pod
            ctx.attempts += 1
            self._acquire(pod)
            try:
                try:
                    response = await self._send(pod, timeout)
                except CancelledError:
                    raise
                except Exception as e:
                    failure = self._attempt_failed(pod, e, timeout)
                    # Connection failures never reached the pod: always worth another.
                    if policy is None and not isinstance(e, _CONNECT_ERRORS):
                        break
                    continue
                last = attempt + 1 == attempts
                response, verdict = await self._judge(pod, response, policy is not None, last)
                if verdict is None:
                    await self._relay(pod, response)
                    return
                failure, retry = verdict
                if not retry:
                    break
            finally:
                self._release(pod)
        ctx.upstream_ended = clock.seconds()
        assert failure is not None
        if ctx.attempts > 1:
            failure = self._all_failed(failure)
        self._answer_error(failure)

    async def _judge(
        self, pod: PodEndpoint, response: IResponse, retry_5xx: bool, last: bool
    ) -> tuple[IResponse, tuple[ProxyError, bool] | None]:
        """
        Whether a pod's answer is relayed (C{None}), or the attempt failed: why, and
        whether the next candidate is tried.

        @param retry_5xx: the server has a retry policy (5xx answers are retried).
        @param last: no attempt is left after this one.
        """
        code = response.code
        self.ctx.upstream_status = code
        if code >= 500:
            why = f"pod {pod.name} answered {code}"
            self._failed(pod, why)
            retry = retry_5xx and not last
            if retry or self.ctx.attempts > 1:
                response.deliverBody(_Discard())
                return response, (ProxyError(503, ErrorType.PROXY, why), retry)
        elif code == 404 and not last:
            response = await self._read_small(response)
            if self._does_not_serve(response):
                why = f"pod {pod.name} does not serve the model (404)"
                self._tried(pod, why)
                return response, (ProxyError(503, ErrorType.PROXY, why), True)
        if 200 <= code < 300 and self.ctx.decision is not None:
            self.core.scheduler.scheduled(self.ctx.decision, pod)
        return response, None

    def _attempt_failed(
        self, pod: PodEndpoint, error: Exception, timeout: float | None
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
        self._failed(pod, failure.message)
        return failure

    def _failed(self, pod: PodEndpoint, why: str) -> None:
        """
        An attempt on C{pod} failed: kept on the pod and in the request's record, and
        counted by outlier detection.
        """
        pod.failed(why)
        core = self.core
        core.outliers.failed(pod, why, core.store.server_pods(self.match.server))
        self._tried(pod, why)

    def _tried(self, pod: PodEndpoint, why: str) -> None:
        """An attempt on C{pod} did not serve the request: kept in its record."""
        ctx = self.ctx
        if ctx.failed_attempts is None:
            ctx.failed_attempts = []
        ctx.failed_attempts.append((pod.name, why))

    def _all_failed(self, last: ProxyError) -> ProxyError:
        """Kthena's answer when every attempt failed, with what the last one said."""
        attempts = self.ctx.failed_attempts or []
        reason = attempts[-1][1] if attempts else last.message
        return ProxyError(
            503,
            ErrorType.PROXY,
            f"request to all pods failed: {self.ctx.attempts} attempts, the last: {reason}",
        )

    async def _read_small(self, response: IResponse) -> IResponse:
        """The response with its (small, error) body read, to look at before relaying."""
        collector = BodyCollector(SMALL_BODY)
        response.deliverBody(collector)
        try:
            body = await collector.done
        except Exception:
            body = b""
        return BufferedResponse(response, body)

    def _does_not_serve(self, response: IResponse) -> bool:
        """A pod's 404 that names the model asked of it: it does not serve that model."""
        body = response.body if isinstance(response, BufferedResponse) else b""
        model = self.match.upstream_model(self.ctx.model or "")
        return model.encode("utf-8", "surrogatepass") in body

    def _acquire(self, pod: PodEndpoint) -> None:
        pod.in_flight += 1
        self.core.metrics.upstream_started(self.ctx)

    def _release(self, pod: PodEndpoint) -> None:
        pod.in_flight -= 1
        pod.state.finished += 1
        self.core.metrics.upstream_ended(self.ctx)

    def _send(self, pod: PodEndpoint, timeout: float | None) -> Deferred[IResponse]:
        request = self.request
        d = self.core.upstream.request(
            pod, self.match.server.protocol, request.method, request.uri, self.headers, self.body
        )
        d.addErrback(self._if_cancelled)
        if timeout:
            d.addTimeout(timeout, self.core.reactor, onTimeoutCancel=_timed_out)
        return d

    def _if_cancelled(self, failure: Failure) -> Failure:
        # Agent fails a cancelled request with ResponseNeverReceived, not CancelledError:
        # without this the attempt loop would take it for a pod failure (and retry).
        if self.cancelled:
            raise CancelledError()
        return failure

    # -- the response

    async def _relay(self, pod: PodEndpoint, response: IResponse) -> None:
        ctx = self.ctx
        request = self.request
        core = self.core
        ctx.first_byte = core.reactor.seconds()
        ctx.status = response.code
        if response.code >= 400:
            ctx.error_type = ErrorType.UPSTREAM
            ctx.error_message = f"pod answered {response.code}"
        content_type = response.headers.getRawHeaders(b"content-type", [b""])[0]
        sse = content_type.startswith(b"text/event-stream")
        skip = STREAM_SKIP if sse else HOP_BY_HOP
        request.setResponseCode(response.code, response.phrase)
        out = request.responseHeaders
        for name, values in forwardable(response.headers, skip):
            out.setRawHeaders(name, values)
        out.setRawHeaders(b"x-request-id", [ctx.request_id.encode()])
        # A JSON body of unknown length may be cut by a close that looks like its end.
        hold = response.length is UNKNOWN_LENGTH and content_type.startswith(b"application/json")
        relay = Relay(
            request, core.reactor, core.config.upstream.idle_timeout, sse, self.hide_usage, hold
        )
        self.relay = relay
        if sse:
            request.write(b"")  # the headers go now: the stream has begun, as for the pod
        response.deliverBody(relay)
        cut: Failure | None = None
        try:
            await relay.done
        except CancelledError:
            raise
        except Exception:
            cut = Failure()
        finally:
            ctx.upstream_ended = core.reactor.seconds()
        usage = relay.usage
        if usage is not None:
            ctx.prompt_tokens = _count(usage.get("prompt_tokens"))
            ctx.completion_tokens = _count(usage.get("completion_tokens"))
        if self.client_gone:
            return
        request.unregisterProducer()
        if cut is None:
            if response.code < 500:
                core.outliers.succeeded(pod)
            request.finish()
            return
        self._interrupted(pod, relay, cut, sse)

    def _interrupted(self, pod: PodEndpoint, relay: Relay, cut: Failure, sse: bool) -> None:
        """The body broke after the headers went out: tell the client it is incomplete."""
        ctx = self.ctx
        if relay.idle_expired:
            error = ProxyError(
                504,
                ErrorType.TIMEOUT,
                "the pod stopped sending mid-response "
                f"for {self.core.config.upstream.idle_timeout}s",
            )
        else:
            error = ProxyError(
                502,
                ErrorType.STREAM_INTERRUPTED,
                f"the pod's response was cut: {describe(cut.value)}",
            )
        ctx.error_type = error.error_type
        ctx.error_message = error.message
        self._failed(pod, error.message)
        if sse:
            self._error_event(error)
        elif not self.request.startedWriting:
            # Nothing reached the client yet: it can still get a proper error.
            self.request.responseHeaders.removeHeader(b"content-length")
            self._answer_error(error)
        else:
            # A plain body cannot say it is incomplete: drop the connection instead.
            self._abort_client()

    def _cut_by_shutdown(self) -> None:
        error = ProxyError(503, ErrorType.DRAINING, "the router shut down mid-response")
        if not self.request.startedWriting:
            self._answer_error(error)
            return
        self.ctx.error_type = error.error_type
        self.ctx.error_message = error.message
        if self.relay is not None and self.relay.sse:
            self._error_event(error)
        else:
            self._abort_client()

    def _error_event(self, error: ProxyError) -> None:
        """End a stream with an error event; OpenAI clients raise on it. No [DONE]."""
        body = error_object(error.status, error.error_type, error.message)
        self.request.write(b"data: " + json_bytes(body) + b"\n\n")
        self.request.finish()

    def _answer_error(self, error: ProxyError) -> None:
        ctx = self.ctx
        ctx.fail(error.status, error.error_type, error.message)
        if self.client_gone:
            return
        self.request.setHeader(b"x-request-id", ctx.request_id.encode())
        self.request.write(respond_error(self.request, error))
        self.request.finish()

    def _abort_client(self) -> None:
        channel = self.request.channel
        if channel is not None and channel.transport is not None:
            channel.transport.abortConnection()  # type: ignore[attr-defined]

    # -- endings

    def _client_lost(self, reason: Failure) -> None:
        self.client_gone = True
        self.ctx.error_type = ErrorType.CLIENT_DISCONNECT
        self.ctx.error_message = "the client closed the connection"
        self.cancel()

    def _crashed(self, failure: Failure) -> None:
        if self.relay is not None and not self.client_gone:
            self.request.unregisterProducer()
        if failure.check(CancelledError):
            if not self.client_gone:  # shutdown cut the call
                self._cut_by_shutdown()
            return
        log.failure("proxying {request_id} failed", failure, request_id=self.ctx.request_id)
        if self.client_gone:
            return
        if self.request.startedWriting:
            self.ctx.fail(self.ctx.status or 502, ErrorType.PROXY, failure.getErrorMessage())
            self._abort_client()
        else:
            self._answer_error(ProxyError(500, ErrorType.PROXY, "internal router error"))

    def _ended(self, result: object) -> None:
        ctx = self.ctx
        ctx.finished = self.core.reactor.seconds()
        if not ctx.status:
            ctx.status = 499 if self.client_gone else 502
        self.core.call_ended(self)
        self.core.metrics.request_ended(ctx)
        self.core.request_done(ctx)


def _timed_out(result: object, timeout: float) -> NoReturn:
    # A cancelled Agent request fails with ResponseNeverReceived, not CancelledError, so
    # addTimeout's default translation would miss it and the timeout would look like a 503.
    raise TimeoutError(timeout, "Deferred")


def _count(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None
