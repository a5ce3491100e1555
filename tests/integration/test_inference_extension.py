"""
The Gateway API Inference Extension through real requests: HTTPRoutes attached to the
router's Gateway listener send what no ModelRoute takes to InferencePools of simulated
pods on loopback, the router's scheduler picks the pool's pod, InferenceModelRewrites
rename the model, the access log and the metrics name the pool (with model labels that a
client cannot multiply), and the same objects read from a (fake) Kubernetes API come and
go within a second.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from kthena.observability.records import format_json
from kthena.service import RouterService
from tests.integration.fake_kube import FakeKube, kubeconfig
from tests.integration.router_helpers import Cluster, assert_error_object, chat_body, inline
from tests.unit.routerfixtures import (
    Doc,
    http_route,
    inference_pool,
    model_rewrite,
    pool_ref,
    server,
    simple_route,
)
from tests.unit.samples import sample_sum

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
MODEL = "org/pool-model"
GATEWAY = {"name": "default/gw", "listener": "http"}


def pooled(cluster: Cluster, name: str, app: str, count: int = 2) -> list[Doc]:
    """An InferencePool of C{count} simulated pods labelled C{app}."""
    docs = [inference_pool(name, {"app": app})]
    for i in range(count):
        docs.append(cluster.pod(f"{app}-{i}", cluster.sim(MODEL), {"app": app}))
    return docs


def routes_to_pools() -> Doc:
    """Chat to pool C{chat}, completions (exactly) to pool C{text}, a dead rule's path."""
    return http_route(
        "inference",
        "gw",
        [
            {"matches": [{"path": {"type": "PathPrefix", "value": "/v1/chat"}}],
             "backendRefs": [pool_ref("chat")]},
            {"matches": [{"path": {"type": "Exact", "value": COMPLETIONS}}],
             "backendRefs": [pool_ref("text")]},
            {"name": "drained", "matches": [{"path": {"type": "Exact", "value": "/v1/embeddings"}}],
             "backendRefs": [pool_ref("chat", weight=0)]},
        ],
        hostnames=["llm.example.com"],
    )  # fmt: skip


def completion(model: str) -> dict[str, Any]:
    return {"model": model, "prompt": "alpha beta", "max_tokens": 4}


HOST = {"host": "llm.example.com"}
REWRITE = {"matches": [{"model": {"value": "friendly"}}], "targets": [{"modelRewrite": MODEL}]}


@inline
async def test_an_http_route_sends_requests_to_its_pools(cluster: Cluster) -> None:
    registry = CollectorRegistry()
    resources = [
        *pooled(cluster, "chat", "chat"),
        *pooled(cluster, "text", "text", 1),
        routes_to_pools(),
        model_rewrite("alias", "chat", [REWRITE]),
    ]
    router = cluster.router(resources, registry, gateway=GATEWAY, podMetrics={"interval": "0.1s"})
    records = Cluster.hook(router)
    await cluster.sleep(0.3)  # the first scrape
    reply = await cluster.post(router, CHAT, chat_body(MODEL), HOST)
    assert reply.status == 200, reply.body
    # The router's own scheduler ranked the pool's pods (both of them, with their scores).
    decision = records[-1].decision
    assert decision is not None
    assert sorted(p.key for p in decision.candidates) == ["default/chat-0", "default/chat-1"]
    assert records[-1].pod == decision.candidates[0]
    # The rewrite renames the model: the pod serves only MODEL, and answers 200.
    reply = await cluster.post(router, CHAT, chat_body("friendly"), HOST)
    assert reply.status == 200, reply.body
    assert records[-1].match is not None and records[-1].match.upstream_model("friendly") == MODEL
    logged = json.loads(format_json(records[-1]))
    assert (logged["gateway"], logged["http_route"], logged["inference_pool"]) == (
        "default/gw", "default/inference", "default/chat"
    )  # fmt: skip
    assert logged["backend_type"] == "inference_pool" and "model_server" not in logged
    assert logged["upstream_model"] == MODEL and logged["model_name"] == "friendly"
    # Completions go to the other pool; only an exact path does.
    reply = await cluster.post(router, COMPLETIONS, completion(MODEL), HOST)
    assert reply.status == 200 and records[-1].pod is not None
    assert records[-1].pod.key == "default/text-0"
    # A rule whose only pool has weight 0 takes the request and has nowhere to send it.
    reply = await cluster.post(router, "/v1/embeddings", {"model": MODEL, "input": "x"}, HOST)
    assert_error_object(reply.json(), 500, "inference_pool_selection")
    # Another host: no HTTPRoute takes it, and no ModelRoute.
    reply = await cluster.post(router, CHAT, chat_body(MODEL), {"host": "other.example.com"})
    assert_error_object(reply.json(), 404, "route_not_found")
    # A pool takes any model name; the metrics do not make a series of each.
    for i in range(5):
        await cluster.post(router, CHAT, chat_body(f"made-up-{i}"), HOST)
    requests = "kthena_router_requests_total"
    assert sample_sum(registry, requests, model="friendly", status_code="200") == 1
    assert sample_sum(registry, requests, model="unknown", status_code="404") == 6
    leaked = {
        s.name
        for family in registry.collect()
        for s in family.samples
        if any(value.startswith("made-up") for value in s.labels.values())
    }
    assert leaked == set()


@inline
async def test_model_routes_come_first_and_pools_need_the_gateway(cluster: Cluster) -> None:
    resources = [
        *pooled(cluster, "chat", "chat", 1),
        inference_pool("text", {"app": "text"}),
        routes_to_pools(),
        server("srv", {"app": "chat"}, MODEL),
        simple_route("r", "routed", "srv"),
    ]
    router = cluster.router(resources, gateway=GATEWAY)
    records = Cluster.hook(router)
    assert (await cluster.post(router, CHAT, chat_body("routed"), HOST)).status == 200
    match = records[-1].match
    assert match is not None and (match.model_route, match.inference_pool) == ("default/r", None)
    assert (await cluster.post(router, CHAT, chat_body(MODEL), HOST)).status == 200
    match = records[-1].match
    assert match is not None and (match.model_route, match.inference_pool) == (
        None, "default/chat"
    )  # fmt: skip
    # A pool without a pod answers 503 (and the router stays ready for the rest).
    reply = await cluster.post(router, COMPLETIONS, completion(MODEL), HOST)
    assert_error_object(reply.json(), 503, "pod_discovery")
    assert (await cluster.request(router, "GET", "/readyz")).status == 200
    # Through no Gateway (no `gateway` in the config) an HTTPRoute takes nothing.
    bare = cluster.router(resources)
    reply = await cluster.post(bare, CHAT, chat_body(MODEL), HOST)
    assert_error_object(reply.json(), 404, "route_not_found")


async def listed(
    cluster: Cluster, api: int, tmp_path: Path, **settings: Any
) -> tuple[RouterService, set[str]]:
    """A router reading the Inference Extension's kinds from the fake API at C{api},
    once it listed every kind; and the kinds it reads."""
    kubernetes = {"kubeconfig": kubeconfig(tmp_path / "kubeconfig", api),
                  "inferenceExtension": True}  # fmt: skip
    router = cluster.router([], kubernetes=kubernetes, **settings)
    await cluster.wait_for(
        lambda: router.source is not None and router.source.synced, 1.0, "a list of every kind"
    )
    assert router.source is not None
    return router, {w.kind for w in router.source.status()}


@inline
async def test_pools_and_http_routes_come_and_go_with_the_cluster(
    cluster: Cluster, kube: tuple[FakeKube, int], tmp_path: Path
) -> None:
    fake, port = kube
    router, kinds = await listed(cluster, port, tmp_path, gateway=GATEWAY)
    assert {"InferencePool", "HTTPRoute", "InferenceModelRewrite"} <= kinds
    assert (await cluster.post(router, CHAT, chat_body(MODEL), HOST)).status == 404
    started = time.monotonic()
    records = Cluster.hook(router)
    pools = (*pooled(cluster, "chat", "chat", 1), *pooled(cluster, "text", "text", 1))
    for doc in (*pools, routes_to_pools()):
        fake.put(doc)
    await cluster.wait_for(
        lambda: bool(router.store.resources.httproutes) and len(router.store.pods) == 2,
        1.0,
        "the route and its pools",
    )
    assert time.monotonic() - started < 1.0
    assert (await cluster.post(router, CHAT, chat_body(MODEL), HOST)).status == 200
    assert records[-1].pod is not None and records[-1].pod.key == "default/chat-0"
    # The HTTPRoute changes: chat goes to the other pool within a second.
    changed = routes_to_pools()
    changed["spec"]["rules"][0]["backendRefs"] = [pool_ref("text")]
    started = time.monotonic()
    fake.put(changed)
    await cluster.wait_for(
        lambda: router.store.resources.httproutes[0].rules[0].backends[0].name == "text",
        1.0,
        "the changed HTTPRoute",
    )
    assert time.monotonic() - started < 1.0
    assert (await cluster.post(router, CHAT, chat_body(MODEL), HOST)).status == 200
    assert records[-1].pod is not None and records[-1].pod.key == "default/text-0"
    fake.delete("gateway.networking.k8s.io/v1", "httproutes", "default", "inference")
    await cluster.wait_for(lambda: not router.store.resources.httproutes, 1.0, "the HTTPRoute gone")
    assert (await cluster.post(router, CHAT, chat_body(MODEL), HOST)).status == 404


@inline
async def test_each_target_port_of_a_pod_is_an_endpoint(cluster: Cluster) -> None:
    ranks = [cluster.sim(MODEL), cluster.sim(MODEL)]
    ports = [sim.listener.bound_port for sim in ranks]
    pod = cluster.pod("ranked", ports[0], {"app": "ranks"})
    del pod["metadata"]["annotations"]  # the pool's ports, not the pod's own
    resources = [
        inference_pool("ranks", {"app": "ranks"}, *ports),
        pod,
        http_route("all", "gw", [{"backendRefs": [pool_ref("ranks")]}]),
    ]
    router = cluster.router(resources, gateway=GATEWAY, podMetrics={"interval": "0.1s"})
    records = Cluster.hook(router)
    await cluster.sleep(0.3)  # the first scrape of both
    assert sorted(router.store.pods) == ["default/ranked", f"default/ranked:{ports[1]}"]
    for i in range(6):
        body = chat_body(MODEL, text=f"prompt {i} " * 40)  # no prefix shared
        assert (await cluster.post(router, CHAT, body, HOST)).status == 200
    decision = records[-1].decision
    assert decision is not None and sorted(p.port for p in decision.candidates) == sorted(ports)
    assert {r.pod.port for r in records if r.pod is not None} <= set(ports)
    # Both endpoints were scraped on their own port and judged healthy.
    assert all(router.plane.health.pod(e) for e in router.store.pods.values())
