"""
The dispatcher over the lean client towards pods (C{upstream.client: lean}): routers and
simulated pods in this reactor on real loopback sockets, pods on addresses of their own
(127.0.92.x), the official OpenAI client in a thread.

Covered: plain and streamed answers (usage, pooled connections reused), a pod refusing
connections skipped, a client hanging up mid-stream stopping the pod, a timeout
cancelling the pod's work, and the switch needing a restart.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, cast

import openai
from twisted.internet.threads import deferToThread
from twisted.logger import ILogObserver, globalLogPublisher
from twisted.web.client import ResponseDone

from kthena.config.router import parse_config
from kthena.errors import ErrorType
from kthena.http.client import LeanUpstream
from kthena.service import RouterService
from kthena.sim.engine import EngineConfig
from kthena.sim.service import SimConfig, SimService
from tests.integration.router_helpers import (
    Cluster,
    assert_error_object,
    chat_body,
    closed_port,
    inline,
    served,
)
from tests.unit.routerfixtures import Doc, pod, server, simple_route

UPSTREAM = "org/upstream-model"
CHAT = "/v1/chat/completions"
LEAN = {"client": "lean"}


def sim_at(cluster: Cluster, host: str, itl: float = 0.001, output_tokens: int = 4) -> SimService:
    """A started simulator listening on C{host} (stopped with the cluster)."""
    config = SimConfig(
        engine="vllm",
        model=UPSTREAM,
        listen=f"tcp:0:interface={host}",
        engine_config=EngineConfig(itl=itl),
        output_tokens=output_tokens,
        seed=0,
    )
    sim = SimService(config, cluster.reactor)
    sim.startService()
    cluster.sims.append(sim)
    return sim


def resources(pods: list[tuple[str, str, int]], **spec: Any) -> list[Doc]:
    """Route C{client-model} to server C{srv} whose pods are (name, host, port)."""
    return [
        simple_route("client", "client-model", "srv"),
        server("srv", {"app": "srv"}, UPSTREAM, **spec),
        *(pod(name, host, {"app": "srv"}, port=port) for name, host, port in pods),
    ]


def lean_router(cluster: Cluster, docs: list[Doc]) -> RouterService:
    router = cluster.router(docs, upstream=LEAN)
    assert isinstance(router.upstream, LeanUpstream)
    return router


@inline
async def test_plain_and_streamed_answers_through_the_openai_client(cluster: Cluster) -> None:
    sim = sim_at(cluster, "127.0.92.1", output_tokens=6)
    router = lean_router(cluster, resources([("pod-0", "127.0.92.1", sim.listener.bound_port)]))
    records = Cluster.hook(router)
    client = openai.OpenAI(
        base_url=f"http://127.0.0.1:{router.proxy.bound_port}/v1", api_key="-", max_retries=0
    )
    messages: Any = [{"role": "user", "content": "alpha beta gamma delta"}]

    def traffic() -> tuple[list[str], list[str]]:
        plain = []
        for _ in range(3):
            reply = client.chat.completions.create(
                model="client-model", messages=messages, max_tokens=3
            )
            assert reply.model == UPSTREAM
            assert reply.usage is not None and reply.usage.completion_tokens == 3
            plain.append(reply.choices[0].message.content or "")
        streamed = []
        for _ in range(3):
            pieces, usage = [], None
            for chunk in client.chat.completions.create(
                model="client-model",
                messages=messages,
                stream=True,
                stream_options={"include_usage": True},
            ):
                usage = chunk.usage or usage
                pieces += [c.delta.content or "" for c in chunk.choices]
            assert usage is not None and usage.completion_tokens == 6
            streamed.append("".join(pieces))
        return plain, streamed

    plain, streamed = await deferToThread(traffic)
    assert plain == [" alpha beta gamma"] * 3
    assert streamed == [" alpha beta gamma delta alpha beta"] * 3
    assert served(sim) == 6
    assert [r.status for r in records] == [200] * 6
    assert [r.completion_tokens for r in records] == [3, 3, 3, 6, 6, 6]
    # One at a time: one connection served them all, and waits in the pool.
    endpoint = next(iter(router.store.pods.values()))
    assert router.upstream.idle_connections(endpoint) == 1


@inline
async def test_a_pod_refusing_connections_is_skipped(cluster: Cluster) -> None:
    live = sim_at(cluster, "127.0.92.2")
    router = lean_router(
        cluster,
        resources(
            [
                ("dead", "127.0.92.3", closed_port("127.0.92.3")),
                ("live", "127.0.92.2", live.listener.bound_port),
            ]
        ),
    )
    records = Cluster.hook(router)
    replies = await cluster.many(
        20, 5, lambda i: cluster.post(router, CHAT, chat_body("client-model", max_tokens=2))
    )
    assert [r.status for r in replies] == [200] * 20
    assert served(live) == 20
    assert {r.pod.name for r in records if r.pod} == {"live"}
    assert any(r.attempts == 2 for r in records)
    assert all(r.attempts <= 2 for r in records)


@inline
async def test_a_client_hanging_up_mid_stream_stops_the_pod(cluster: Cluster) -> None:
    sim = sim_at(cluster, "127.0.92.4", itl=0.05, output_tokens=400)  # a 20 s stream
    router = lean_router(cluster, resources([("pod-0", "127.0.92.4", sim.listener.bound_port)]))
    records = Cluster.hook(router)
    reply = await cluster.stream(
        router, CHAT, chat_body("client-model", stream=True), hang_up_after=3
    )
    assert len(reply.token_times()) == 3
    assert reply.reason is not None and not reply.reason.check(ResponseDone)
    await cluster.wait_for(
        lambda: sim.engine.num_running == 0 and not router.plane.inflight,
        timeout=3,
        what="the pod's running requests and the router's calls back to 0",
    )
    assert served(sim) == 0
    assert records[-1].error_type is ErrorType.CLIENT_DISCONNECT
    again = await cluster.post(router, CHAT, chat_body("client-model", max_tokens=2))
    assert again.status == 200


@inline
async def test_a_timeout_answers_504_and_cancels_the_pod(cluster: Cluster) -> None:
    sim = sim_at(cluster, "127.0.92.5", itl=0.1, output_tokens=30)  # 3 s for the answer
    router = lean_router(
        cluster,
        resources(
            [("pod-0", "127.0.92.5", sim.listener.bound_port)], trafficPolicy={"timeout": "300ms"}
        ),
    )
    started = time.monotonic()
    reply = await cluster.post(router, CHAT, chat_body("client-model"))
    assert reply.status == 504
    assert_error_object(reply.json(), 504, "timeout")
    assert time.monotonic() - started < 2.5
    await cluster.wait_for(
        lambda: sim.engine.num_running == 0 and not router.plane.inflight,
        timeout=3,
        what="the timed-out request to be cancelled on the pod",
    )
    assert served(sim) == 0


@inline
async def test_the_client_changes_only_with_a_restart(cluster: Cluster) -> None:
    router = lean_router(cluster, resources([]))
    raw = {"listen": "tcp:0", "upstream": {"client": "twisted"}, "resources": resources([])}
    events: list[dict[str, Any]] = []
    observer = cast(ILogObserver, events.append)
    globalLogPublisher.addObserver(observer)
    try:
        router.reconfigure(parse_config(raw, "<test config>", Path.cwd(), []))
    finally:
        globalLogPublisher.removeObserver(observer)
    assert isinstance(router.upstream, LeanUpstream)
    assert any(e.get("what") == "upstream.client" for e in events), events
