"""
The router's metrics tell the truth: after N requests, the request counters and
histogram counts are N; the token counters equal what the pods reported; the in-flight
gauges return to zero; a retried request counts once; error paths count under their
error_type.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from kthena.config.router import parse_config
from kthena.service import RouterService
from tests.integration.router_helpers import (
    Cluster,
    chat_body,
    closed_port,
    completion_body,
    inline,
    sim_sample,
)
from tests.unit.routerfixtures import Doc, route, server, simple_route

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"


def samples(router: RouterService) -> list[tuple[str, dict[str, str], float]]:
    text = generate_latest(router.registry).decode()
    return [
        (s.name, s.labels, s.value)
        for family in text_string_to_metric_families(text)
        for s in family.samples
    ]


def total(router: RouterService, name: str, **labels: str) -> float:
    return sum(
        value
        for sample, got, value in samples(router)
        if sample == name and all(got.get(k) == v for k, v in labels.items())
    )


def by_label(router: RouterService, name: str, label: str) -> Counter[str]:
    counts: Counter[str] = Counter()
    for sample, got, value in samples(router):
        if sample == name:
            counts[got[label]] += int(value)
    return counts


def resources(cluster: Cluster, fast: list[Any], slow: Any) -> list[Doc]:
    return [
        simple_route("fast", "fast-model", "fast"),
        route(
            "slow",
            {
                "modelName": "slow-model",
                "rules": [{"targetModels": [{"modelServerName": "slow"}]}],
            },
        ),
        server("fast", {"app": "fast"}, model="org/fast"),
        server("slow", {"app": "slow"}, model="org/slow", trafficPolicy={"timeout": "200ms"}),
        *(cluster.pod(f"fast-{i}", sim, {"app": "fast"}) for i, sim in enumerate(fast)),
        cluster.pod("fast-dead", closed_port(), {"app": "fast"}),
        cluster.pod("slow-0", slow, {"app": "slow"}),
    ]


@inline
async def test_counters_histograms_and_tokens_add_up(cluster: Cluster) -> None:
    fast = [cluster.sim("org/fast", output_tokens=5) for _ in range(2)]
    slow = cluster.sim("org/slow", prefill_per_token=0.05)  # seconds before the first token
    router = cluster.router(resources(cluster, fast, slow))

    # Successful traffic: plain and streamed, chat and completions, some of it retried
    # past the dead pod (each request must count once).
    ok = 0
    for i in range(12):
        if i % 3 == 0:
            reply = await cluster.post(router, CHAT, chat_body("fast-model", max_tokens=3))
            assert reply.status == 200
        elif i % 3 == 1:
            stream = await cluster.stream(router, CHAT, chat_body("fast-model", stream=True))
            assert stream.status == 200 and stream.done
        else:
            stream = await cluster.stream(
                router, COMPLETIONS, completion_body("fast-model", stream=True, max_tokens=4)
            )
            assert stream.status == 200 and stream.done
        ok += 1
    prompt = sum(sim_sample(s, "vllm:prompt_tokens_total") for s in fast)
    generated = sum(sim_sample(s, "vllm:generation_tokens_total") for s in fast)
    assert prompt > 0 and generated > 0
    assert total(router, "kthena_router_tokens_total", token_type="input") == prompt
    assert total(router, "kthena_router_tokens_total", token_type="output") == generated
    assert total(router, "kthena_router_requests_total") == ok
    assert total(router, "kthena_router_requests_total", model="fast-model") == ok
    assert total(router, "kthena_router_request_duration_seconds_count") == ok

    # Error paths: each counted once, under its error_type.
    assert (await cluster.post(router, CHAT, chat_body("nobody"))).status == 404
    assert (await cluster.request(router, "POST", CHAT, b"{not json")).status == 400
    assert (await cluster.post(router, CHAT, chat_body("slow-model"))).status == 504
    cut = await cluster.stream(
        router, CHAT, chat_body("fast-model", stream=True, max_tokens=400), hang_up_after=2
    )
    assert not cut.done
    await cluster.wait_for(lambda: not router.plane.inflight, 5, "the cut call to end")
    errors = by_label(router, "kthena_router_requests_total", "error_type")
    assert errors == {
        "successful_request": ok,
        "route_not_found": 1,
        "prompt_parsing": 1,
        "timeout": 1,
        "client_disconnect": 1,
    }
    statuses = by_label(router, "kthena_router_requests_total", "status_code")
    assert statuses["404"] == 1 and statuses["400"] == 1 and statuses["504"] == 1
    models = by_label(router, "kthena_router_requests_total", "model")
    assert models["unknown"] == 2  # the unknown model and the unparsable body
    assert total(router, "kthena_router_request_duration_seconds_count") == ok + 4

    # Nothing is left in flight.
    await cluster.wait_for(
        lambda: total(router, "kthena_router_active_upstream_requests") == 0, 5, "upstream 0"
    )
    assert total(router, "kthena_router_active_downstream_requests") == 0
    assert all(pod.in_flight == 0 for pod in router.store.pods.values())


@inline
async def test_labels_stay_bounded(cluster: Cluster) -> None:
    sim = cluster.sim("org/fast")
    router = cluster.router(
        [
            simple_route("fast", "fast-model", "fast"),
            server("fast", {"app": "fast"}),
            cluster.pod("fast-0", sim, {"app": "fast"}),
        ]
    )
    await cluster.post(router, CHAT, chat_body("fast-model"))
    for i in range(20):
        await cluster.post(router, CHAT, chat_body(f"made-up-{i}"))
        await cluster.post(router, f"/v1/made/up/{i}", chat_body("fast-model"))
        await cluster.request(router, "GET", f"/v1/models/made-up-{i}")
    models = set(by_label(router, "kthena_router_requests_total", "model"))
    paths = set(by_label(router, "kthena_router_requests_total", "path"))
    assert models == {"unknown", "fast-model"}
    assert paths == {CHAT, "other", "/v1/models/{model}"}


@inline
async def test_series_of_a_removed_route_go_away_on_reload(cluster: Cluster) -> None:
    sim = cluster.sim("org/fast")
    docs = [
        simple_route("fast", "fast-model", "fast"),
        simple_route("gone", "gone-model", "fast"),
        server("fast", {"app": "fast"}, model="org/fast"),
        cluster.pod("fast-0", sim, {"app": "fast"}),
    ]
    router = cluster.router(docs)
    assert (await cluster.post(router, CHAT, chat_body("gone-model"))).status == 200
    assert (await cluster.post(router, CHAT, chat_body("fast-model"))).status == 200
    assert present(router, "kthena_router_requests_total", model="gone-model")
    assert present(router, "kthena_router_active_upstream_requests", model_route="default/gone")
    kept = [d for d in docs if d["metadata"]["name"] != "gone"]
    router.reconfigure(parse_config({"resources": kept}, "<reloaded>", Path.cwd(), []))
    assert not present(router, "kthena_router_requests_total", model="gone-model")
    assert not present(router, "kthena_router_tokens_total", model="gone-model")
    assert not present(router, "kthena_router_active_upstream_requests", model_route="default/gone")
    assert present(router, "kthena_router_active_upstream_requests", model_route="default/fast")


def present(router: RouterService, name: str, **labels: str) -> bool:
    return any(
        sample == name and all(got.get(k) == v for k, v in labels.items())
        for sample, got, _ in samples(router)
    )
