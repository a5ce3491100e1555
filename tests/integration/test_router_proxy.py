"""
The router's data plane in one process: routers and simulated pods as services of the
test's reactor, real loopback sockets, an HTTP client on the same reactor.

Covered: model rewriting and usage, streaming (usage chunk injected and hidden, events
relayed one by one), client disconnects cancelling the pod's work, retries (refused
connections, 5xx with a retry policy, 4xx never), weighted targets, header rules, LoRA
routes, every error the router answers itself, request ids, the router's own endpoints,
draining and embedding two routers in one process.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
from prometheus_client import REGISTRY, CollectorRegistry
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.protocol import Protocol
from twisted.web.client import ResponseDone

from kthena.errors import ErrorType
from kthena.service import makeRouterService
from kthena.sim.service import SimService
from tests.integration.router_helpers import (
    REQUEST_ID,
    Cluster,
    Reply,
    assert_error_object,
    chat_body,
    closed_port,
    completion_body,
    inline,
    median_gap,
    served,
)
from tests.unit.routerfixtures import Doc, route, server, simple_route

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
UPSTREAM = "org/upstream-model"
WORDS = [" alpha", " beta", " gamma", " delta"]


def one_server(
    cluster: Cluster, sims: list[SimService], model: str = UPSTREAM, **spec: Any
) -> list[Doc]:
    """Route C{client-model} to server C{srv} (model C{model}) whose pods are C{sims}."""
    return [
        simple_route("client", "client-model", "srv"),
        server("srv", {"app": "srv"}, model, **spec),
        *(cluster.pod(f"pod-{i}", sim, {"app": "srv"}) for i, sim in enumerate(sims)),
    ]


def body_for(path: str, model: str = "client-model", **extra: Any) -> dict[str, Any]:
    return chat_body(model, **extra) if path == CHAT else completion_body(model, **extra)


# -- the OpenAI API through the router


@inline
async def test_chat_and_completions_rewrite_the_model_and_report_usage(cluster: Cluster) -> None:
    sim = cluster.sim(UPSTREAM, output_tokens=6)
    router = cluster.router(one_server(cluster, [sim]))
    records = Cluster.hook(router)

    chat = await cluster.post(router, CHAT, chat_body("client-model", max_tokens=3))
    assert chat.status == 200, chat.body
    body = chat.json()
    assert body["object"] == "chat.completion"
    assert body["model"] == UPSTREAM  # the ModelServer's spec.model, not the client's name
    assert body["choices"][0]["message"]["content"] == "".join(WORDS[:3])
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 3
    assert body["usage"]["prompt_tokens"] > 0

    text = await cluster.post(router, COMPLETIONS, completion_body("client-model"))
    assert text.status == 200, text.body
    body = text.json()
    assert body["object"] == "text_completion"
    assert body["model"] == UPSTREAM
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"]["completion_tokens"] == 6

    assert served(sim) == 2
    assert [r.completion_tokens for r in records] == [3, 6]
    assert all(r.status == 200 and r.error_type is ErrorType.SUCCESS for r in records)


@pytest.mark.parametrize("path", [CHAT, COMPLETIONS])
@inline
async def test_streams_get_usage_only_when_the_client_asks(cluster: Cluster, path: str) -> None:
    sim = cluster.sim(UPSTREAM, output_tokens=8)
    router = cluster.router(one_server(cluster, [sim]))
    records = Cluster.hook(router)

    plain = await cluster.stream(router, path, body_for(path, stream=True, max_tokens=4))
    assert plain.status == 200
    assert (plain.header("content-type") or "").startswith("text/event-stream")
    assert plain.done
    assert plain.text == "".join(WORDS)
    chunks = plain.chunks
    assert chunks
    assert all(c["model"] == UPSTREAM for c in chunks)
    # The router asked the pod for usage; the usage-only chunk never reaches this client.
    assert all(c["choices"] for c in chunks), chunks
    assert all(c.get("usage") is None for c in chunks), chunks
    assert records[-1].completion_tokens == 4
    assert records[-1].prompt_tokens is not None

    asked = await cluster.stream(
        router,
        path,
        body_for(path, stream=True, max_tokens=4, stream_options={"include_usage": True}),
    )
    assert asked.done
    assert asked.text == "".join(WORDS)
    last = asked.chunks[-1]
    assert last["choices"] == []
    assert last["usage"]["completion_tokens"] == 4
    assert last["usage"]["prompt_tokens"] == records[-2].prompt_tokens
    assert [c for c in asked.chunks if c["choices"] == []] == [last]
    assert records[-1].completion_tokens == 4


@inline
async def test_events_are_relayed_one_by_one(cluster: Cluster) -> None:
    itl = 0.05
    sim = cluster.sim(UPSTREAM, itl=itl, output_tokens=8)
    router = cluster.router(one_server(cluster, [sim]))
    reply = await cluster.stream(router, CHAT, chat_body("client-model", stream=True))
    assert reply.done
    arrivals = reply.token_times()
    assert len(arrivals) == 8
    # Paced like the pod, not buffered into a burst.
    assert median_gap(arrivals) >= itl / 2
    assert arrivals[-1] - arrivals[0] >= 7 * itl / 2


@inline
async def test_client_hanging_up_mid_stream_stops_the_pod(cluster: Cluster) -> None:
    sim = cluster.sim(UPSTREAM, itl=0.05, output_tokens=400)  # a 20 s stream
    router = cluster.router(one_server(cluster, [sim]))
    records = Cluster.hook(router)

    reply = await cluster.stream(
        router, CHAT, chat_body("client-model", stream=True), hang_up_after=3
    )
    assert len(reply.token_times()) == 3
    assert reply.reason is not None
    assert not reply.reason.check(ResponseDone)
    await cluster.wait_for(
        lambda: sim.engine.num_running == 0 and not router.plane.inflight,
        timeout=3,
        what="the pod's running requests and the router's calls back to 0",
    )
    assert all(p.in_flight == 0 for p in router.store.pods.values())
    assert served(sim) == 0  # generation stopped, not completed
    assert records[-1].error_type is ErrorType.CLIENT_DISCONNECT
    # The router still serves.
    again = await cluster.post(router, CHAT, chat_body("client-model", max_tokens=2))
    assert again.status == 200


# -- retries


@inline
async def test_a_pod_refusing_connections_is_skipped(cluster: Cluster) -> None:
    live = cluster.sim(UPSTREAM)
    router = cluster.router(
        [
            simple_route("client", "client-model", "srv"),
            server("srv", {"app": "srv"}, UPSTREAM),
            Cluster.pod("dead", closed_port(), {"app": "srv"}),
            Cluster.pod("live", live, {"app": "srv"}),
        ]
    )
    records = Cluster.hook(router)

    replies = await cluster.many(
        30, 5, lambda i: cluster.post(router, CHAT, chat_body("client-model", max_tokens=2))
    )
    assert [r.status for r in replies] == [200] * 30
    assert served(live) == 30
    assert {r.pod.name for r in records if r.pod} == {"live"}
    # The dead pod was tried first about half the time (random order), then the next one.
    assert any(r.attempts == 2 for r in records)
    assert all(r.attempts <= 2 for r in records)


@inline
async def test_retry_policy_moves_5xx_to_a_healthy_pod(cluster: Cluster) -> None:
    bad = cluster.sim(UPSTREAM)
    good = cluster.sim(UPSTREAM)
    faults = await cluster.request(
        bad, "PUT", "/sim/faults", {"error_rate": 1, "error_status": 503}
    )
    assert faults.status == 200, faults.body
    router = cluster.router(
        one_server(
            cluster,
            [bad, good],
            trafficPolicy={"retry": {"attempts": 2, "retryInterval": "10ms"}},
        )
    )
    records = Cluster.hook(router)

    replies = await cluster.many(
        20, 4, lambda i: cluster.post(router, CHAT, chat_body("client-model", max_tokens=2))
    )
    assert [r.status for r in replies] == [200] * 20
    for i in range(6):
        stream = await cluster.stream(router, CHAT, chat_body("client-model", stream=True))
        assert stream.status == 200, i
        assert stream.done
    assert served(good) == 26
    assert served(bad) == 0
    assert {r.pod.name for r in records if r.pod} == {"pod-1"}
    assert any(r.attempts == 2 for r in records)


@inline
async def test_5xx_without_retry_policy_passes_through(cluster: Cluster) -> None:
    sim = cluster.sim(UPSTREAM)
    await cluster.request(sim, "PUT", "/sim/faults", {"error_rate": 1, "error_status": 503})
    router = cluster.router(one_server(cluster, [sim]))
    records = Cluster.hook(router)
    direct = await cluster.post(sim, CHAT, chat_body(UPSTREAM))
    reply = await cluster.post(router, CHAT, chat_body("client-model"))
    assert reply.status == direct.status == 503
    assert reply.body == direct.body
    assert records[-1].attempts == 1


@inline
async def test_4xx_pass_through_unchanged_and_are_not_retried(cluster: Cluster) -> None:
    a = cluster.sim(UPSTREAM)
    b = cluster.sim(UPSTREAM)
    router = cluster.router(
        one_server(
            cluster, [a, b], trafficPolicy={"retry": {"attempts": 3, "retryInterval": "1ms"}}
        )
    )
    records = Cluster.hook(router)

    # The engine's own 400 (bad max_tokens): status and body as the pod sent them.
    direct = await cluster.post(a, CHAT, chat_body(UPSTREAM, max_tokens=0))
    assert direct.status == 400
    for _ in range(4):
        reply = await cluster.post(router, CHAT, chat_body("client-model", max_tokens=0))
        assert reply.status == 400
        assert reply.body == direct.body
        assert records[-1].attempts == 1
        assert records[-1].error_type is ErrorType.UPSTREAM

    # A pod saying 429 is not retried either (the client must back off).
    for sim in (a, b):
        changed = await cluster.request(
            sim, "PUT", "/sim/faults", {"error_rate": 1, "error_status": 429}
        )
        assert changed.status == 200
    direct = await cluster.post(a, CHAT, chat_body(UPSTREAM))
    assert direct.status == 429
    for _ in range(4):
        reply = await cluster.post(router, CHAT, chat_body("client-model"))
        assert reply.status == 429
        assert reply.body == direct.body
        assert records[-1].attempts == 1
    assert served(a) + served(b) == 0


# -- routing


@inline
async def test_weighted_targets_split_traffic_70_30(cluster: Cluster) -> None:
    heavy = cluster.sim(UPSTREAM, itl=0.0, output_tokens=1)
    light = cluster.sim(UPSTREAM, itl=0.0, output_tokens=1)
    router = cluster.router(
        [
            route(
                "weighted",
                {
                    "modelName": "client-model",
                    "rules": [
                        {
                            "name": "split",
                            "targetModels": [
                                {"modelServerName": "heavy", "weight": 70},
                                {"modelServerName": "light", "weight": 30},
                            ],
                        }
                    ],
                },
            ),
            server("heavy", {"app": "heavy"}, UPSTREAM),
            server("light", {"app": "light"}, UPSTREAM),
            Cluster.pod("heavy-0", heavy, {"app": "heavy"}),
            Cluster.pod("light-0", light, {"app": "light"}),
        ]
    )
    total = 1000
    replies = await cluster.many(
        total, 25, lambda i: cluster.post(router, CHAT, chat_body("client-model"))
    )
    assert all(r.status == 200 for r in replies)
    assert served(heavy) + served(light) == total
    assert abs(served(heavy) - 0.7 * total) <= 0.05 * total, served(heavy)
    assert abs(served(light) - 0.3 * total) <= 0.05 * total, served(light)


@inline
async def test_header_rules_choose_the_server(cluster: Cluster) -> None:
    names = ("gold", "team", "eu", "default")
    sims = {name: cluster.sim(f"model-{name}") for name in names}
    resources: list[Doc] = [
        route(
            "tiered",
            {
                "modelName": "tiered",
                "rules": [
                    {
                        "name": "gold",
                        "modelMatch": {"headers": {"X-Tier": {"exact": "gold"}}},
                        "targetModels": [{"modelServerName": "gold"}],
                    },
                    {
                        "name": "team",
                        "modelMatch": {"headers": {"x-user": {"prefix": "team-a-"}}},
                        "targetModels": [{"modelServerName": "team"}],
                    },
                    {
                        "name": "eu",
                        "modelMatch": {"headers": {"x-region": {"regex": "^eu-(west|north)-\\d$"}}},
                        "targetModels": [{"modelServerName": "eu"}],
                    },
                    {"name": "rest", "targetModels": [{"modelServerName": "default"}]},
                ],
            },
        )
    ]
    for name, sim in sims.items():
        resources.append(server(name, {"app": name}, f"model-{name}"))
        resources.append(Cluster.pod(f"{name}-0", sim, {"app": name}))
    router = cluster.router(resources)

    cases: list[tuple[dict[str, str], str]] = [
        ({"X-TIER": "gold"}, "gold"),
        ({"x-tier": "golden"}, "default"),
        ({"x-user": "team-a-bob"}, "team"),
        ({"x-user": "team-b-bob"}, "default"),
        ({"x-region": "eu-west-1"}, "eu"),
        ({"x-region": "eu-north-2"}, "eu"),
        ({"x-region": "us-east-1"}, "default"),
        ({}, "default"),
        ({"x-tier": "gold", "x-user": "team-a-bob"}, "gold"),  # the first matching rule wins
    ]
    for headers, expected in cases:
        reply = await cluster.post(router, CHAT, chat_body("tiered", max_tokens=1), headers)
        assert reply.status == 200, (headers, reply.body)
        assert reply.json()["model"] == f"model-{expected}", headers
    assert {name: served(sim) for name, sim in sims.items()} == {
        "gold": 2,
        "team": 1,
        "eu": 2,
        "default": 4,
    }


@inline
async def test_lora_adapter_goes_to_the_pod_serving_it(cluster: Cluster) -> None:
    base = cluster.sim("Qwen/Qwen2.5-0.5B-Instruct")
    adapted = cluster.sim("Qwen/Qwen2.5-0.5B-Instruct", loras=["sql-lora"])
    router = cluster.router(
        [
            simple_route("qwen", "qwen", "qwen"),
            route(
                "qwen-sql",
                {
                    "loraAdapters": ["sql-lora"],
                    "rules": [{"name": "lora", "targetModels": [{"modelServerName": "qwen-lora"}]}],
                },
            ),
            server("qwen", {"app": "qwen"}, "Qwen/Qwen2.5-0.5B-Instruct"),
            server("qwen-lora", {"app": "qwen", "lora": "sql-lora"}, "Qwen/Qwen2.5-0.5B-Instruct"),
            Cluster.pod("qwen-0", base, {"app": "qwen"}),
            Cluster.pod("qwen-1", adapted, {"app": "qwen", "lora": "sql-lora"}),
        ]
    )
    for _ in range(8):
        reply = await cluster.post(router, CHAT, chat_body("sql-lora", max_tokens=2))
        assert reply.status == 200, reply.body
        assert reply.json()["model"] == "sql-lora"  # an adapter name is not rewritten
    stream = await cluster.stream(router, COMPLETIONS, completion_body("sql-lora", stream=True))
    assert stream.done
    assert {c["model"] for c in stream.chunks} == {"sql-lora"}
    assert served(adapted) == 9
    assert served(base) == 0

    reply = await cluster.post(router, CHAT, chat_body("qwen", max_tokens=2))
    assert reply.status == 200
    assert reply.json()["model"] == "Qwen/Qwen2.5-0.5B-Instruct"


# -- what the router answers itself

ERROR_TYPES = {
    400: "invalid_request_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    503: "service_unavailable_error",
    504: "timeout_error",
}


def check_error(reply: Reply, status: int, code: str) -> None:
    assert reply.status == status, (reply.status, reply.body)
    assert (reply.header("content-type") or "").startswith("application/json")
    error = assert_error_object(reply.json(), status, code)
    assert error["type"] == ERROR_TYPES[status]
    assert REQUEST_ID.match(reply.header("x-request-id") or ""), reply.headers


@inline
async def test_refusals_are_openai_error_objects(cluster: Cluster) -> None:
    sim = cluster.sim(UPSTREAM)
    router = cluster.router(
        [
            simple_route("ok", "client-model", "srv"),
            simple_route("idle", "idle-model", "idle"),
            simple_route("dead", "dead-model", "dead"),
            server("srv", {"app": "srv"}, UPSTREAM),
            server("idle", {"app": "idle"}, UPSTREAM),
            server("dead", {"app": "dead"}, UPSTREAM),
            Cluster.pod("srv-0", sim, {"app": "srv"}),
            Cluster.pod("idle-0", sim, {"app": "idle"}, ready=False),
            Cluster.pod("idle-1", sim, {"app": "idle"}, phase="Pending"),
            Cluster.pod("idle-2", sim, {"app": "idle"}, deleting=True),
            Cluster.pod("dead-0", closed_port(), {"app": "dead"}),
            Cluster.pod("dead-1", closed_port(), {"app": "dead"}),
        ],
        maxBodyBytes=4096,
    )
    records = Cluster.hook(router)

    check_error(
        await cluster.post(router, CHAT, chat_body("no-such-model")), 404, "route_not_found"
    )
    missing = {"messages": [{"role": "user", "content": "hi"}]}
    check_error(await cluster.post(router, CHAT, missing), 404, "route_not_found")
    check_error(await cluster.post(router, CHAT, chat_body("")), 404, "route_not_found")
    check_error(
        await cluster.post(router, CHAT, b'{"model": "client-model",'), 400, "prompt_parsing"
    )
    check_error(await cluster.post(router, CHAT, [1, 2]), 400, "prompt_parsing")
    check_error(await cluster.post(router, CHAT, chat_body("idle-model")), 503, "pod_discovery")

    check_error(await cluster.post(router, CHAT, chat_body("dead-model")), 503, "proxy")
    assert records[-1].attempts == 3  # connection failures are retried on the next pod

    big = chat_body("client-model", text="word " * 2000)
    check_error(await cluster.post(router, CHAT, big), 413, "request_too_large")
    chunked = await cluster.request(router, "POST", CHAT, big, chunked=True)
    check_error(chunked, 413, "request_too_large")

    wrong_method = await cluster.request(router, "GET", CHAT)
    check_error(wrong_method, 405, "method_not_allowed")
    assert wrong_method.header("allow") == "POST"
    check_error(await cluster.request(router, "POST", "/v1/models", {}), 405, "method_not_allowed")
    check_error(await cluster.request(router, "GET", "/nowhere"), 404, "not_found")

    assert served(sim) == 0
    ok = await cluster.post(router, CHAT, chat_body("client-model", max_tokens=2))
    assert ok.status == 200
    assert served(sim) == 1
    assert not router.plane.inflight


@inline
async def test_timeout_answers_504_and_cancels_the_pod(cluster: Cluster) -> None:
    sim = cluster.sim(UPSTREAM, itl=0.1, output_tokens=30)  # 3 s for the whole answer
    router = cluster.router(one_server(cluster, [sim], trafficPolicy={"timeout": "300ms"}))
    records = Cluster.hook(router)
    started = time.monotonic()
    reply = await cluster.post(router, CHAT, chat_body("client-model"))
    elapsed = time.monotonic() - started
    check_error(reply, 504, "timeout")
    assert elapsed < 2.5  # well before the pod would have answered
    assert records[-1].status == 504
    await cluster.wait_for(
        lambda: sim.engine.num_running == 0 and not router.plane.inflight,
        timeout=3,
        what="the timed-out request to be cancelled on the pod",
    )
    assert served(sim) == 0


@inline
async def test_request_id_is_kept_or_made_and_reaches_the_pod(cluster: Cluster) -> None:
    sim = cluster.sim(UPSTREAM)
    router = cluster.router(one_server(cluster, [sim]))

    given = await cluster.post(
        router, CHAT, chat_body("client-model"), {"x-request-id": "given-id-42"}
    )
    assert given.status == 200
    assert given.header("x-request-id") == "given-id-42"
    assert given.json()["id"] == "chatcmpl-given-id-42"  # the sim builds it from the id it got

    made = await cluster.post(router, CHAT, chat_body("client-model"))
    request_id = made.header("x-request-id") or ""
    assert REQUEST_ID.match(request_id), request_id
    assert made.json()["id"] == f"chatcmpl-{request_id}"

    text = await cluster.post(router, COMPLETIONS, completion_body("client-model"))
    assert text.json()["id"] == f"cmpl-{text.header('x-request-id')}"

    stream = await cluster.stream(router, CHAT, chat_body("client-model", stream=True))
    request_id = stream.header("x-request-id") or ""
    assert REQUEST_ID.match(request_id)
    assert {c["id"] for c in stream.chunks} == {f"chatcmpl-{request_id}"}
    assert made.header("x-request-id") != request_id


@inline
async def test_models_health_and_ready(cluster: Cluster) -> None:
    sim = cluster.sim(UPSTREAM)
    router = cluster.router(
        [
            route(
                "dated",
                {
                    "modelName": "dated-model",
                    "loraAdapters": ["adapter-a", "adapter-b"],
                    "rules": [{"targetModels": [{"modelServerName": "srv"}]}],
                },
                created="2025-01-02T03:04:05Z",
            ),
            simple_route("plain", "plain-model", "srv"),
            server("srv", {"app": "srv"}, UPSTREAM),
            Cluster.pod("srv-0", sim, {"app": "srv"}),
        ]
    )
    models = await cluster.request(router, "GET", "/v1/models")
    assert models.status == 200
    body = models.json()
    assert body["object"] == "list"
    data = body["data"]
    assert [m["id"] for m in data] == ["adapter-a", "adapter-b", "dated-model", "plain-model"]
    for entry in data:
        assert set(entry) == {"id", "object", "created", "owned_by"}
        assert entry["object"] == "model"
        assert isinstance(entry["created"], int)
        assert isinstance(entry["owned_by"], str)
    assert {m["created"] for m in data if m["id"] != "plain-model"} == {1735787045}
    assert abs(next(m for m in data if m["id"] == "plain-model")["created"] - time.time()) < 600

    health = await cluster.request(router, "GET", "/healthz")
    assert health.status == 200
    assert health.json() == {"message": "ok"}
    ready = await cluster.request(router, "GET", "/readyz")
    assert ready.status == 200


# -- lifecycle and embedding


@inline
async def test_stopping_drains_streams_and_refuses_new_requests(cluster: Cluster) -> None:
    sim = cluster.sim(UPSTREAM, itl=0.05, output_tokens=12)
    router = cluster.router(one_server(cluster, [sim]))
    port = router.proxy.bound_port
    streaming = Deferred.fromCoroutine(
        cluster.stream(router, CHAT, chat_body("client-model", stream=True))
    )
    await cluster.wait_for(lambda: sim.engine.num_running == 1, 3, "the stream to start")
    cluster.routers.remove(router)  # stopped here, not by the fixture
    stopped = router.stopService()
    assert not stopped.called  # the stream holds it
    await cluster.sleep(0.1)  # the listening socket closes on the next reactor turn
    endpoint = TCP4ClientEndpoint(cluster.reactor, "127.0.0.1", port, timeout=2)
    with pytest.raises(ConnectionRefusedError):
        await connectProtocol(endpoint, Protocol())
    reply = await streaming
    assert reply.done
    assert len(reply.token_times()) == 12
    await stopped
    assert not router.plane.inflight


@inline
async def test_two_embedded_routers_keep_to_their_own_registries(cluster: Cluster) -> None:
    global_families = {f.name for f in REGISTRY.collect()}
    one, two = cluster.sim("model-one"), cluster.sim("model-two")
    first_registry, second_registry = CollectorRegistry(), CollectorRegistry()
    first = cluster.router(
        [
            simple_route("r", "shared-name", "srv"),
            server("srv", {"app": "one"}, "model-one"),
            Cluster.pod("p", one, {"app": "one"}),
        ],
        registry=first_registry,
    )
    second = cluster.router(
        [
            simple_route("r", "shared-name", "srv"),
            server("srv", {"app": "two"}, "model-two"),
            Cluster.pod("p", two, {"app": "two"}),
        ],
        registry=second_registry,
    )
    assert first.registry is first_registry
    assert second.registry is second_registry
    # Built without a registry, routers get private ones, never the global REGISTRY.
    spare_a = makeRouterService(first.config, cluster.reactor)
    spare_b = makeRouterService(first.config, cluster.reactor)
    assert spare_a.registry is not spare_b.registry
    assert REGISTRY not in (spare_a.registry, spare_b.registry)

    for _ in range(3):
        a = await cluster.post(first, CHAT, chat_body("shared-name", max_tokens=1))
        b = await cluster.post(second, CHAT, chat_body("shared-name", max_tokens=1))
        assert (a.status, b.status) == (200, 200)
        assert a.json()["model"] == "model-one"
        assert b.json()["model"] == "model-two"
    assert (served(one), served(two)) == (3, 3)
    assert {f.name for f in REGISTRY.collect()} == global_families
