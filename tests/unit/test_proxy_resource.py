"""
The proxy resource and calls, end to end in memory: a client over the real HTTPChannel,
the router's core on a MemoryReactorClock, and pods answered by hand.
"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from twisted.internet.error import ConnectionLost, ConnectionRefusedError, DNSLookupError
from twisted.python.failure import Failure
from twisted.web.client import ResponseFailed, ResponseNeverReceived
from twisted.web.http import PotentialDataLoss

from kthena.errors import ErrorType
from tests.unit.proxyfixtures import (
    BASE_MODEL,
    CLIENT_IP,
    EMPTY_MODEL,
    LORA,
    PLAIN_MODEL,
    UPSTREAM_MODEL,
    Client,
    FakeResponse,
    RouterHarness,
    WireResponse,
    json_response,
    sse_response,
)

COMPLETION = {
    "id": "cmpl-1",
    "object": "chat.completion",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "hello"}}],
    "usage": {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12},
}
HEX32 = re.compile(r"^[0-9a-f]{32}$")


def event(value: object) -> bytes:
    return b"data: " + json.dumps(value, separators=(",", ":")).encode() + b"\n\n"


def delta(text: str) -> dict[str, Any]:
    return {"id": "c", "choices": [{"index": 0, "delta": {"content": text}}]}


USAGE_ONLY = {"id": "c", "choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 2}}
DONE = b"data: [DONE]\n\n"


def assert_error(response: WireResponse, status: int, code: ErrorType) -> dict[str, Any]:
    assert response.status == status, response
    assert response.header("content-type") == "application/json"
    value = response.json()
    assert set(value) == {"error"}
    error = value["error"]
    assert set(error) == {"message", "type", "code"}
    assert error["code"] == code.value
    assert isinstance(error["message"], str)
    assert error["message"]
    assert isinstance(error["type"], str)
    request_id = response.header("x-request-id")
    assert request_id is not None
    assert HEX32.match(request_id)
    return error  # type: ignore[no-any-return]


# -- requests the router refuses


REFUSALS: list[tuple[str, bytes, int, ErrorType]] = [
    ("invalid-json", b'{"model": ', 400, ErrorType.INVALID_REQUEST),
    ("non-object", b'["model", "m"]', 400, ErrorType.INVALID_REQUEST),
    ("no-model", b'{"prompt": "hi"}', 404, ErrorType.ROUTE_NOT_FOUND),
    ("empty-model", b'{"model": "", "prompt": "hi"}', 404, ErrorType.ROUTE_NOT_FOUND),
    ("model-not-a-string", b'{"model": 7, "prompt": "hi"}', 400, ErrorType.INVALID_REQUEST),
    ("unknown-model", b'{"model": "nope", "prompt": "hi"}', 404, ErrorType.ROUTE_NOT_FOUND),
    ("no-pods", b'{"model": "lonely", "prompt": "hi"}', 503, ErrorType.NO_PODS),
    ("no-prompt", b'{"model": "m", "messages": []}', 400, ErrorType.INVALID_REQUEST),
    ("nothing-to-complete", b'{"model": "m"}', 400, ErrorType.INVALID_REQUEST),
]


@pytest.mark.parametrize(
    ("path", "field"), [("/v1/chat/completions", "messages"), ("/v1/completions", "prompt")]
)
def test_no_prompt_is_400_before_any_pod(path: str, field: str) -> None:
    """Kthena answers 404 `prompt not found`; the OpenAI API (and we) 400."""
    h = RouterHarness()
    error = assert_error(h.post(path, {"model": BASE_MODEL}).got(), 400, ErrorType.INVALID_REQUEST)
    assert error["message"] == f"`{field}` is required"
    assert error["type"] == "invalid_request_error"
    assert h.upstream.calls == []


def test_other_paths_need_no_prompt() -> None:
    h = RouterHarness()
    h.post("/v1/embeddings", {"model": BASE_MODEL, "input": ["a", "b"]})
    assert h.upstream.last.json()["input"] == ["a", "b"]


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [r[1:] for r in REFUSALS],
    ids=[r[0] for r in REFUSALS],
)
def test_refused_requests_get_openai_errors(body: bytes, status: int, code: ErrorType) -> None:
    h = RouterHarness()
    response = h.post("/v1/completions", body).got()
    assert_error(response, status, code)
    assert response.complete
    assert h.upstream.calls == []
    ctx = h.context
    assert (ctx.status, ctx.error_type) == (status, code)
    assert ctx.request_id == response.header("x-request-id")
    assert ctx.finished is not None
    assert ctx.path == "/v1/completions"
    assert ctx.method == "POST"


def test_no_pods_is_recorded_with_the_model_and_match() -> None:
    h = RouterHarness()
    h.post("/v1/completions", {"model": EMPTY_MODEL, "prompt": "x"})
    assert h.context.model == EMPTY_MODEL
    assert h.context.match is not None


def test_scheduler_leaving_no_pod_is_503() -> None:
    h = RouterHarness()
    h.scheduler.refuse = True
    assert_error(h.chat().got(), 503, ErrorType.SCHEDULING)
    assert h.upstream.calls == []
    assert h.context.error_type is ErrorType.SCHEDULING


def test_draining_refuses_with_connection_close() -> None:
    h = RouterHarness()
    h.plane.readiness.draining = True
    response = h.chat().got()
    assert_error(response, 503, ErrorType.DRAINING)
    assert response.header("connection") == "close"
    assert h.upstream.calls == []
    assert h.context.error_type is ErrorType.DRAINING


def test_body_over_the_cap_is_413() -> None:
    h = RouterHarness(maxBodyBytes=64)
    response = h.post("/v1/completions", {"model": BASE_MODEL, "prompt": "x" * 100}).got()
    assert_error(response, 413, ErrorType.TOO_LARGE)
    assert h.upstream.calls == []
    assert (h.context.status, h.context.error_type) == (413, ErrorType.TOO_LARGE)


def test_get_on_an_inference_path_is_405_with_allow() -> None:
    h = RouterHarness()
    response = h.get("/v1/chat/completions").got()
    assert_error(response, 405, ErrorType.METHOD_NOT_ALLOWED)
    assert response.header("allow") == "POST"
    assert (h.context.status, h.context.error_type) == (405, ErrorType.METHOD_NOT_ALLOWED)


def test_post_on_models_is_405_with_allow() -> None:
    h = RouterHarness()
    response = h.post("/v1/models", {}).got()
    assert_error(response, 405, ErrorType.METHOD_NOT_ALLOWED)
    assert response.header("allow") == "GET, HEAD"


def test_unknown_path_is_404() -> None:
    h = RouterHarness()
    response = h.get("/nope").got()
    assert_error(response, 404, ErrorType.NOT_FOUND)
    ctx = h.context
    label = h.metrics.path_label(ctx.path)
    assert (ctx.status, ctx.error_type, label) == (404, ErrorType.NOT_FOUND, "other")


def test_refusal_keeps_the_client_request_id() -> None:
    h = RouterHarness()
    response = h.post("/v1/completions", b"nope", [("X-Request-Id", "abc-123")]).got()
    assert response.status == 400
    assert response.header("x-request-id") == "abc-123"
    assert h.context.request_id == "abc-123"


# -- router-answered endpoints


def test_models_lists_base_models_and_adapters() -> None:
    h = RouterHarness()
    value = h.get("/v1/models").got().json()
    assert value["object"] == "list"
    ids = [m["id"] for m in value["data"]]
    assert ids == sorted([BASE_MODEL, LORA, PLAIN_MODEL, EMPTY_MODEL])
    for model in value["data"]:
        assert set(model) == {"id", "object", "created", "owned_by"}
        assert model["object"] == "model"
        assert isinstance(model["created"], int)
        assert isinstance(model["owned_by"], str)
    by_id = {m["id"]: m for m in value["data"]}
    # The route's creationTimestamp (2025-01-02T03:04:05Z), for the model and its adapter.
    assert by_id[BASE_MODEL]["created"] == by_id[LORA]["created"] == 1735787045
    assert by_id[PLAIN_MODEL]["created"] == h.plane.started_at


def test_healthz() -> None:
    h = RouterHarness()
    response = h.get("/healthz").got()
    assert (response.status, response.json()) == (200, {"message": "ok"})
    h.plane.readiness.draining = True
    assert h.get("/healthz").got().status == 200


def test_readyz_needs_every_model_to_have_a_healthy_pod() -> None:
    h = RouterHarness()  # the model `lonely` routes to a server without pods
    response = h.get("/readyz").got()
    assert response.status == 503
    assert response.json() == {
        "message": "not ready: no healthy pod serves lonely",
        "models_without_healthy_pods": ["lonely"],
    }
    assert h.contexts[-1].status == 503


def test_readyz_with_any_model() -> None:
    h = RouterHarness(readiness="anyModel")
    assert h.get("/readyz").got().status == 200
    h.plane.readiness.scraped = False
    response = h.get("/readyz").got()
    assert response.status == 503
    assert response.json()["message"] == "not ready: the first scrape of the pods is not done"
    h.plane.readiness.scraped = True
    h.plane.readiness.draining = True
    response = h.get("/readyz").got()
    assert (response.status, response.json()) == (503, {"message": "draining"})


# -- a proxied request


def test_json_completion_relayed_with_usage_recorded() -> None:
    h = RouterHarness()
    client = h.chat()
    call = h.upstream.last
    assert (call.pod.name, call.scheme, call.method, call.uri) == (
        "p0",
        "http",
        b"POST",
        b"/v1/chat/completions",
    )
    assert h.in_flight() == {"p0": 1, "p1": 0, "q0": 0}
    assert client.response is None
    sent = call.respond_json(COMPLETION)
    response = client.got()
    assert response.status == 200
    assert response.complete
    assert response.body == sent.body
    assert response.header("content-length") == str(len(sent.body))
    ctx = h.context
    assert (ctx.status, ctx.error_type) == (200, ErrorType.SUCCESS)
    assert (ctx.prompt_tokens, ctx.completion_tokens) == (9, 3)
    assert ctx.pod is h.pod("p0")
    assert (ctx.model, ctx.stream, ctx.attempts) == (BASE_MODEL, False, 1)
    assert ctx.first_byte is not None
    assert h.in_flight() == {"p0": 0, "p1": 0, "q0": 0}
    assert h.plane.inflight.records() == []


def test_model_rewritten_for_a_base_model() -> None:
    h = RouterHarness()
    h.chat(temperature=0.5)
    sent = h.upstream.last.json()
    assert sent == {
        "model": UPSTREAM_MODEL,
        "messages": [{"role": "user", "content": "hi"}],
        "temperature": 0.5,
    }


def test_lora_request_forwarded_byte_identical() -> None:
    h = RouterHarness()
    raw = b'{ "model" : "m-lora",\n "prompt": "caf\\u00e9",  "max_tokens": 3 }'
    h.post("/v1/completions", raw)
    assert h.upstream.last.body == raw
    assert h.upstream.last.pod.name == "p0"


def test_unchanged_body_forwarded_byte_identical() -> None:
    h = RouterHarness()
    raw = b'{"prompt": "x",   "model": "plain", "n": 1.50}'
    h.post("/v1/completions", raw)
    assert h.upstream.last.body == raw
    assert h.upstream.last.pod.name == "q0"


def test_stream_without_usage_gets_it_injected_and_hidden() -> None:
    h = RouterHarness()
    client = h.chat(stream=True)
    sent = h.upstream.last.json()
    assert sent["stream_options"] == {"include_usage": True}
    assert sent["model"] == UPSTREAM_MODEL
    response = h.upstream.last.answer(sse_response())
    response.send(event(delta("he")))
    assert client.got().events() == [json.dumps(delta("he"), separators=(",", ":"))]
    response.send(event(delta("llo")) + event(USAGE_ONLY) + DONE)
    response.end()
    wire = client.got()
    assert wire.complete
    assert wire.body == event(delta("he")) + event(delta("llo")) + DONE
    ctx = h.context
    assert (ctx.stream, ctx.prompt_tokens, ctx.completion_tokens) == (True, 4, 2)
    assert (ctx.status, ctx.error_type) == (200, ErrorType.SUCCESS)


def test_stream_options_of_the_client_kept_when_usage_injected() -> None:
    h = RouterHarness()
    h.chat(stream=True, stream_options={"include_usage": False, "continuous_usage_stats": True})
    assert h.upstream.last.json()["stream_options"] == {
        "include_usage": True,
        "continuous_usage_stats": True,
    }


def test_stream_that_asked_for_usage_forwarded_byte_identical_and_sees_it() -> None:
    h = RouterHarness()
    raw = b'{"model":"plain","stream":true,"stream_options":{"include_usage":true},"prompt":"x"}'
    client = h.post("/v1/completions", raw)
    assert h.upstream.last.body == raw
    response = h.upstream.last.answer(sse_response())
    response.send(event(delta("a")) + event(USAGE_ONLY) + DONE)
    response.end()
    assert client.got().body == event(delta("a")) + event(USAGE_ONLY) + DONE
    assert h.context.completion_tokens == 2


def test_sse_events_reach_the_client_as_they_complete() -> None:
    h = RouterHarness()
    client = h.chat(stream=True)
    response = h.upstream.last.answer(sse_response())
    whole = event(delta("a"))
    response.send(whole[:10])
    head = client.got()  # the headers go out at once; a partial event is held back
    assert (head.status, head.body, head.complete) == (200, b"", False)
    response.send(whole[10:])
    wire = client.got()
    assert (wire.status, wire.body, wire.complete) == (200, whole, False)
    second = event(delta("b"))
    response.send(second)
    assert client.got().body == whole + second


def test_sse_content_length_from_the_pod_dropped() -> None:
    h = RouterHarness()
    client = h.chat(stream=True)
    body = event(delta("a")) + event(USAGE_ONLY) + DONE
    response = h.upstream.last.answer(sse_response(**{"content-length": [str(len(body))]}))
    response.send(body)
    response.end()
    wire = client.got()
    assert wire.header("content-length") is None
    assert wire.values("transfer-encoding") == ["chunked"]
    assert wire.complete
    assert wire.body == event(delta("a")) + DONE


def test_backpressure_reaches_the_pod() -> None:
    h = RouterHarness()
    client = h.chat(stream=True)
    response = h.upstream.last.answer(sse_response())
    producer = client.transport.producer
    assert producer is not None
    producer.pauseProducing()
    assert response.transport.paused == 1
    producer.resumeProducing()
    assert response.transport.resumed == 1


# -- headers


def test_request_headers_forwarded_without_hop_by_hop() -> None:
    h = RouterHarness()
    h.chat(
        headers=[
            ("Connection", "keep-alive, X-Secret"),
            ("Keep-Alive", "timeout=5"),
            ("TE", "trailers"),
            ("Upgrade", "websocket"),
            ("Proxy-Authorization", "Basic eA=="),
            ("Proxy-Connection", "keep-alive"),
            ("Trailer", "X-Sum"),
            ("X-Secret", "1"),
            ("Authorization", "Bearer k"),
            ("X-Custom", "yes"),
        ]
    )
    call = h.upstream.last
    names = {n.lower() for n, _ in call.headers.getAllRawHeaders()}
    for hop in (
        b"connection",
        b"keep-alive",
        b"te",
        b"upgrade",
        b"proxy-authorization",
        b"proxy-connection",
        b"trailer",
        b"x-secret",
        b"host",
        b"content-length",
    ):
        assert hop not in names, hop
    assert call.header("authorization") == ["Bearer k"]
    assert call.header("x-custom") == ["yes"]
    assert call.header("content-type") == ["application/json"]


def test_chunked_upload_transfer_encoding_not_forwarded() -> None:
    h = RouterHarness()
    client = h.client()
    body = json.dumps({"model": BASE_MODEL, "prompt": "x"}).encode()
    chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    client.request("POST", "/v1/completions", chunked, [("Transfer-Encoding", "chunked")])
    call = h.upstream.last
    assert call.header("transfer-encoding") is None
    assert call.json()["model"] == UPSTREAM_MODEL


def test_request_id_generated_sent_upstream_and_returned() -> None:
    h = RouterHarness()
    client = h.chat()
    sent = h.upstream.last.header("x-request-id")
    assert sent is not None
    assert len(sent) == 1
    assert HEX32.match(sent[0])
    h.upstream.last.respond_json(COMPLETION)
    assert client.got().header("x-request-id") == sent[0]
    assert h.context.request_id == sent[0]


def test_request_ids_differ() -> None:
    h = RouterHarness()
    h.chat()
    h.chat()
    ids = [c.header("x-request-id") for c in h.upstream.calls]
    assert ids[0] != ids[1]


def test_client_request_id_kept() -> None:
    h = RouterHarness()
    client = h.chat(headers=[("X-Request-Id", "trace-42")])
    assert h.upstream.last.header("x-request-id") == ["trace-42"]
    h.upstream.last.respond_json(COMPLETION)
    assert client.got().values("x-request-id") == ["trace-42"]


def test_x_forwarded_for_set() -> None:
    h = RouterHarness()
    h.chat()
    assert h.upstream.last.header("x-forwarded-for") == [CLIENT_IP]


def test_x_forwarded_for_appended() -> None:
    h = RouterHarness()
    h.chat(headers=[("X-Forwarded-For", "1.2.3.4")])
    assert h.upstream.last.header("x-forwarded-for") == [f"1.2.3.4, {CLIENT_IP}"]


def test_response_headers_forwarded_without_hop_by_hop() -> None:
    h = RouterHarness()
    client = h.chat()
    body = json.dumps(COMPLETION).encode()
    response = FakeResponse(
        200,
        {
            "content-type": ["application/json"],
            "content-length": [str(len(body))],
            "connection": ["close, X-Hop"],
            "x-hop": ["1"],
            "keep-alive": ["timeout=5"],
            "transfer-encoding": ["chunked"],
            "upgrade": ["h2c"],
            "proxy-authenticate": ["Basic"],
            "trailer": ["X-Sum"],
            "x-upstream": ["kept"],
            "x-request-id": ["from-the-pod"],
        },
        body=body,
    )
    h.upstream.last.respond(response)
    wire = client.got()
    for hop in (
        "connection",
        "x-hop",
        "keep-alive",
        "transfer-encoding",
        "upgrade",
        "proxy-authenticate",
        "trailer",
    ):
        assert wire.values(hop) == [], hop
    assert wire.header("x-upstream") == "kept"
    assert wire.values("x-request-id") == [h.context.request_id]
    assert wire.complete
    assert wire.json() == COMPLETION


# -- retries


def test_connection_refused_moves_to_the_next_candidate() -> None:
    h = RouterHarness()
    client = h.chat()
    h.upstream.calls[0].fail(ConnectionRefusedError())
    assert [c.pod.name for c in h.upstream.calls] == ["p0", "p1"]
    assert h.in_flight() == {"p0": 0, "p1": 1, "q0": 0}
    h.upstream.last.respond_json(COMPLETION)
    assert client.got().status == 200
    ctx = h.context
    assert (ctx.attempts, ctx.pod, ctx.status) == (2, h.pod("p1"), 200)
    assert ctx.error_type is ErrorType.SUCCESS
    assert h.in_flight() == {"p0": 0, "p1": 0, "q0": 0}


def test_without_retry_policy_three_connection_attempts_at_most() -> None:
    h = RouterHarness()
    client = h.chat()
    for _ in range(5):
        if client.response is not None:
            break
        h.upstream.last.fail(DNSLookupError())
    assert [c.pod.name for c in h.upstream.calls] == ["p0", "p1", "p0"]
    error = assert_error(client.got(), 503, ErrorType.PROXY)
    assert "p0" in error["message"]
    ctx = h.context
    assert (ctx.status, ctx.error_type, ctx.attempts) == (503, ErrorType.PROXY, 3)
    assert h.in_flight() == {"p0": 0, "p1": 0, "q0": 0}
    registry, server = h.metrics.registry, {"model_server": "default/base"}
    assert registry.get_sample_value("kthena_router_upstream_requests_total", server) == 3
    assert registry.get_sample_value("kthena_router_upstream_failures_total", server) == 3
    h.chat()
    h.upstream.last.respond_json(COMPLETION)
    assert registry.get_sample_value("kthena_router_upstream_requests_total", server) == 4
    assert registry.get_sample_value("kthena_router_upstream_failures_total", server) == 3


def test_without_retry_policy_other_failures_are_not_retried() -> None:
    h = RouterHarness()
    client = h.chat()
    h.upstream.last.fail(ResponseNeverReceived([Failure(ConnectionLost())]))
    assert len(h.upstream.calls) == 1
    assert_error(client.got(), 503, ErrorType.PROXY)
    assert h.in_flight() == {"p0": 0, "p1": 0, "q0": 0}


def test_without_retry_policy_a_5xx_is_passed_through() -> None:
    h = RouterHarness()
    client = h.chat()
    h.upstream.last.respond_json({"error": "busy"}, code=503)
    assert len(h.upstream.calls) == 1
    wire = client.got()
    assert (wire.status, wire.json()) == (503, {"error": "busy"})
    assert (h.context.status, h.context.error_type) == (503, ErrorType.UPSTREAM)


def test_retry_policy_retries_a_5xx_and_discards_its_body() -> None:
    h = RouterHarness({"retry": {"attempts": 2, "retryInterval": "0s"}})
    client = h.chat()
    first = h.upstream.last.answer(json_response({"error": "overloaded"}, code=503))
    assert first.transport.stopped == 1
    assert [c.pod.name for c in h.upstream.calls] == ["p0", "p1"]
    first.send(first.body)
    first.end()
    h.upstream.last.respond_json(COMPLETION)
    wire = client.got()
    assert (wire.status, wire.json()) == (200, COMPLETION)
    assert b"overloaded" not in client.transport.value()
    ctx = h.context
    assert (ctx.status, ctx.error_type, ctx.attempts, ctx.pod) == (
        200,
        ErrorType.SUCCESS,
        2,
        h.pod("p1"),
    )
    assert h.in_flight() == {"p0": 0, "p1": 0, "q0": 0}


def test_every_attempt_failing_is_kthenas_503() -> None:
    """Kthena: 503 `request to all pods failed`, error_type proxy; the pods' status kept."""
    h = RouterHarness({"retry": {"attempts": 1, "retryInterval": "0s"}})
    client = h.chat()
    h.upstream.last.respond(json_response({"error": "first"}, code=500))
    second = h.upstream.last.respond_json({"error": "second"}, code=502)
    error = assert_error(client.got(), 503, ErrorType.PROXY)
    assert error["message"] == (
        "request to all pods failed: 2 attempts, the last: pod p1 answered 502"
    )
    assert second.transport.stopped == 1  # its body is not relayed
    assert len(h.upstream.calls) == 2
    assert (h.context.status, h.context.upstream_status) == (503, 502)
    assert h.metrics.requests.value((BASE_MODEL, "/v1/chat/completions", "503", "proxy")) == 1
    assert h.in_flight() == {"p0": 0, "p1": 0, "q0": 0}


def test_a_single_attempt_5xx_is_relayed_as_is() -> None:
    h = RouterHarness({"retry": {"attempts": 0}})
    client = h.chat()
    h.upstream.last.respond_json({"error": "only"}, code=500)
    wire = client.got()
    assert (wire.status, wire.json()) == (500, {"error": "only"})
    assert (h.context.error_type, h.context.upstream_status) == (ErrorType.UPSTREAM, 500)


def test_a_5xx_after_connection_failures_is_all_pods_failed() -> None:
    h = RouterHarness()  # no retry policy: only connection failures are retried
    client = h.chat()
    h.upstream.last.fail(ConnectionRefusedError())
    h.upstream.last.respond_json({"error": "boom"}, code=500)
    error = assert_error(client.got(), 503, ErrorType.PROXY)
    assert error["message"].startswith("request to all pods failed: 2 attempts")


def prefix_entries(h: RouterHarness) -> int:
    hooks: list[Any] = h.plane.scheduling.scheduler.hooks  # type: ignore[attr-defined]
    return sum(len(hook) for hook in hooks)


@pytest.mark.parametrize("code", [201, 400, 404, 429, 500])
def test_the_prefix_index_learns_only_from_a_2xx(code: int) -> None:
    h = RouterHarness(configured_scheduler=True, pods=1)  # Kthena's defaults: prefix-cache
    h.chat()
    h.upstream.last.respond_json({"error": "no"} if code >= 300 else COMPLETION, code=code)
    assert prefix_entries(h) == (1 if code < 300 else 0)


def test_a_404_naming_the_model_moves_on_to_the_next_pod() -> None:
    h = RouterHarness()
    client = h.chat(model=LORA)
    first = h.upstream.last
    missing = {"object": "error", "message": f"The model `{LORA}` does not exist.", "code": 404}
    first.respond_json(missing, code=404)
    second = h.upstream.last
    assert (first.pod.name, second.pod.name) == ("p0", "p1")
    second.respond_json(COMPLETION)
    assert client.got().status == 200
    ctx = h.context
    assert ctx.failed_attempts == [("p0", "pod p0 does not serve the model (404)")]
    assert h.pod("p0").outlier.consecutive_failures == 0  # not a failing pod


def test_a_404_on_the_last_candidate_is_relayed() -> None:
    h = RouterHarness({"retry": {"attempts": 1, "retryInterval": "0s"}})
    client = h.chat(model=LORA)
    missing = {"message": f"The model `{LORA}` does not exist."}
    h.upstream.last.respond_json(missing, code=404)
    h.upstream.last.respond_json(missing, code=404)
    wire = client.got()
    assert (wire.status, wire.json()) == (404, missing)
    assert len(h.upstream.calls) == 2


@pytest.mark.parametrize("code", [400, 404, 422, 429])
def test_retry_policy_passes_a_4xx_through(code: int) -> None:
    h = RouterHarness({"retry": {"attempts": 2, "retryInterval": "0s"}})
    client = h.chat()
    h.upstream.last.respond_json({"error": {"message": "bad"}}, code=code)
    assert len(h.upstream.calls) == 1
    wire = client.got()
    assert (wire.status, wire.json()) == (code, {"error": {"message": "bad"}})
    ctx = h.context
    assert (ctx.status, ctx.error_type, ctx.attempts) == (code, ErrorType.UPSTREAM, 1)
    assert h.in_flight() == {"p0": 0, "p1": 0, "q0": 0}


def test_retry_policy_retries_other_failures() -> None:
    h = RouterHarness({"retry": {"attempts": 1, "retryInterval": "0s"}})
    client = h.chat()
    h.upstream.last.fail(ResponseNeverReceived([Failure(ConnectionLost())]))
    assert len(h.upstream.calls) == 2
    h.upstream.last.respond_json(COMPLETION)
    assert client.got().status == 200


def test_retry_interval_honoured() -> None:
    h = RouterHarness({"retry": {"attempts": 2, "retryInterval": "1s"}})
    client = h.chat()
    h.upstream.last.fail(ConnectionRefusedError())
    assert len(h.upstream.calls) == 1
    h.clock.advance(0.99)
    assert len(h.upstream.calls) == 1
    h.clock.advance(0.01)
    assert [c.pod.name for c in h.upstream.calls] == ["p0", "p1"]
    h.upstream.last.respond_json(COMPLETION)
    assert client.got().status == 200


def test_all_candidates_failing_is_503_proxy() -> None:
    h = RouterHarness({"retry": {"attempts": 3, "retryInterval": "0s"}}, pods=3)
    client = h.chat()
    for _ in range(4):
        h.upstream.last.fail(ConnectionRefusedError())
    assert [c.pod.name for c in h.upstream.calls] == ["p0", "p1", "p2", "p0"]
    assert_error(client.got(), 503, ErrorType.PROXY)
    assert client.got().complete
    ctx = h.context
    assert (ctx.status, ctx.error_type, ctx.attempts) == (503, ErrorType.PROXY, 4)
    assert all(v == 0 for v in h.in_flight().values())


def test_timeout_is_504() -> None:
    h = RouterHarness({"timeout": "2s"})
    client = h.chat()
    call = h.upstream.last
    h.clock.advance(1.99)
    assert client.response is None
    h.clock.advance(0.01)
    assert call.cancelled
    assert len(h.upstream.calls) == 1
    assert_error(client.got(), 504, ErrorType.TIMEOUT)
    assert (h.context.status, h.context.error_type) == (504, ErrorType.TIMEOUT)
    assert h.in_flight() == {"p0": 0, "p1": 0, "q0": 0}


def test_timeout_with_retry_policy_tries_the_next_pod() -> None:
    h = RouterHarness({"timeout": "2s", "retry": {"attempts": 1, "retryInterval": "0s"}})
    client = h.chat()
    h.clock.advance(2)
    assert [c.pod.name for c in h.upstream.calls] == ["p0", "p1"]
    assert h.upstream.calls[0].cancelled
    h.upstream.last.respond_json(COMPLETION)
    assert client.got().status == 200
    assert h.context.attempts == 2


def test_timeout_covers_only_the_wait_for_headers() -> None:
    h = RouterHarness({"timeout": "2s"})
    client = h.chat(stream=True)
    response = h.upstream.last.answer(sse_response())
    h.clock.advance(5)
    response.send(event(delta("late")) + DONE)
    response.end()
    wire = client.got()
    assert (wire.status, wire.complete) == (200, True)
    assert h.context.error_type is ErrorType.SUCCESS


# -- the client goes away


def test_client_disconnect_before_headers_cancels_the_upstream() -> None:
    h = RouterHarness()
    client = h.chat()
    call = h.upstream.last
    client.disconnect()
    assert call.cancelled
    assert client.transport.value() == b""
    ctx = h.context
    assert (ctx.status, ctx.error_type) == (499, ErrorType.CLIENT_DISCONNECT)
    assert h.in_flight() == {"p0": 0, "p1": 0, "q0": 0}
    assert h.plane.inflight.records() == []


def test_client_disconnect_before_headers_is_not_retried() -> None:
    # The cancelled request fails with ResponseNeverReceived (as Agent's does): that is
    # not a pod failure, and no other pod is tried for a client that is gone.
    h = RouterHarness({"retry": {"attempts": 2, "retryInterval": "0s"}})
    client = h.chat()
    client.disconnect()
    h.clock.advance(1)
    assert len(h.upstream.calls) == 1
    assert h.upstream.calls[0].cancelled
    ctx = h.context
    assert (ctx.status, ctx.error_type, ctx.attempts) == (499, ErrorType.CLIENT_DISCONNECT, 1)
    assert h.in_flight() == {"p0": 0, "p1": 0, "q0": 0}


def test_client_disconnect_after_headers_stops_the_relay() -> None:
    h = RouterHarness()
    client = h.chat(stream=True)
    response = h.upstream.last.answer(sse_response())
    response.send(event(delta("a")))
    client.disconnect()
    assert response.transport.stopped == 1
    ctx = h.context
    assert (ctx.status, ctx.error_type) == (200, ErrorType.CLIENT_DISCONNECT)
    assert h.in_flight() == {"p0": 0, "p1": 0, "q0": 0}
    # The pod's connection then closes: nothing more happens.
    response.end(Failure(ResponseFailed([Failure(ConnectionLost())])))
    assert len(h.contexts) == 1
    assert h.plane.inflight.records() == []


def test_client_disconnect_during_the_retry_interval_stops_retrying() -> None:
    h = RouterHarness({"retry": {"attempts": 2, "retryInterval": "1s"}})
    client = h.chat()
    h.upstream.last.fail(ConnectionRefusedError())
    client.disconnect()
    h.clock.advance(5)
    assert len(h.upstream.calls) == 1
    assert h.context.error_type is ErrorType.CLIENT_DISCONNECT
    assert h.in_flight() == {"p0": 0, "p1": 0, "q0": 0}


# -- the pod goes away mid-response


def test_sse_cut_mid_stream_ends_with_an_error_event() -> None:
    h = RouterHarness()
    client = h.chat(stream=True)
    response = h.upstream.last.answer(sse_response())
    response.send(event(delta("a")) + b'data: {"partial')
    response.end(Failure(ResponseFailed([Failure(ConnectionLost())])))
    wire = client.got()
    assert wire.complete
    assert not client.aborted
    events = wire.events()
    assert events[0] == json.dumps(delta("a"), separators=(",", ":"))
    assert len(events) == 2
    error = json.loads(events[1])["error"]
    assert error["code"] == ErrorType.STREAM_INTERRUPTED.value
    assert b"[DONE]" not in wire.body
    ctx = h.context
    assert (ctx.status, ctx.error_type) == (200, ErrorType.STREAM_INTERRUPTED)
    assert h.in_flight() == {"p0": 0, "p1": 0, "q0": 0}


def test_sse_idle_mid_stream_ends_with_a_timeout_event() -> None:
    h = RouterHarness(upstream={"idleTimeout": "10s"})
    client = h.chat(stream=True)
    response = h.upstream.last.answer(sse_response())
    response.send(event(delta("a")))
    h.clock.advance(10)
    assert response.transport.stopped == 1
    response.end(Failure(ResponseFailed([Failure(ConnectionLost())])))
    wire = client.got()
    assert wire.complete
    error = json.loads(wire.events()[-1])["error"]
    assert error["code"] == ErrorType.TIMEOUT.value
    assert h.context.error_type is ErrorType.TIMEOUT


def test_json_cut_mid_body_aborts_the_client_connection() -> None:
    h = RouterHarness()
    client = h.chat()
    body = json.dumps(COMPLETION).encode()
    response = h.upstream.last.answer(json_response(COMPLETION))
    response.send(body[:20])
    response.end(Failure(ResponseFailed([Failure(ConnectionLost())])))
    assert client.aborted
    wire = client.got()
    assert not wire.complete
    assert wire.body == body[:20]
    ctx = h.context
    assert (ctx.status, ctx.error_type) == (200, ErrorType.STREAM_INTERRUPTED)
    assert h.in_flight() == {"p0": 0, "p1": 0, "q0": 0}


def test_json_of_unknown_length_cut_by_the_close_is_a_502() -> None:
    h = RouterHarness()
    client = h.chat()
    body = json.dumps(COMPLETION).encode()
    response = h.upstream.last.answer(FakeResponse(200, {"content-type": ["application/json"]}))
    response.send(body[:20])
    response.end(Failure(PotentialDataLoss()))  # no length, no chunking: the close ends it
    error = assert_error(client.got(), 502, ErrorType.STREAM_INTERRUPTED)
    assert error["message"] == (
        "the pod's response was cut: the pod closed the connection before its JSON body "
        "was complete"
    )
    assert (h.context.status, h.context.error_type) == (502, ErrorType.STREAM_INTERRUPTED)
    assert h.pod("p0").outlier.consecutive_failures == 1


def test_an_error_answer_carries_none_of_the_pods_headers() -> None:
    # The pod's head was staged, not sent, when its body broke: the router's own 502 must
    # not go out labelled with the pod's encoding, cookies or length.
    h = RouterHarness()
    client = h.chat()
    body = json.dumps(COMPLETION).encode()
    pod_headers = {
        "content-type": ["application/json"],
        "content-encoding": ["gzip"],
        "set-cookie": ["session=pod"],
        "x-pod": ["p0"],
    }
    response = h.upstream.last.answer(FakeResponse(200, pod_headers))
    response.send(body[:20])
    response.end(Failure(PotentialDataLoss()))
    wire = client.got()
    assert_error(wire, 502, ErrorType.STREAM_INTERRUPTED)
    names = {name for name, _ in wire.headers}
    assert not names & {"content-encoding", "set-cookie", "x-pod"}, wire.headers
    assert wire.header("x-request-id") == h.context.request_id


def test_json_of_unknown_length_whole_is_relayed() -> None:
    h = RouterHarness()
    client = h.chat()
    body = json.dumps(COMPLETION).encode()
    response = h.upstream.last.answer(FakeResponse(200, {"content-type": ["application/json"]}))
    response.send(body[:20])
    response.send(body[20:])
    response.end(Failure(PotentialDataLoss()))
    wire = client.got()
    assert (wire.status, wire.json()) == (200, COMPLETION)
    assert h.context.completion_tokens == 3


def test_a_cut_stream_event_has_no_python_repr() -> None:
    h = RouterHarness()
    client = h.chat(stream=True)
    response = h.upstream.last.answer(sse_response())
    response.send(event(delta("a")))
    response.end(Failure(ResponseFailed([Failure(ConnectionLost())])))
    last = json.loads(client.got().events()[-1])
    assert last["error"]["message"] == (
        "the pod's response was cut: the connection to the pod was lost"
    )


# -- one record per request


def test_each_request_recorded_exactly_once() -> None:
    h = RouterHarness()
    clients: list[Client] = [h.chat(), h.chat(), h.get("/healthz"), h.post("/v1/x", b"[]")]
    h.upstream.calls[0].respond_json(COMPLETION)
    h.upstream.calls[1].fail(ConnectionRefusedError())
    h.upstream.calls[2].respond_json(COMPLETION)
    assert all(c.response is not None for c in clients)
    # Proxied, refused and router-answered requests alike are recorded, once each.
    assert len(h.contexts) == 4
    assert len({id(c) for c in h.contexts}) == 4
    assert sorted(c.status for c in h.contexts) == [200, 200, 200, 404]
