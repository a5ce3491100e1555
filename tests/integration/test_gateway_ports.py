"""
Gateways as Kthena's router serves them (C{gatewayAPI}): a port opened for the HTTP
listeners of each Gateway of the router's class, requests through it coming through the
listener that takes their host (routes attach to it by C{parentRefs}), the port closed
when no Gateway names it any more, a port that cannot be opened reported without
stopping the router, and Gateways read from a (fake) Kubernetes API opening their port
within a second.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from twisted.internet.threads import deferToThread

from kthena.config.router import parse_config
from tests.integration.router_helpers import (
    LOOPBACK,
    Cluster,
    HttpResult,
    chat_body,
    free_port,
    http_request,
    inline,
)
from tests.integration.test_inference_extension import MODEL, listed, pooled
from tests.unit.routerfixtures import Doc, http_route, pool_ref, route, server

CHAT = "/v1/chat/completions"
GATEWAY_API = {"interface": LOOPBACK}


def gateway(name: str, port: int, class_name: str = "kthena-router", tls: int | None = None) -> Doc:
    """A Gateway: listener C{llm} for llm.example.com and C{any} for every other host
    (and an HTTPS one on C{tls}, when given)."""
    return {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "Gateway",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "gatewayClassName": class_name,
            "listeners": [
                {"name": "llm", "port": port, "protocol": "HTTP", "hostname": "llm.example.com"},
                {"name": "any", "port": port, "protocol": "HTTP"},
                *([{"name": "tls", "port": tls, "protocol": "HTTPS"}] if tls else []),
            ],
        },
    }


def routes(port: int) -> list[Doc]:
    """The pool's HTTPRoute on listener C{llm}; ModelRoute C{bound} on listener C{any}."""
    to_pool = http_route("inference", "gw", [{"backendRefs": [pool_ref("chat")]}])
    to_pool["spec"]["parentRefs"] = [{"name": "gw", "sectionName": "llm", "port": port}]
    bound = route(
        "bound",
        {
            "modelName": "bound",
            "parentRefs": [{"name": "gw", "sectionName": "any"}],
            "rules": [{"name": "r", "targetModels": [{"modelServerName": "srv"}]}],
        },
    )
    return [to_pool, bound, server("srv", {"app": "chat"}, MODEL)]


async def post(port: int, model: str, host: str) -> HttpResult:
    result: HttpResult = await deferToThread(
        http_request, LOOPBACK, port, "POST", CHAT, chat_body(model), {"Host": host}
    )
    return result


async def refused(port: int) -> bool:
    try:
        await post(port, MODEL, "llm.example.com")
    except ConnectionRefusedError:
        return True
    return False


@inline
async def test_gateway_listeners_get_a_port_of_their_own(cluster: Cluster) -> None:
    port = free_port()
    tls = free_port()
    gateways = [gateway("gw", port, tls=tls)]
    resources = [*pooled(cluster, "chat", "chat", 1), *routes(port), *gateways]
    router = cluster.router(resources, gatewayAPI=GATEWAY_API)
    records = Cluster.hook(router)
    assert list(router.gateway_ports.ports) == [port]
    # Through listener llm (its hostname): the HTTPRoute sends to the pool.
    reply = await post(port, MODEL, "llm.example.com:8080")
    assert reply.status == 200, reply.body
    match = records[-1].match
    assert match is not None and match.via is not None
    assert (match.inference_pool, match.via.listener) == ("default/chat", "llm")
    # Another host comes through listener any: the ModelRoute bound there, not the pool.
    assert (await post(port, "bound", "other.example.com")).status == 200
    assert records[-1].match is not None and records[-1].match.model_route == "default/bound"
    assert (await post(port, MODEL, "other.example.com")).status == 404
    assert (await post(port, "bound", "llm.example.com")).status == 404
    # /v1/models lists what the host's listener serves.
    models: HttpResult = await deferToThread(
        http_request, LOOPBACK, port, "GET", "/v1/models", None, {"Host": "other.example.com"}
    )
    assert [m["id"] for m in models.json()["data"]] == ["bound"]
    # The proxy listener is no Gateway's: neither route serves it.
    assert (await cluster.post(router, CHAT, chat_body("bound"))).status == 404
    # The port is among the router's listeners (/debug/router/state); HTTPS is not opened.
    names = [(i.name, i.port) for i in router.admin.all_listeners()]
    assert ("proxy", router.proxy.bound_port) in names and (f"gateway port {port}", port) in names
    assert await refused(tls)
    # The Gateway goes (a reload): its port closes, the proxy listener stays.
    router.reconfigure(replace(router.loaded, resources=parse_config(
        {"resources": [*pooled(cluster, "chat", "chat", 1), *routes(port)]}, "t", Path("."), []
    ).resources))  # fmt: skip
    assert router.gateway_ports.ports == {}
    await cluster.sleep(0.05)
    assert await refused(port)
    assert router.proxy.port is not None


@inline
async def test_only_the_routers_class_and_a_taken_port_is_reported(cluster: Cluster) -> None:
    taken = cluster.router([])
    busy = taken.proxy.bound_port
    other = free_port()
    resources = [gateway("gw", busy), gateway("theirs", other, class_name="istio")]
    router = cluster.router(resources, gatewayAPI=GATEWAY_API)
    ports = router.gateway_ports
    assert ports.ports == {} and list(ports.failed) == [busy]
    assert "in use" in ports.failed[busy].lower()
    [view] = [i.view() for i in router.admin.all_listeners() if i.name == f"gateway port {busy}"]
    assert (view["listening"], view["error"]) == (False, ports.failed[busy])
    assert await refused(other)  # another class's Gateway: not the router's
    assert (await cluster.request(router, "GET", "/healthz")).status == 200


@inline
async def test_gateways_from_the_cluster_open_their_port(
    cluster: Cluster, kube: tuple[Any, int], tmp_path: Path
) -> None:
    fake, api = kube
    port = free_port()
    router, kinds = await listed(cluster, api, tmp_path, gatewayAPI=GATEWAY_API)
    assert "Gateway" in kinds
    started = time.monotonic()
    for doc in (*pooled(cluster, "chat", "chat", 1), *routes(port), gateway("gw", port)):
        fake.put(doc)
    await cluster.wait_for(lambda: port in router.gateway_ports.ports, 1.0, "the Gateway's port")
    assert time.monotonic() - started < 1.0
    await cluster.wait_for(lambda: bool(router.store.pods), 1.0, "the pool's pod")
    assert (await post(port, MODEL, "llm.example.com")).status == 200
    fake.delete("gateway.networking.k8s.io/v1", "gateways", "default", "gw")
    await cluster.wait_for(lambda: not router.gateway_ports.ports, 1.0, "the port closed")
