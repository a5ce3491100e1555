"""
A ModelRoute's token and request limits through the pipeline, on the local buckets and a
Clock: Kthena's e2e cases (an input limit of 30 a minute with 10-token requests: three
pass, then 429 until the window refills; output limits; a limit removed by a route
update), our request limits and per-user limits, the settle (output debt, input
reconciled with the pod's count, the estimate back when no pod took the request), and
how a refusal is answered, counted and recorded.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.error import ConnectionLost
from twisted.python.failure import Failure
from twisted.web.client import ResponseFailed

from kthena.errors import ErrorType
from tests.unit.proxyfixtures import (
    BASE_MODEL,
    EMPTY_MODEL,
    Client,
    RouterHarness,
    WireResponse,
    sse_response,
)
from tests.unit.samples import sample_sum
from tests.unit.test_proxy_resource import COMPLETION, DONE, USAGE_ONLY, delta, event

TEN_TOKENS = [{"role": "user", "content": "hello world"}]
"""Kthena's estimate of this chat is 10 tokens (ChatML, four characters a token)."""

EXCEEDED = "kthena_router_rate_limit_exceeded_total"


def send(h: RouterHarness, **body: Any) -> Client:
    """A 10-token chat; a pod that got it answers with C{COMPLETION} (9 in, 3 out)."""
    sent = len(h.upstream.calls)
    client = h.chat(messages=TEN_TOKENS, **body)
    if len(h.upstream.calls) > sent:
        h.upstream.last.respond_json(COMPLETION)
    return client


def assert_refused(wire: WireResponse) -> dict[str, Any]:
    """A 429 with OpenAI's error object (C{code: rate_limit_exceeded})."""
    assert wire.status == 429, wire
    assert wire.header("content-type") == "application/json"
    error: dict[str, Any] = wire.json()["error"]
    assert (error["type"], error["code"]) == ("rate_limit_error", "rate_limit_exceeded")
    return error


def exceeded(h: RouterHarness, limit_type: str) -> float:
    return (
        h.metrics.registry.get_sample_value(
            EXCEEDED,
            {"model": BASE_MODEL, "limit_type": limit_type, "path": "/v1/chat/completions"},
        )
        or 0.0
    )


def test_kthenas_input_limit_three_pass_then_429_until_the_window_refills() -> None:
    h = RouterHarness(rate_limit={"inputTokensPerUnit": 30, "unit": "minute"})
    for _ in range(3):
        assert send(h).got().status == 200
    refused = send(h).got()
    error = assert_refused(refused)
    assert error == {
        "message": "the input-token limit of route default/m (30 per minute) is exceeded; "
        "it allows this request in 14s",
        "type": "rate_limit_error",
        "code": "rate_limit_exceeded",
    }
    # The pods counted 9 prompt tokens for each 10 estimated: one back each, 3 in all,
    # so 7 more are needed, at one every 2 s.
    assert refused.header("retry-after") == "14"
    assert len(h.upstream.calls) == 3  # the refused one never reached a pod
    h.clock.advance(13.9)
    assert send(h).got().status == 429
    h.clock.advance(0.1)
    assert send(h).got().status == 200
    assert exceeded(h, "input_tokens") == 2
    records = [r for r in h.contexts if r.status == 429]
    assert [(r.error_type, r.limit_type) for r in records] == [
        (ErrorType.RATE_LIMIT, "input_tokens")
    ] * 2
    assert "input-token limit" in (records[0].error_message or "")


def test_requests_total_counts_a_refusal_as_rate_limit() -> None:
    h = RouterHarness(rate_limit={"requestsPerUnit": 1, "unit": "hour"})
    send(h)
    send(h)
    value = sample_sum(h.metrics.registry, "kthena_router_requests_total")
    assert value == 2
    assert (
        h.metrics.registry.get_sample_value(
            "kthena_router_requests_total",
            {
                "model": BASE_MODEL,
                "path": "/v1/chat/completions",
                "status_code": "429",
                "error_type": "rate_limit",
            },
        )
        == 1
    )
    assert exceeded(h, "requests") == 1


def test_output_limit_needs_one_token_and_charges_what_was_used() -> None:
    h = RouterHarness(rate_limit={"outputTokensPerUnit": 5, "unit": "minute"})
    assert send(h).got().status == 200  # 3 used: 2 left
    assert send(h).got().status == 200  # 3 more: 1 in debt
    refused = send(h).got()
    assert_refused(refused)
    assert refused.header("retry-after") == "24"  # 2 tokens at one every 12 s
    assert exceeded(h, "output_tokens") == 1
    h.clock.advance(24)
    assert send(h).got().status == 200


def test_a_limit_no_request_can_meet_says_so_without_retry_after() -> None:
    h = RouterHarness(rate_limit={"inputTokensPerUnit": 5, "unit": "minute"})
    refused = send(h).got()
    error = assert_refused(refused)
    assert "below the 10 input tokens this request needs" in error["message"]
    assert refused.header("retry-after") is None


def test_the_estimate_comes_back_when_no_pod_took_the_request() -> None:
    h = RouterHarness(rate_limit={"inputTokensPerUnit": 10, "unit": "hour"})
    for _ in range(3):  # a server without pods: 503, nothing used
        client = h.chat(model=EMPTY_MODEL, messages=TEN_TOKENS)
        assert client.got().status == 503
    bucket = h.limits.limiter.routes["default/lonely"].buckets(None)[0].spec
    assert h.limits.local.level(bucket) == 10


def test_a_route_update_applies_at_once_and_a_removed_limit_stops_refusing() -> None:
    h = RouterHarness(rate_limit={"requestsPerUnit": 1, "unit": "hour"})
    assert send(h).got().status == 200
    assert send(h).got().status == 429
    h.reload(RouterHarness(rate_limit={"requestsPerUnit": 3, "unit": "minute"}).config)
    h.clock.advance(20)  # one request back at the new rate
    assert send(h).got().status == 200
    assert send(h).got().status == 429
    h.reload(RouterHarness().config)  # Kthena keeps the old limiter here; we do not
    assert [send(h).got().status for _ in range(5)] == [200] * 5


def test_per_user_limits_apply_to_each_caller_alongside_the_routes() -> None:
    h = RouterHarness(
        rate_limit={"requestsPerUnit": 100, "unit": "minute", "perUser": {"requestsPerUnit": 2}}
    )
    assert [send(h).got().status for _ in range(3)] == [200, 200, 429]
    refused = h.contexts[-1]
    assert refused.limit_type == "requests"
    assert "per-user request limit of route default/m (2 per minute)" in (
        refused.error_message or ""
    )
    # The route's own bucket took only what passed.
    route_bucket = h.limits.limiter.routes["default/m"].buckets(None)[0].spec
    assert h.limits.local.level(route_bucket) == 98


def test_an_unlimited_route_is_not_checked() -> None:
    h = RouterHarness(rate_limit={"requestsPerUnit": 1, "unit": "hour"})
    client = h.post("/v1/chat/completions", {"model": "plain", "messages": TEN_TOKENS})
    h.upstream.last.respond_json(COMPLETION)
    assert client.got().status == 200
    assert len(h.limits.local) == 0


def test_a_stream_cut_before_its_usage_charges_what_it_generated() -> None:
    h = RouterHarness(rate_limit={"outputTokensPerUnit": 10, "unit": "hour"})
    client = h.chat(messages=TEN_TOKENS, stream=True)
    response = h.upstream.last.answer(sse_response())
    response.send(b"".join(event(delta(t)) for t in ("a", "b", "c", "d")))
    response.end(Failure(ResponseFailed([Failure(ConnectionLost())])))
    assert client.got().status == 200
    bucket = h.limits.limiter.routes["default/m"].buckets(None)[0].spec
    assert h.limits.local.level(bucket) == 6


def test_a_stream_with_usage_charges_the_pods_count() -> None:
    h = RouterHarness(rate_limit={"outputTokensPerUnit": 10, "unit": "hour"})
    h.chat(messages=TEN_TOKENS, stream=True)
    response = h.upstream.last.answer(sse_response())
    response.send(event(delta("a")) + event(USAGE_ONLY) + DONE)
    response.end()
    bucket = h.limits.limiter.routes["default/m"].buckets(None)[0].spec
    assert h.limits.local.level(bucket) == 8  # the usage says 2


def test_the_state_shows_each_bucket_with_its_level_and_debt() -> None:
    h = RouterHarness(
        rate_limit={"outputTokensPerUnit": 2, "requestsPerUnit": 10, "unit": "minute",
                    "perUser": {"requestsPerUnit": 5}}
    )  # fmt: skip
    send(h)  # 3 output tokens used: 1 in debt
    states: list[Any] = []
    h.limits.state().addCallback(states.append)
    (state,) = states
    assert state["fail_open"] is True
    assert state["backends"] == [{"backend": "local", "buckets": 3}]
    route = next(r for r in state["routes"] if r["route"] == "default/m")
    assert route["backend"] == "local"
    assert route["per_user"] == {
        "unit": "minute",
        "input_tokens_per_unit": None,
        "output_tokens_per_unit": None,
        "requests_per_unit": 5,
    }
    assert route["buckets"] == [
        {"kind": "output", "key": "kthena:ratelimit:m:output", "capacity": 2,
         "refill_per_second": round(2 / 60, 6), "level": -1.0, "debt": 1.0},
        {"kind": "requests", "key": "kthena:ratelimit:m:requests", "capacity": 10,
         "refill_per_second": round(10 / 60, 6), "level": 9.0, "debt": 0.0},
    ]  # fmt: skip
