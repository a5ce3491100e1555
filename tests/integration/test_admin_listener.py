"""
The admin listener on real loopback sockets, beside a router proxying to a simulated pod:
/metrics after a request, the request in /debug/routing/decisions, rendering off the
reactor thread, debug on a port of its own (the demo's layout with a separate debug
port), and the listeners closing with the router.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from typing import Any

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers

from kthena.service import RouterService
from tests.integration.router_helpers import (
    ADMIN_LISTEN,
    LOOPBACK,
    Cluster,
    chat_body,
    inline,
)
from tests.unit.routerfixtures import Doc, server, simple_route

CHAT = "/v1/chat/completions"
UPSTREAM = "org/admin-upstream"


class _Body(Protocol):
    def __init__(self) -> None:
        self.done: Deferred[bytes] = Deferred()
        self.parts: list[bytes] = []

    def dataReceived(self, data: bytes) -> None:
        self.parts.append(data)

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:  # noqa: B008
        if reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(b"".join(self.parts))
        else:
            self.done.errback(reason)


async def fetch(
    cluster: Cluster, router: RouterService, path: str, listener: str = "admin", **headers: str
) -> tuple[int, Headers, bytes]:
    service = router.admin.service(listener)
    assert service is not None, listener
    url = f"http://{LOOPBACK}:{service.bound_port}{path}".encode()
    h = Headers({k.replace("_", "-"): [v] for k, v in headers.items()})
    d = cluster.agent.request(b"GET", url, h)
    d.addTimeout(10, cluster.reactor)
    response = await d
    body = _Body()
    response.deliverBody(body)
    return response.code, response.headers, await body.done


async def fetch_json(
    cluster: Cluster, router: RouterService, path: str, listener: str = "admin"
) -> Any:
    status, headers, body = await fetch(cluster, router, path, listener)
    assert status == 200, body
    assert headers.getRawHeaders("content-type") == ["application/json"]
    return json.loads(body)


def resources(cluster: Cluster, port: int) -> list[Doc]:
    return [
        simple_route("client", "client-model", "srv"),
        server("srv", {"app": "srv"}, UPSTREAM),
        cluster.pod("pod-0", port, {"app": "srv"}),
    ]


@inline
async def test_a_proxied_request_shows_in_metrics_and_decisions(cluster: Cluster) -> None:
    sim = cluster.sim(UPSTREAM)
    router = cluster.router(resources(cluster, sim.listener.bound_port))
    reply = await cluster.post(router, CHAT, chat_body("client-model"), {"x-request-id": "adm-1"})
    assert reply.status == 200, reply.body

    status, headers, body = await fetch(cluster, router, "/metrics")
    assert status == 200
    assert headers.getRawHeaders("content-type") == ["text/plain; version=0.0.4; charset=utf-8"]
    samples = [
        s
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
        if s.name == "kthena_router_requests_total"
    ]
    assert [(s.labels, s.value) for s in samples] == [
        (
            {
                "model": "client-model",
                "path": CHAT,
                "status_code": "200",
                "error_type": "successful_request",
            },
            1.0,
        )
    ]

    decisions = (await fetch_json(cluster, router, "/debug/routing/decisions"))["decisions"]
    assert decisions[0]["request_id"] == "adm-1"
    assert (decisions[0]["chosen"], decisions[0]["status"]) == ("pod-0", 200)
    assert decisions[0]["route"] == "default/client"

    state = await fetch_json(cluster, router, "/debug/router/state")
    admin = router.admin.service("admin")
    assert admin is not None
    assert [(x["name"], x["endpoint"], x["port"]) for x in state["listeners"]] == [
        ("proxy", "tcp:0:interface=127.0.0.1", router.proxy.bound_port),
        ("admin", ADMIN_LISTEN, admin.bound_port),
    ]
    assert state["active_requests"]["total"] == 0
    (pool,) = state["upstream"]["pools"]
    assert pool["idle_connections"] == 1  # the keep-alive connection to the pod, pooled
    backends = (await fetch_json(cluster, router, "/debug/routing/backends"))["backends"]
    assert [(b["pod"], b["serving"], b["failures"]) for b in backends] == [
        ("default/pod-0", True, 0)
    ]


@inline
async def test_openmetrics_on_the_wire(cluster: Cluster) -> None:
    router = cluster.router([])
    status, headers, body = await fetch(
        cluster, router, "/metrics", accept="application/openmetrics-text; version=1.0.0"
    )
    assert status == 200
    (content_type,) = headers.getRawHeaders("content-type") or [""]
    assert content_type.startswith("application/openmetrics-text; version=1.0.0")
    assert body.endswith(b"# EOF\n")


class ThreadSpy(Collector):
    def __init__(self) -> None:
        self.threads: list[int] = []

    def collect(self) -> Iterator[Metric]:
        self.threads.append(threading.get_ident())
        yield GaugeMetricFamily("kthena_test_spy", "which thread renders", value=1)


@inline
async def test_scrapes_render_on_the_reactor_thread(cluster: Cluster) -> None:
    """Collectors are called on the reactor thread (in slices: see the unit tests), so a
    collector may read reactor-owned state without a lock."""
    router = cluster.router([])
    spy = ThreadSpy()
    router.registry.register(spy)
    status, _, body = await fetch(cluster, router, "/metrics")
    assert status == 200
    assert b"kthena_test_spy 1.0" in body
    assert set(spy.threads) == {threading.get_ident()}  # the reactor runs on this thread


@inline
async def test_debug_on_a_port_of_its_own(cluster: Cluster) -> None:
    """The spec's layout with debug moved off 9090 (both on free ports here)."""
    sim = cluster.sim(UPSTREAM)
    router = cluster.router(
        resources(cluster, sim.listener.bound_port),
        debugListen=f"tcp:port=0:interface={LOOPBACK}",
        observability={"metrics": {"port": 9090}, "debug": {"port": 9091}},
    )
    assert (await cluster.post(router, CHAT, chat_body("client-model"))).status == 200
    admin, debug = router.admin.service("admin"), router.admin.service("debug")
    assert admin is not None
    assert debug is not None
    assert admin.bound_port != debug.bound_port

    assert (await fetch(cluster, router, "/metrics"))[0] == 200
    assert (await fetch(cluster, router, "/debug/router/state"))[0] == 404
    assert (await fetch(cluster, router, "/metrics", "debug"))[0] == 404
    state = await fetch_json(cluster, router, "/debug/router/state", "debug")
    assert [(x["name"], x["port"], x["serves"]) for x in state["listeners"]] == [
        ("proxy", router.proxy.bound_port, ["/v1/*", "/healthz", "/readyz"]),
        ("admin", admin.bound_port, ["/metrics"]),
        ("debug", debug.bound_port, ["/debug/"]),
    ]
    pods = (await fetch_json(cluster, router, "/debug/config_dump/pods", "debug"))["pods"]
    assert [(p["name"], p["engine"], p["modelServers"]) for p in pods] == [
        ("pod-0", "vLLM", ["default/srv"])
    ]


@inline
async def test_the_admin_listeners_close_with_the_router(cluster: Cluster) -> None:
    router = cluster.router([], debugListen=ADMIN_LISTEN, observability={"debug": {"port": 1}})
    ports = [s.bound_port for _, s in router.admin.listeners]
    assert len(ports) == 2
    cluster.routers.remove(router)
    await router.stopService()
    assert router.admin.listeners[0][1].port is None
    for port in ports:
        d = cluster.agent.request(b"GET", f"http://{LOOPBACK}:{port}/metrics".encode())
        try:
            await d
        except Exception as e:
            assert isinstance(e, ConnectionRefusedError)
        else:
            raise AssertionError(f"port {port} still answers")
