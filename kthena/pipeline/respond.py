"""
Stage 7, relay: the chosen answer to the client, as it comes. Its head first (hop-by-hop
headers out; for streams C{Content-Length} too, since the router may drop the usage
chunk), then the body through L{Relay} (backpressure, whole SSE events, the usage); the
pod's C{usage} is recorded. A body that breaks after the head went out ends with an
error event (streams) or a dropped connection (plain bodies).
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.defer import CancelledError
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure
from twisted.web.iweb import UNKNOWN_LENGTH, IResponse

from kthena.errors import ErrorType, ProxyError
from kthena.failures import describe
from kthena.pipeline.answers import end_with_error
from kthena.pipeline.call import Call
from kthena.pipeline.headers import HOP_BY_HOP, STREAM_SKIP, forwardable
from kthena.pipeline.relay import Relay
from kthena.pods import PodEndpoint


async def relay_response(
    call: Call,
    pod: PodEndpoint,
    response: IResponse,
    clock: IReactorTime,
    idle_timeout: float,
    failed: Callable[[Call, PodEndpoint, str], None],
    succeeded: Callable[[PodEndpoint], None],
) -> None:
    """
    Relay C{response} from C{pod}; returns when the response ended, whole or cut.

    @param failed: told when the body broke (the pod's attempt failed).
    @param succeeded: told when a non-5xx answer was relayed whole.
    """
    record = call.record
    exchange = call.exchange
    record.first_byte = clock.seconds()
    record.status = response.code
    if response.code >= 400:
        record.error_type = ErrorType.UPSTREAM
        record.error_message = f"pod answered {response.code}"
    content_type = response.headers.getRawHeaders(b"content-type", [b""])[0]
    sse = content_type.startswith(b"text/event-stream")
    headers = forwardable(response.headers, STREAM_SKIP if sse else HOP_BY_HOP)
    headers.append((b"x-request-id", [record.request_id.encode()]))
    exchange.begin(response.code, response.phrase, headers)
    # A JSON body of unknown length may be cut by a close that looks like its end.
    hold = response.length is UNKNOWN_LENGTH and content_type.startswith(b"application/json")
    relay = Relay(exchange, clock, idle_timeout, sse, call.outgoing.hide_usage, hold)
    call.relay = relay
    if sse:
        exchange.write(b"")  # the head goes now: the stream has begun, as for the pod
    response.deliverBody(relay)
    cut: Failure | None = None
    try:
        await relay.done
    except CancelledError:
        raise
    except Exception:
        cut = Failure()
    finally:
        record.upstream_ended = clock.seconds()
    record.streamed_deltas = relay.deltas
    usage = relay.usage
    if usage is not None:
        record.prompt_tokens = _count(usage.get("prompt_tokens"))
        record.completion_tokens = _count(usage.get("completion_tokens"))
    if call.client_gone:
        return
    exchange.unregister_producer()
    if cut is None:
        if response.code < 500:
            succeeded(pod)
        exchange.finish()
        return
    error = _interruption(relay, cut, idle_timeout)
    failed(call, pod, error.message)
    end_with_error(exchange, record, error, sse)


def _interruption(relay: Relay, cut: Failure, idle_timeout: float) -> ProxyError:
    if relay.idle_expired:
        return ProxyError(
            504, ErrorType.TIMEOUT, f"the pod stopped sending mid-response for {idle_timeout}s"
        )
    return ProxyError(
        502, ErrorType.STREAM_INTERRUPTED, f"the pod's response was cut: {describe(cut.value)}"
    )


def _count(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None
