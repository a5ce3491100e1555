"""
The pipeline settles every request exactly once, whatever happens in whichever stage: an
error answer, a bug (an exception), the client leaving, a shutdown cutting the request, a
timeout. "Settled once" is checked where it shows: one record reaches the observers,
C{kthena_router_requests_total} counts one, no request stays in flight and no pod keeps
a slot, and the client gets one answer (or a dropped connection once the head went out).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, cast

import pytest
from twisted.internet.defer import Deferred

from kthena.errors import ErrorType, ProxyError
from kthena.pipeline import parse
from kthena.pipeline import pipeline as pipeline_module
from kthena.record import RequestRecord
from tests.unit.proxyfixtures import RouterHarness, sse_response
from tests.unit.samples import sample_sum
from tests.unit.test_proxy_resource import COMPLETION, DONE, assert_error, delta, event

REQUESTS = "kthena_router_requests_total"


class StageBugError(Exception):
    """The bug a stage was given."""


def requests_counted(h: RouterHarness) -> float:
    return sample_sum(h.metrics.registry, REQUESTS)


def assert_settled_once(h: RouterHarness, status: int, error_type: ErrorType) -> RequestRecord:
    assert len(h.contexts) == 1, h.contexts
    record = h.contexts[0]
    assert (record.status, record.error_type) == (status, error_type)
    assert record.finished is not None
    assert requests_counted(h) == 1
    assert len(h.plane.inflight) == 0
    assert all(v == 0 for v in h.in_flight().values()), h.in_flight()
    return record


def _raise(error: Exception) -> Callable[..., Any]:
    def stage(*args: object, **kwargs: object) -> Any:
        raise error

    return stage


def _async_raise(error: Exception) -> Callable[..., Any]:
    async def stage(*args: object, **kwargs: object) -> Any:
        raise error

    return stage


STAGES: dict[str, Callable[[RouterHarness, pytest.MonkeyPatch, Exception], None]] = {
    "parse": lambda h, mp, e: mp.setattr(parse, "parse", _raise(e)),
    "identify": lambda h, mp, e: mp.setattr(h.plane.pipeline.identification, "identify", _raise(e)),
    "route": lambda h, mp, e: mp.setattr(h.plane.pipeline.routing, "route", _raise(e)),
    "admit": lambda h, mp, e: mp.setattr(h.plane.pipeline.admission, "admit", _async_raise(e)),
    "schedule": lambda h, mp, e: mp.setattr(h.plane.pipeline.scheduling, "schedule", _raise(e)),
    "outgoing": lambda h, mp, e: mp.setattr(pipeline_module, "outgoing", _raise(e)),
    "dispatch": lambda h, mp, e: mp.setattr(
        h.plane.pipeline.dispatcher, "dispatch", _async_raise(e)
    ),
}


@pytest.mark.parametrize("stage", list(STAGES))
def test_a_bug_in_a_stage_is_one_500_settled_once(
    stage: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    h = RouterHarness()
    STAGES[stage](h, monkeypatch, StageBugError(f"bug in {stage}"))
    client = h.chat()
    error = assert_error(client.got(), 500, ErrorType.INTERNAL)
    record = assert_settled_once(h, 500, ErrorType.INTERNAL)
    # The client is told where to look, not what broke.
    assert record.request_id in error["message"]
    assert "StageBugError" not in error["message"]
    assert h.upstream.calls == []
    assert h.plane.pipeline.internal_errors.count == 1


@pytest.mark.parametrize("stage", list(STAGES))
def test_an_error_answer_from_a_stage_is_settled_once(
    stage: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    h = RouterHarness()
    refusal = ProxyError(429, ErrorType.RATE_LIMIT, f"{stage} says no")
    STAGES[stage](h, monkeypatch, refusal)
    client = h.chat()
    error = assert_error(client.got(), 429, ErrorType.RATE_LIMIT)
    assert error["message"] == f"{stage} says no"
    assert_settled_once(h, 429, ErrorType.RATE_LIMIT)
    assert h.plane.pipeline.internal_errors.count == 0


def test_a_bug_in_the_relay_after_the_head_drops_the_connection_settled_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    h = RouterHarness()
    # Told once the body went out whole, before the response is finished.
    monkeypatch.setattr(h.plane.outliers, "succeeded", _raise(StageBugError("bug in relay")))
    client = h.chat()
    body = json.dumps(COMPLETION).encode()
    h.upstream.last.respond_json(COMPLETION)
    assert client.aborted
    wire = client.got()  # the head had gone: no other status can follow
    assert (wire.status, wire.body) == (200, body)
    assert_settled_once(h, 200, ErrorType.INTERNAL)
    assert h.plane.pipeline.internal_errors.count == 1


# -- the request stopped from outside, while a stage waits


class HeldAdmission:
    """An admit stage that waits (as the fairness queue will) until the test lets go."""

    def __init__(self) -> None:
        self.waiting: list[Deferred[None]] = []

    async def admit(self, record: RequestRecord, parsed: object) -> None:
        d: Deferred[None] = Deferred()
        self.waiting.append(d)
        await d


def test_the_client_leaving_during_admit_is_settled_once() -> None:
    h = RouterHarness()
    h.plane.pipeline.admission = held = HeldAdmission()  # type: ignore[assignment]
    client = h.chat()
    assert len(held.waiting) == 1 and len(h.plane.inflight) == 1
    client.disconnect()
    assert held.waiting[0].called  # the wait was cancelled
    assert_settled_once(h, 499, ErrorType.CLIENT_DISCONNECT)
    assert h.upstream.calls == []
    assert h.plane.pipeline.internal_errors.count == 0


def test_a_shutdown_during_admit_is_settled_once() -> None:
    h = RouterHarness()
    h.plane.pipeline.admission = held = HeldAdmission()  # type: ignore[assignment]
    h.tree.startService()
    client = h.chat()
    stopped = h.tree.stopService()
    h.clock.advance(h.config.drain_timeout)
    assert stopped.called
    assert held.waiting[0].called
    assert_error(client.got(), 503, ErrorType.DRAINING)
    assert_settled_once(h, 503, ErrorType.DRAINING)
    assert h.upstream.calls == []


def test_a_request_after_the_drain_began_is_settled_once() -> None:
    h = RouterHarness()
    h.tree.startService()
    busy = h.chat()
    h.tree.stopService()
    late = h.chat()
    assert_error(late.got(), 503, ErrorType.DRAINING)
    assert len(h.contexts) == 1 and h.contexts[0].status == 503
    h.upstream.calls[0].respond_json(COMPLETION)
    assert busy.got().status == 200
    assert sorted(r.status for r in h.contexts) == [200, 503]
    assert requests_counted(h) == 2


def test_a_shutdown_mid_stream_is_settled_once() -> None:
    h = RouterHarness()
    h.tree.startService()
    client = h.chat(stream=True)
    response = h.upstream.last.answer(sse_response())
    response.send(event(delta("partial")))
    stopped = h.tree.stopService()
    h.clock.advance(h.config.drain_timeout)
    assert stopped.called
    wire = client.got()
    assert wire.status == 200
    assert '"code": "draining"' in wire.body.decode() or "draining" in wire.events()[-1]
    assert_settled_once(h, 200, ErrorType.DRAINING)


def test_the_client_leaving_mid_stream_is_settled_once() -> None:
    h = RouterHarness()
    client = h.chat(stream=True)
    response = h.upstream.last.answer(sse_response())
    response.send(event(delta("partial")))
    client.disconnect()
    assert_settled_once(h, 200, ErrorType.CLIENT_DISCONNECT)
    # The pod's late bytes and end change nothing.
    response.send(event(delta("late")) + DONE)
    response.end()
    assert len(h.contexts) == 1 and requests_counted(h) == 1


def test_a_timeout_waiting_for_the_pod_is_settled_once() -> None:
    h = RouterHarness({"timeout": "2s"})
    client = h.chat()
    h.clock.advance(2)
    assert_error(client.got(), 504, ErrorType.TIMEOUT)
    assert_settled_once(h, 504, ErrorType.TIMEOUT)
    client.disconnect()  # the client leaving after its answer is not a second end
    assert len(h.contexts) == 1 and requests_counted(h) == 1


def test_an_observer_that_raises_does_not_unsettle_the_request() -> None:
    h = RouterHarness()

    class Broken:
        def __getattr__(self, name: str) -> Callable[[RequestRecord], None]:
            return _raise(StageBugError(name))

    h.plane.observers.add(Broken(), first=True)  # type: ignore[arg-type]
    client = h.chat()
    h.upstream.last.respond_json(COMPLETION)
    assert client.got().status == 200
    assert_settled_once(h, 200, ErrorType.SUCCESS)


def test_a_relayed_stream_holds_no_copy_of_the_request_body() -> None:
    """A stream lasts minutes: once its answer is relayed (no other attempt can be made)
    the request's bytes are let go, as the exchange let go of them once parsed."""
    h = RouterHarness()
    h.chat(stream=True)
    sent = h.upstream.last.body
    assert sent is not None and b'"messages"' in sent
    response = h.upstream.last.answer(sse_response())
    response.send(event(delta("partial")))
    (running,) = h.plane.pipeline.inflight._running.values()
    run = cast(pipeline_module._Run, running)
    assert run.exchange.body() == b""
    assert run.call is not None and run.call.outgoing.body == b""
    assert run.call.outgoing.hide_usage  # the rest of what the relay reads is kept
