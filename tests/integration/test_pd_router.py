"""
Prefill/decode requests through a router to kthena-sim pods in prefill and decode roles,
seen by the official openai client, for vLLM's kv_transfer_params (nixl) and SGLang's
bootstrap rooms: the answer is the one an aggregated pod gives (streamed or not), and the
router's PD metrics and access-log fields count the legs each pod was sent.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import openai
import pytest
from twisted.internet.threads import deferToThread

from kthena.sim.engine import EngineConfig
from kthena.sim.pd import Role
from kthena.sim.service import SimConfig, SimService
from tests.integration.router_helpers import LOOPBACK, Cluster, inline
from tests.integration.test_exactness_openai import totals
from tests.unit.routerfixtures import pd_server, pod, simple_route

MODEL = "pd-model"
WORDS = "alpha beta gamma delta epsilon zeta eta theta"
ECHO = [" " + word for word in WORDS.split()]
HOSTS = {"nixl": ("127.0.0.51", "127.0.0.52"), "sglang": ("127.0.0.53", "127.0.0.54")}
"""Each connector's (prefill, decode) pod addresses; SGLang's bootstrap is prefill:8998."""


def pd_sim(cluster: Cluster, engine: str, role: Role, host: str) -> SimService:
    config = SimConfig(
        engine=engine,
        model="org/pd",
        listen=f"tcp:0:interface={host}",
        engine_config=EngineConfig(itl=0.001, prefill_per_token=0.0005),
        role=role,
        output_tokens=len(ECHO),
        bootstrap_listen=f"tcp:8998:interface={host}"
        if engine == "sglang" and role is Role.PREFILL
        else None,
        bootstrap_timeout=5.0,
        seed=0,
    )
    service = SimService(config, cluster.reactor)
    service.startService()
    cluster.sims.append(service)
    return service


def pd_resources(connector: str, prefill: SimService, decode: SimService) -> list[Any]:
    p_host, d_host = HOSTS[connector]
    labels = {"app": "pd", "group": "g1"}
    return [
        simple_route("pd", MODEL, "pd"),
        pd_server(
            "pd",
            "pd",
            "org/pd",
            engine="SGLang" if connector == "sglang" else "vLLM",
            kvConnector={"type": connector},
        ),
        pod("prefill-0", p_host, {**labels, "role": "prefill"}, port=prefill.listener.bound_port),
        pod("decode-0", d_host, {**labels, "role": "decode"}, port=decode.listener.bound_port),
    ]


@pytest.mark.parametrize("connector", sorted(HOSTS))
@inline
async def test_pd_answers_equal_aggregated_ones_and_every_count_is_exact(
    cluster: Cluster, tmp_path: Path, connector: str
) -> None:
    engine = "sglang" if connector == "sglang" else "vllm"
    p_host, d_host = HOSTS[connector]
    prefill = pd_sim(cluster, engine, Role.PREFILL, p_host)
    decode = pd_sim(cluster, engine, Role.DECODE, d_host)
    log_path = tmp_path / "access.log"
    router = cluster.router(
        pd_resources(connector, prefill, decode),
        observability={"accessLog": {"format": "json", "output": str(log_path)}},
    )
    client = openai.OpenAI(
        base_url=f"http://{LOOPBACK}:{router.proxy.bound_port}/v1", api_key="-", max_retries=0
    )
    messages: Any = [{"role": "user", "content": WORDS}]

    def traffic() -> tuple[Any, str, Any]:
        whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6)
        stream = client.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=6, stream=True
        )
        pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
        return whole, "".join(pieces), stream

    whole, streamed, _ = await deferToThread(traffic)
    assert whole.choices[0].message.content == "".join(ECHO[:6])
    assert streamed == "".join(ECHO[:6])
    assert whole.usage is not None and whole.usage.completion_tokens == 6

    legs = totals(router, "kthena_pd_group_requests_total", "role")
    assert legs == {"prefill": 2, "decode": 2}
    decisions = totals(router, "kthena_pd_group_routing_decisions", "group_key")
    assert decisions == {"g1": 2}
    assert totals(router, "kthena_router_requests_total", "status_code") == {"200": 2}

    await router.stopService()  # the access log is flushed
    lines = [json.loads(line) for line in log_path.read_text().splitlines()]
    assert [(r["prefill_pod"], r["selected_pod"]) for r in lines] == [
        ("prefill-0", "decode-0"),
        ("prefill-0", "decode-0"),
    ]
    assert all(r["output_tokens"] == 6 and r["duration_decode"] >= 0 for r in lines)
