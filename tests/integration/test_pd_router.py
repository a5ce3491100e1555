"""
Prefill/decode requests through a router to kthena-sim pods in prefill and decode roles,
seen by the official openai client, for every KV connector: the bodies each pod received
(from the simulator's C{/sim/requests} record), the answer an aggregated pod gives
(streamed or not), and the router's PD metrics and access-log fields exact against what
the pods did. Then what goes wrong: a client leaving during the prefill or the decode (the
pod sees its connection closed and stops), a failing prefill pod retried on the next
pair, and every pair failing (Kthena's 500).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import openai
import pytest
from twisted.internet.defer import CancelledError
from twisted.internet.threads import deferToThread

from kthena.errors import ErrorType
from kthena.service import RouterService
from kthena.sim.engine import EngineConfig
from kthena.sim.faults import Faults
from kthena.sim.pd import Role
from kthena.sim.service import SimConfig, SimService
from tests.integration.router_helpers import LOOPBACK, Cluster, inline, served
from tests.integration.test_exactness_openai import totals
from tests.unit.routerfixtures import pd_server, pod, simple_route

MODEL = "pd-model"
WORDS = "alpha beta gamma delta epsilon zeta eta theta"
ECHO = [" " + word for word in WORDS.split()]
CHAT = "/v1/chat/completions"
BLOCK = 16  # the simulators' and the server's KV block size
BYTES_PER_TOKEN = 12288
CONNECTORS = ("http", "lmcache", "mooncake", "nixl", "sglang")
PRODUCER = {"do_remote_decode": True, "do_remote_prefill": False}


def hosts(n: int) -> list[str]:
    """Pod addresses of test C{n} (its own, so that SGLang's bootstrap ports never meet)."""
    return [f"127.0.{50 + n}.{i}" for i in range(1, 4)]


def pd_sim(
    cluster: Cluster,
    engine: str,
    role: Role,
    host: str,
    *,
    itl: float = 0.001,
    prefill_per_token: float = 0.0005,
    output_tokens: int = len(ECHO),
    faults: Faults | None = None,
) -> SimService:
    config = SimConfig(
        engine=engine,
        model="org/pd",
        listen=f"tcp:0:interface={host}",
        engine_config=EngineConfig(itl=itl, prefill_per_token=prefill_per_token),
        role=role,
        output_tokens=output_tokens,
        bootstrap_listen=f"tcp:8998:interface={host}"
        if engine == "sglang" and role is Role.PREFILL
        else None,
        bootstrap_timeout=5.0,
        seed=0,
        faults=faults or Faults(),
    )
    service = SimService(config, cluster.reactor)
    service.startService()
    cluster.sims.append(service)
    return service


def pd_router(
    cluster: Cluster,
    connector: str,
    prefills: dict[str, SimService],
    decodes: dict[str, SimService],
    **settings: Any,
) -> RouterService:
    """A router with one PD server (group g1) over the named prefill and decode sims."""
    labels = {"app": "pd", "group": "g1"}
    retry = settings.pop("retry", None)
    docs = [
        simple_route("pd", MODEL, "pd"),
        pd_server(
            "pd",
            "pd",
            "org/pd",
            engine="SGLang" if connector == "sglang" else "vLLM",
            kvConnector={"type": connector, "blockSize": BLOCK, "bytesPerToken": BYTES_PER_TOKEN},
            **({"trafficPolicy": {"retry": retry}} if retry else {}),
        ),
    ]
    for role, sims in (("prefill", prefills), ("decode", decodes)):
        for name, sim in sims.items():
            host = (sim.config.listen or "").split("interface=")[1]
            docs.append(pod(name, host, {**labels, "role": role}, port=sim.listener.bound_port))
    return cluster.router(docs, **settings)


def engine_of(connector: str) -> str:
    return "sglang" if connector == "sglang" else "vllm"


def bodies(sim: SimService) -> list[dict[str, Any]]:
    """The JSON bodies of the generation requests C{sim} received, oldest first."""
    return [entry["body"] for entry in sim.api.received]  # type: ignore[misc]


def sample(router: RouterService, name: str, **labels: str) -> float | None:
    return router.registry.get_sample_value(name, labels)


def blocks_of(prompt_tokens: int) -> int:
    return -(-prompt_tokens // BLOCK)


@pytest.mark.parametrize("connector", CONNECTORS)
@inline
async def test_pd_answers_equal_aggregated_ones_and_every_count_is_exact(
    cluster: Cluster, tmp_path: Path, connector: str
) -> None:
    n = CONNECTORS.index(connector)
    p_host, d_host, _ = hosts(n)
    prefill = pd_sim(cluster, engine_of(connector), Role.PREFILL, p_host)
    decode = pd_sim(cluster, engine_of(connector), Role.DECODE, d_host)
    log_path = tmp_path / "access.log"
    router = pd_router(
        cluster,
        connector,
        {"prefill-0": prefill},
        {"decode-0": decode},
        observability={"accessLog": {"format": "json", "output": str(log_path)}},
    )
    client = openai.OpenAI(
        base_url=f"http://{LOOPBACK}:{router.proxy.bound_port}/v1", api_key="-", max_retries=0
    )
    messages: Any = [{"role": "user", "content": WORDS}]

    def traffic() -> tuple[Any, str]:
        whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6)
        stream = client.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=6, stream=True
        )
        pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
        return whole, "".join(pieces)

    whole, streamed = await deferToThread(traffic)
    assert whole.choices[0].message.content == "".join(ECHO[:6])
    assert streamed == "".join(ECHO[:6])
    assert whole.usage is not None and whole.usage.completion_tokens == 6
    prompt_tokens = whole.usage.prompt_tokens

    # What each pod received.
    sent = {"model": "org/pd", "messages": messages}
    prefill_bodies, decode_bodies = bodies(prefill), bodies(decode)
    assert len(prefill_bodies) == len(decode_bodies) == 2
    for body in prefill_bodies:  # one token, not streamed, the client's prompt
        assert body["max_tokens"] == 1 and "stream" not in body and "stream_options" not in body
        assert body["messages"] == messages
    assert decode_bodies[0]["max_tokens"] == 6 and "stream" not in decode_bodies[0]
    assert decode_bodies[1]["stream"] is True
    if connector in ("http", "lmcache"):  # the client's request, as it sent it
        assert decode_bodies[0] == {**sent, "max_tokens": 6}
        assert all(set(b) == {"model", "messages", "max_tokens"} for b in prefill_bodies)
    elif connector in ("nixl", "mooncake"):  # vLLM's kv_transfer_params round trip
        assert all(b["kv_transfer_params"] == PRODUCER for b in prefill_bodies)
        n_blocks = blocks_of(prompt_tokens)
        for i, body in enumerate(decode_bodies):  # the ids the prefill pod handed out
            params = body["kv_transfer_params"]
            assert params["do_remote_prefill"] is True and params["do_remote_decode"] is False
            assert params["remote_block_ids"] == list(range(i * n_blocks, (i + 1) * n_blocks))
    else:  # SGLang: one room per request on both legs, the prefill pod as host
        rooms = []
        for p_body, d_body in zip(prefill_bodies, decode_bodies, strict=True):
            assert p_body["bootstrap_host"] == d_body["bootstrap_host"] == p_host
            assert p_body["bootstrap_room"] == d_body["bootstrap_room"]
            rooms.append(p_body["bootstrap_room"])
        assert len(set(rooms)) == 2

    # The router's counts, against what the pods did.
    assert served(prefill) == served(decode) == 2
    assert totals(router, "kthena_pd_group_requests_total", "role") == {"prefill": 2, "decode": 2}
    assert totals(router, "kthena_pd_group_routing_decisions", "source_role") == {"prefill": 2}
    assert totals(router, "kthena_router_requests_total", "status_code") == {"200": 2}
    ops = totals(router, "kthena_kv_cache_operations_total", "status")
    assert ops == {"success": 2}
    moved = 2 * blocks_of(prompt_tokens) * BLOCK * BYTES_PER_TOKEN
    for direction in ("send", "receive"):
        name = "kthena_kv_cache_transfer_bytes_total"
        assert sample(router, name, connector_type=connector, direction=direction) == moved
    count = "kthena_kv_cache_latency_seconds_count"
    assert sample(router, count, connector_type=connector, operation="prefill") == 2
    for phase in ("prefill", "decode"):
        name = f"kthena_router_request_{phase}_duration_seconds_count"
        assert sample(router, name, model=MODEL, path=CHAT, status_code="200") == 2

    await router.stopService()  # the access log is flushed
    lines = [json.loads(line) for line in log_path.read_text().splitlines()]
    assert [(r["prefill_pod"], r["selected_pod"]) for r in lines] == [
        ("prefill-0", "decode-0"),
        ("prefill-0", "decode-0"),
    ]
    assert all(r["output_tokens"] == 6 and r["input_tokens"] == prompt_tokens for r in lines)
    assert all(r["duration_prefill"] >= 0 and r["duration_decode"] >= 0 for r in lines)


LONG = [{"role": "user", "content": " ".join([WORDS] * 10)}]  # 80 words: a slow prefill


@pytest.mark.parametrize("connector", ["nixl", "sglang"])
@inline
async def test_a_client_leaving_during_the_prefill_stops_the_legs_in_flight(
    cluster: Cluster, connector: str
) -> None:
    p_host, d_host, _ = hosts(5 + ("nixl", "sglang").index(connector))
    engine = engine_of(connector)
    prefill = pd_sim(cluster, engine, Role.PREFILL, p_host, prefill_per_token=0.05)  # 4 s
    decode = pd_sim(cluster, engine, Role.DECODE, d_host)
    router = pd_router(cluster, connector, {"prefill-0": prefill}, {"decode-0": decode})
    records = Cluster.hook(router)
    body = {"model": MODEL, "messages": LONG, "max_tokens": 4}
    request = cluster._send(router, "POST", CHAT, body, None, False)
    request.addErrback(lambda f: f.trap(CancelledError))
    await cluster.wait_for(
        lambda: prefill.engine.num_running == 1, timeout=3, what="the prefill to start"
    )
    request.cancel()  # the client hangs up
    await cluster.wait_for(
        lambda: prefill.engine.num_running == 0 and not router.plane.inflight,
        timeout=3,
        what="the prefill pod to see its connection closed",
    )
    assert served(prefill) == 0  # stopped, not completed
    assert served(decode) == 0
    [record] = records
    assert record.error_type is ErrorType.CLIENT_DISCONNECT
    if connector == "nixl":  # the decode leg was never sent
        assert bodies(decode) == []
        assert [leg.role for leg in record.legs or ()] == ["prefill"]
    else:  # SGLang's decode leg waited beside it, and was closed too
        assert len(bodies(decode)) == 1
        assert [leg.role for leg in record.legs or ()] == ["prefill", "decode"]
    assert all(leg.status is None for leg in record.legs or ())
    assert all(p.in_flight == 0 for p in router.store.pods.values())


@inline
async def test_a_client_leaving_during_the_decode_stops_the_decode_pod(
    cluster: Cluster,
) -> None:
    p_host, d_host, _ = hosts(7)
    prefill = pd_sim(cluster, "vllm", Role.PREFILL, p_host)
    decode = pd_sim(cluster, "vllm", Role.DECODE, d_host, itl=0.05, output_tokens=400)
    router = pd_router(cluster, "nixl", {"prefill-0": prefill}, {"decode-0": decode})
    records = Cluster.hook(router)
    body = {"model": MODEL, "messages": LONG, "stream": True, "max_tokens": 400}
    reply = await cluster.stream(router, CHAT, body, hang_up_after=2)
    assert len(reply.token_times()) == 2
    await cluster.wait_for(
        lambda: decode.engine.num_running == 0 and not router.plane.inflight,
        timeout=3,
        what="the decode pod to see its connection closed",
    )
    assert served(prefill) == 1 and served(decode) == 0  # the decode stopped, not completed
    [record] = records
    assert record.error_type is ErrorType.CLIENT_DISCONNECT
    assert [(leg.role, leg.status) for leg in record.legs or ()] == [
        ("prefill", 200),
        ("decode", 200),
    ]
    assert all(p.in_flight == 0 for p in router.store.pods.values())


@inline
async def test_a_failing_prefill_pod_is_retried_on_the_next_pair(cluster: Cluster) -> None:
    bad_host, good_host, d_host = hosts(8)
    failing = Faults(error_rate=1.0, error_status=500)
    bad = pd_sim(cluster, "vllm", Role.PREFILL, bad_host, faults=failing)
    good = pd_sim(cluster, "vllm", Role.PREFILL, good_host)
    decode = pd_sim(cluster, "vllm", Role.DECODE, d_host)
    router = pd_router(
        cluster,
        "nixl",
        {"prefill-bad": bad, "prefill-good": good},
        {"decode-0": decode},
        retry={"attempts": 2, "retryInterval": "0s"},
    )
    records = Cluster.hook(router)
    body = {"model": MODEL, "messages": [{"role": "user", "content": WORDS}], "max_tokens": 2}
    for _ in range(20):  # ties are broken at random: until the failing pod came first
        reply = await cluster.post(router, CHAT, body)
        assert reply.status == 200
        if bodies(bad):
            break
    assert len(bodies(bad)) == 1, "the failing prefill pod was never tried"
    legs = [(leg.pod, leg.status) for leg in records[-1].legs or ()]
    assert legs == [("prefill-bad", 500), ("prefill-good", 200), ("decode-0", 200)]
    ops = totals(router, "kthena_kv_cache_operations_total", "status")
    assert ops == {"failure": 1, "success": len(records)}
    assert totals(router, "kthena_pd_group_routing_decisions", "group_key") == {
        "g1": len(records) + 1
    }
    assert served(decode) == len(records) and len(bodies(decode)) == len(records)


@inline
async def test_every_pair_failing_is_kthenas_500(cluster: Cluster) -> None:
    p_host, d_host, _ = hosts(9)
    failing = Faults(error_rate=1.0, error_status=503)
    prefill = pd_sim(cluster, "vllm", Role.PREFILL, p_host, faults=failing)
    decode = pd_sim(cluster, "vllm", Role.DECODE, d_host)
    router = pd_router(
        cluster,
        "nixl",
        {"prefill-0": prefill},
        {"decode-0": decode},
        retry={"attempts": 2, "retryInterval": "0s"},
    )
    body = {"model": MODEL, "messages": [{"role": "user", "content": WORDS}]}
    reply = await cluster.post(router, CHAT, body)
    assert reply.status == 500
    assert reply.json()["error"]["message"].startswith("all prefill/decode pairs failed")
    assert len(bodies(prefill)) == 3 and bodies(decode) == []  # the first try and 2 retries
    assert totals(router, "kthena_kv_cache_operations_total", "status") == {"failure": 3}
    assert totals(router, "kthena_router_requests_total", "status_code") == {"500": 1}
