"""
The lean HTTP server under the pipeline (C{downstream.server: lean}) on real loopback
sockets: simulated pods on addresses of their own (127.0.91.x), the official OpenAI client
(plain and streamed) and raw sockets (pipelining, a chunked body, HTTP/1.0) in a thread.
"""

from __future__ import annotations

import json
import socket
from typing import Any

import openai
from twisted.internet.threads import deferToThread

from kthena.http.server import LeanSite
from kthena.service import RouterService
from kthena.sim.engine import EngineConfig
from kthena.sim.service import SimConfig, SimService
from tests.integration.router_helpers import LOOPBACK, Cluster, inline
from tests.unit.proxyfixtures import parse_response
from tests.unit.routerfixtures import pod, server, simple_route

UPSTREAM = "org/upstream-model"
CHAT = b"/v1/chat/completions"


def lean_router(cluster: Cluster, host: str) -> RouterService:
    """A lean-server router in front of one simulated pod on C{host}."""
    config = SimConfig(
        engine="vllm",
        model=UPSTREAM,
        listen=f"tcp:0:interface={host}",
        engine_config=EngineConfig(itl=0.001),
        output_tokens=5,
        seed=0,
    )
    sim = SimService(config, cluster.reactor)
    sim.startService()
    cluster.sims.append(sim)
    router = cluster.router(
        [
            simple_route("m", "m", "srv"),
            server("srv", {"app": "srv"}, UPSTREAM),
            pod("pod-0", host, {"app": "srv"}, port=sim.listener.bound_port),
        ],
        downstream={"server": "lean"},
    )
    assert isinstance(router.proxy.site, LeanSite)
    return router


def exchange(port: int, data: bytes) -> bytes:
    """Send C{data} on one connection and read until the router closes it."""
    with socket.create_connection((LOOPBACK, port), timeout=10) as sock:
        sock.sendall(data)
        received = []
        while chunk := sock.recv(65536):
            received.append(chunk)
    return b"".join(received)


def chat(stream: bool = False) -> bytes:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": stream}
    return json.dumps(body).encode()


@inline
async def test_the_openai_client_plain_and_streamed(cluster: Cluster) -> None:
    router = lean_router(cluster, "127.0.91.1")
    client = openai.OpenAI(
        base_url=f"http://{LOOPBACK}:{router.proxy.bound_port}/v1", api_key="-", max_retries=0
    )
    messages: Any = [{"role": "user", "content": "alpha beta"}]

    def talk() -> tuple[Any, list[Any]]:
        whole = client.chat.completions.create(model="m", messages=messages)
        chunks = list(
            client.chat.completions.create(
                model="m", messages=messages, stream=True, stream_options={"include_usage": True}
            )
        )
        client.close()
        return whole, chunks

    whole, chunks = await deferToThread(talk)
    assert whole.model == UPSTREAM and whole.usage.completion_tokens == 5
    assert whole.choices[0].message.content
    deltas = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(deltas) == 5
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 5


@inline
async def test_pipelined_requests_answered_in_order(cluster: Cluster) -> None:
    router = lean_router(cluster, "127.0.91.2")
    body = chat()
    data = (
        b"POST %s HTTP/1.1\r\nHost: r\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s"
        % (CHAT, len(body), body)
        + b"GET /healthz HTTP/1.1\r\nHost: r\r\nConnection: close\r\n\r\n"
    )
    raw = await deferToThread(exchange, router.proxy.bound_port, data)
    first = parse_response(raw)
    assert first is not None and first.status == 200 and first.complete
    assert first.json()["model"] == UPSTREAM
    assert raw.count(b"HTTP/1.1 200 OK\r\n") == 2
    assert raw.index(UPSTREAM.encode()) < raw.index(b'{"message":"ok"}')
    assert raw.endswith(b'{"message":"ok"}')


@inline
async def test_a_chunked_request_body_and_a_streamed_answer(cluster: Cluster) -> None:
    router = lean_router(cluster, "127.0.91.3")
    body = chat(stream=True)
    half = len(body) // 2
    data = (
        b"POST %s HTTP/1.1\r\nHost: r\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        % CHAT
        + b"%x\r\n%s\r\n" % (half, body[:half])
        + b"%x\r\n%s\r\n0\r\n\r\n" % (len(body) - half, body[half:])
    )
    raw = await deferToThread(exchange, router.proxy.bound_port, data)
    response = parse_response(raw)
    assert response is not None and response.status == 200, raw
    assert response.header("transfer-encoding") == "chunked" and response.complete
    events = response.events()
    assert events[-1] == "[DONE]" and len(events) >= 6


@inline
async def test_an_http_10_stream_ends_with_the_close(cluster: Cluster) -> None:
    router = lean_router(cluster, "127.0.91.4")
    body = chat(stream=True)
    data = b"POST %s HTTP/1.0\r\nContent-Length: %d\r\n\r\n%s" % (CHAT, len(body), body)
    raw = await deferToThread(exchange, router.proxy.bound_port, data)
    response = parse_response(raw)
    assert response is not None and response.status == 200, raw
    assert response.header("transfer-encoding") is None
    assert response.events()[-1] == "[DONE]"
