"""
The drain (the data plane's stop, then the upstream's, as the router's tree has them):
refuse new requests, wait for those in flight, cut the rest, close the pool.
"""

from __future__ import annotations

import json

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from kthena.errors import ErrorType
from tests.unit.proxyfixtures import RouterHarness, sse_response

COMPLETION = {"id": "c", "choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 1}}
TIMEOUT = 30.0


class Drain:
    """A stop of the harness's tree in progress (the drain), and what it cut."""

    def __init__(self, h: RouterHarness) -> None:
        self.h = h
        self.results: list[object] = []
        self.failures: list[Failure] = []
        h.tree.startService()
        self.deferred = h.tree.stopService()
        self.deferred.addCallbacks(self.results.append, self.failures.append)

    @property
    def done(self) -> bool:
        assert self.failures == [], self.failures
        return bool(self.results)

    @property
    def cut(self) -> int | None:
        assert self.done
        return self.h.plane.cut


def timers_at(h: RouterHarness, when: float) -> int:
    return sum(1 for c in h.clock.getDelayedCalls() if abs(c.getTime() - when) < 1e-9)


def test_returns_at_once_without_calls() -> None:
    h = RouterHarness()
    drain = Drain(h)
    assert drain.cut == 0
    assert h.plane.readiness.draining
    assert h.upstream.closed == 1
    assert h.clock.getDelayedCalls() == []


def test_waits_for_calls_to_end() -> None:
    h = RouterHarness()
    clients = [h.chat(), h.chat()]
    assert len(h.plane.inflight) == 2
    drain = Drain(h)
    assert not drain.done
    assert h.upstream.closed == 0
    # New requests are refused meanwhile.
    refused = h.chat().got()
    assert refused.status == 503
    assert refused.json()["error"]["code"] == ErrorType.DRAINING.value
    h.upstream.calls[0].respond_json(COMPLETION)
    h.clock.advance(1)
    assert not drain.done
    h.upstream.calls[1].respond_json(COMPLETION)
    assert drain.cut == 0
    assert h.upstream.closed == 1
    assert [c.got().status for c in clients] == [200, 200]
    # The drain's timer is gone with it.
    assert timers_at(h, TIMEOUT) == 0


def test_cuts_calls_left_after_the_timeout() -> None:
    h = RouterHarness()
    waiting = h.chat()
    streaming = h.chat(stream=True)
    finished = h.chat()
    response = h.upstream.calls[1].answer(sse_response())
    response.send(b'data: {"choices":[]}\n\n')
    h.upstream.calls[2].respond_json(COMPLETION)
    drain = Drain(h)
    h.clock.advance(TIMEOUT - 0.01)
    assert not drain.done
    assert h.upstream.closed == 0
    h.clock.advance(0.01)
    assert drain.cut == 2
    assert h.upstream.closed == 1
    assert h.plane.inflight.records() == []
    # Before its headers: the pod request is cancelled and the client told why.
    assert h.upstream.calls[0].cancelled
    answer = waiting.got()
    assert answer.status == 503
    assert answer.json()["error"]["code"] == ErrorType.DRAINING.value
    # Mid-stream: the pod's body is stopped and the stream ends with an error event.
    assert response.transport.stopped == 1
    assert not streaming.aborted
    cut = streaming.got()
    assert cut.complete
    assert cut.body.endswith(b"\n\n") and b'"code":"draining"' in cut.body
    assert finished.got().status == 200
    assert all(v == 0 for v in h.in_flight().values())
    by_id = {c.request_id: c for c in h.contexts}
    assert len(by_id) == 3
    errors = sorted(c.error_type.value for c in h.contexts)
    assert errors == sorted(
        [ErrorType.DRAINING.value, ErrorType.DRAINING.value, ErrorType.SUCCESS.value]
    )


def test_cut_call_is_not_retried_on_another_pod() -> None:
    h = RouterHarness({"retry": {"attempts": 2, "retryInterval": "0s"}}, drainTimeout="1s")
    client = h.chat()
    drain = Drain(h)
    h.clock.advance(1)
    assert drain.cut == 1
    assert len(h.upstream.calls) == 1
    assert h.upstream.calls[0].cancelled
    answer = client.got()
    assert answer.status == 503
    assert answer.json()["error"]["code"] == ErrorType.DRAINING.value
    assert h.context.error_type is ErrorType.DRAINING
    assert h.plane.inflight.records() == []


def test_closes_the_upstream_pool_after_cutting() -> None:
    h = RouterHarness(drainTimeout="1s")
    h.chat()
    order: list[str] = []
    close = h.upstream.close

    def closing() -> Deferred[None]:
        order.append(f"close with {len(h.plane.inflight)} calls")
        return close()

    h.upstream.close = closing  # type: ignore[method-assign]
    drain = Drain(h)
    h.clock.advance(1)
    assert drain.cut == 1
    assert order == ["close with 0 calls"]


def test_cut_call_whose_pod_sent_no_byte_yet_and_ends_later() -> None:
    h = RouterHarness(drainTimeout="1s")
    client = h.chat(stream=True)
    response = h.upstream.last.answer(sse_response())
    drain = Drain(h)
    h.clock.advance(1)
    assert drain.cut == 1
    assert response.transport.stopped == 1
    # The stream had begun (its headers go out at once): it ends with an error event.
    answer = client.got()
    assert answer.status == 200
    assert answer.complete
    (line,) = answer.body.decode().strip().splitlines()
    assert json.loads(line.removeprefix("data: "))["error"]["code"] == ErrorType.DRAINING.value
    # The pod's body then ends: nothing more is written or recorded.
    written = client.transport.value()
    response.send(b"data: late\n\n")
    response.end()
    assert client.transport.value() == written
    assert len(h.contexts) == 1
    assert h.context.error_type is ErrorType.DRAINING
    assert json.dumps(h.in_flight()) == json.dumps({"p0": 0, "p1": 0, "q0": 0})
