"""
The router reading its ModelRoutes, ModelServers and Pods from a (fake) Kubernetes API,
with simulated pods on loopback: resources appear and go within a second, a pod going
NotReady stops taking traffic within a second, an outage of the API keeps serving what
was last known (and says so in C{/debug/router/state} and the metrics), and the router
is not ready before the first list.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.internet.task import deferLater

from kthena.config.resources import KTHENA_API
from kthena.service import RouterService
from tests.integration.fake_kube import FakeKube, kubeconfig
from tests.integration.router_helpers import Cluster, chat_body, inline
from tests.unit.routerfixtures import pod, server, simple_route
from tests.unit.samples import sample_sum

CHAT = "/v1/chat/completions"
MODEL = "org/upstream"


def router_on(cluster: Cluster, tmp_path: Path, port: int, **kubernetes: Any) -> RouterService:
    settings = {"kubeconfig": kubeconfig(tmp_path / "kubeconfig", port), **kubernetes}
    return cluster.router([], kubernetes=settings, podMetrics={"interval": "0.1s"})


def serving(cluster: Cluster, fake: FakeKube) -> None:
    """A ModelServer, a route of C{client-model} to it, and one pod: a started simulator."""
    sim = cluster.sim(MODEL)
    fake.put(server("srv", {"app": "srv"}, MODEL))
    fake.put(simple_route("r", "client-model", "srv"))
    fake.put(pod("pod-0", "127.0.0.1", {"app": "srv"}, port=sim.listener.bound_port))


async def served(cluster: Cluster, fake: FakeKube, port: int, tmp_path: Path) -> RouterService:
    """L{serving}'s resources, a router reading them, once it routes to the pod."""
    serving(cluster, fake)
    router = router_on(cluster, tmp_path, port)
    await until(cluster, lambda: bool(router.store.pods), "the pod")
    return router


async def until(cluster: Cluster, predicate: Callable[[], bool], what: str) -> None:
    await cluster.wait_for(predicate, 1.0, what)


@inline
async def test_resources_come_and_go_with_the_cluster(
    cluster: Cluster, kube: tuple[FakeKube, int], tmp_path: Path
) -> None:
    fake, port = kube
    sim = cluster.sim(MODEL)
    router = router_on(cluster, tmp_path, port)
    records = Cluster.hook(router)
    await until(cluster, lambda: router.source is not None and router.source.synced, "a list")
    assert (await cluster.post(router, CHAT, chat_body("client-model"))).status == 404
    started = time.monotonic()
    fake.put(server("srv", {"app": "srv"}, MODEL))
    fake.put(simple_route("r", "client-model", "srv"))
    fake.put(pod("pod-0", "127.0.0.1", {"app": "srv"}, port=sim.listener.bound_port))
    await until(cluster, lambda: "default/pod-0" in router.store.pods, "the pod routed")
    assert time.monotonic() - started < 1.0
    await cluster.sleep(0.3)  # its first scrape
    assert (await cluster.post(router, CHAT, chat_body("client-model"))).status == 200
    assert records[-1].pod is not None and records[-1].pod.key == "default/pod-0"
    fake.delete(KTHENA_API, "modelroutes", "default", "r")
    await until(cluster, lambda: not router.store.resources.routes, "the route gone")
    reply = await cluster.post(router, CHAT, chat_body("client-model"))
    assert reply.status == 404


@inline
async def test_a_pod_going_not_ready_stops_taking_traffic(
    cluster: Cluster, kube: tuple[FakeKube, int], tmp_path: Path
) -> None:
    fake, port = kube
    sims = [cluster.sim(MODEL), cluster.sim(MODEL)]
    fake.put(server("srv", {"app": "srv"}, MODEL))
    fake.put(simple_route("r", "client-model", "srv"))
    for i, sim in enumerate(sims):
        fake.put(pod(f"pod-{i}", "127.0.0.1", {"app": "srv"}, port=sim.listener.bound_port))
    router = router_on(cluster, tmp_path, port)
    records = Cluster.hook(router)
    await until(cluster, lambda: len(router.store.pods) == 2, "both pods")
    await cluster.sleep(0.3)
    assert (await cluster.post(router, CHAT, chat_body("client-model"))).status == 200
    served = records[-1].pod
    assert served is not None
    index = int(served.name.rsplit("-", 1)[1])
    other = f"default/pod-{1 - index}"
    fake.put(pod(served.name, "127.0.0.1", {"app": "srv"},
                    port=sims[index].listener.bound_port, ready=False))  # fmt: skip
    await until(cluster, lambda: list(router.store.pods) == [other], f"{served.name} out")
    records.clear()
    for _ in range(6):
        assert (await cluster.post(router, CHAT, chat_body("client-model"))).status == 200
    assert {r.pod.key for r in records if r.pod is not None} == {other}


@inline
async def test_an_api_outage_keeps_serving_and_is_seen(
    cluster: Cluster, kube: tuple[FakeKube, int], tmp_path: Path
) -> None:
    fake, port = kube
    router = await served(cluster, fake, port, tmp_path)
    await cluster.sleep(0.3)
    fake.failing = 503
    fake.drop()
    source = router.source
    assert source is not None
    await cluster.wait_for(
        lambda: all(w.failing and "503" in (w.last_error or "") for w in source.status()),
        3.0,
        "every watch failing with the 503",
    )
    assert (await cluster.post(router, CHAT, chat_body("client-model"))).status == 200
    errors = sample_sum(router.registry, "kthena_router_resource_watch_errors_total")
    assert errors >= 3
    assert {w.kind for w in source.status()} == {"ModelRoute", "ModelServer", "Pod"}
    assert sample_sum(router.registry, "kthena_router_resource_last_sync_timestamp_seconds") > 0
    fake.failing = None
    await cluster.wait_for(
        lambda: not any(w.failing for w in source.status()),
        10.0,  # the backoff grew while the API was out
        "the watches back",
    )


@inline
async def test_not_ready_before_the_first_list(
    cluster: Cluster, kube: tuple[FakeKube, int], tmp_path: Path
) -> None:
    fake, port = kube
    fake.failing = 500
    router = router_on(cluster, tmp_path, port)
    await deferLater(cluster.reactor, 0.3, lambda: None)
    ready, why, _ = router.plane.readiness.check()
    assert not ready and "Kubernetes" in why
    assert (await cluster.request(router, "GET", "/readyz")).status == 503
    fake.failing = None
    await cluster.wait_for(lambda: router.plane.readiness.listed, 3.0, "the first list")


@inline
async def test_a_broken_cluster_object_is_left_out_and_the_rest_routes(
    cluster: Cluster, kube: tuple[FakeKube, int], tmp_path: Path
) -> None:
    fake, port = kube
    fake.put(simple_route("orphan", "other-model", "no-such-server"))
    broken = server("broken", {"app": "x"}, MODEL)
    broken["spec"]["inferenceEngine"] = "NotAnEngine"
    fake.put(broken)
    router = await served(cluster, fake, port, tmp_path)
    assert [r.meta.key for r in router.store.resources.routes] == ["default/r"]
    assert [s.meta.key for s in router.store.resources.servers] == ["default/srv"]
    await cluster.sleep(0.3)
    assert (await cluster.post(router, CHAT, chat_body("client-model"))).status == 200
