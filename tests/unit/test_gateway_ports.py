"""
Gateways and the ports the router opens for them, without sockets: which listeners a
port has (HTTP ones of the router's class), which takes a request by its host (exact,
then the longest wildcard, then one without a hostname: Kthena's order), what a Gateway
document may say, and the configs the router refuses (the twisted.web server, --workers).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from kthena.config.documents import parse_document
from kthena.config.gateway import Gateway, listeners_by_port
from kthena.config.inference import HTTPRoute
from kthena.config.router import parse_config
from kthena.config.validate import ConfigError, Where
from kthena.tap import Options, makeService


def gateway(name: str, *listeners: dict[str, Any], class_name: str = "kthena-router") -> Any:
    return {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "Gateway",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"gatewayClassName": class_name, "listeners": list(listeners)},
    }


def listener(name: str, port: int, hostname: str | None = None, protocol: str = "HTTP") -> Any:
    spec: dict[str, Any] = {"name": name, "port": port, "protocol": protocol}
    if hostname is not None:
        spec["hostname"] = hostname
    return spec


def parsed(doc: Any) -> Gateway:
    found = parse_document(doc, Where("test"), 0)
    assert isinstance(found, Gateway)
    return found


def test_ports_gather_the_http_listeners_of_the_routers_class() -> None:
    gateways = (
        parsed(gateway("a", listener("web", 8081), listener("tls", 8443, protocol="HTTPS"))),
        parsed(gateway("b", listener("web", 8081, "llm.example.com"), listener("alt", 8082))),
        parsed(gateway("c", listener("web", 8083), class_name="istio")),
    )
    ports = listeners_by_port(gateways, "kthena-router")
    assert list(ports) == [8081, 8082]
    assert [(via.key, via.listener, via.port, host) for via, host in ports[8081].listeners] == [
        ("default/a", "web", 8081, None),
        ("default/b", "web", 8081, "llm.example.com"),
    ]
    assert list(listeners_by_port(gateways, "istio")) == [8083]


@pytest.mark.parametrize(
    ("host", "chosen"),
    [
        ("api.example.com", "exact"),
        ("API.Example.com.:8080", "exact"),
        ("a.b.example.com", "deep"),
        ("x.example.com", "wide"),
        ("example.com", "any"),
        ("other.org", "any"),
        ("[::1]:8080", "any"),
        ("", "any"),
    ],
)
def test_a_host_goes_to_the_most_specific_listener(host: str, chosen: str) -> None:
    doc = gateway(
        "gw",
        listener("any", 80),
        listener("wide", 80, "*.example.com"),
        listener("deep", 80, "*.b.example.com"),
        listener("exact", 80, "api.example.com"),
    )
    via = listeners_by_port((parsed(doc),), "kthena-router")[80].resolve(host)
    assert via is not None and via.listener == chosen


def test_a_host_no_listener_takes_comes_through_none() -> None:
    doc = gateway("gw", listener("only", 80, "llm.example.com"))
    port = listeners_by_port((parsed(doc),), "kthena-router")[80]
    assert port.resolve("other.example.com") is None
    assert port.resolve("llm.example.com") is not None


@pytest.mark.parametrize(
    ("listeners", "message"),
    [
        ([], "spec.listeners: needs at least one listener"),
        ([listener("a", 80), listener("a", 81)], "spec.listeners: names a listener twice"),
        ([listener("a", 0)], "spec.listeners[0].port: must be at least 1"),
        ([listener("a", 80, "10.0.0.*")], "spec.listeners[0].hostname: must be a DNS name"),
        ([{"name": "a", "port": 80}], "spec.listeners[0].protocol: is required"),
    ],
)
def test_bad_gateways_are_refused_by_field(listeners: list[Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_document(gateway("gw", *listeners), Where("test"), 0)


def test_fields_of_later_gateway_api_versions_are_read_past() -> None:
    doc = gateway("gw", {**listener("a", 80), "allowedRoutes": {"namespaces": {"from": "All"}}})
    doc["spec"]["addresses"] = [{"value": "10.0.0.1"}]
    assert parsed(doc).listeners[0].port == 80


def test_gateway_ports_need_the_lean_server() -> None:
    raw = {"gatewayAPI": {}, "downstream": {"server": "twisted"}}
    with pytest.raises(ConfigError, match="gatewayAPI: Gateway ports are served by the lean"):
        parse_config(raw, "t.yaml", Path("."), [])
    config = parse_config({"gatewayAPI": {"interface": "127.0.0.1"}}, "t.yaml", Path("."), [])
    assert config.gateway_api.enabled and config.gateway_api.class_name == "kthena-router"
    assert not parse_config({}, "t.yaml", Path("."), []).gateway_api.enabled


def test_workers_refuse_gateway_ports(tmp_path: Path) -> None:
    path = tmp_path / "router.yaml"
    path.write_text(yaml.safe_dump({"gatewayAPI": {}, "listen": "tcp:0"}))
    options = Options()
    options.parseOptions(["--config", str(path), "--workers", "2"])
    with pytest.raises(SystemExit, match="not shared by --workers"):
        makeService(options)


def _route_in(namespace: str) -> HTTPRoute:
    doc = {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": {"name": "r", "namespace": namespace},
        "spec": {"parentRefs": [{"name": "gw", "namespace": "default"}]},
    }
    found = parse_document(doc, Where("test"), 0)
    assert isinstance(found, HTTPRoute)
    return found


@pytest.mark.parametrize(
    ("allowed", "attached"),
    [
        (None, {"default"}),  # the Gateway API's default: Same
        ({"namespaces": {"from": "Same"}}, {"default"}),
        ({"namespaces": {"from": "All"}}, {"default", "tenant"}),
        # A selector needs the namespaces' labels, which the router does not read: none.
        ({"namespaces": {"from": "Selector", "selector": {"matchLabels": {"a": "b"}}}}, set()),
        ({"namespaces": {"from": "All"}, "kinds": [{"kind": "GRPCRoute"}]}, set()),
        ({"namespaces": {"from": "All"}, "kinds": [{"kind": "HTTPRoute"}]}, {"default", "tenant"}),
    ],
)
def test_a_listener_takes_http_routes_of_the_namespaces_it_allows(
    allowed: dict[str, Any] | None, attached: set[str]
) -> None:
    spec = listener("web", 80)
    if allowed is not None:
        spec["allowedRoutes"] = allowed
    [(via, _)] = listeners_by_port((parsed(gateway("gw", spec)),), "kthena-router")[80].listeners
    assert {ns for ns in ("default", "tenant") if _route_in(ns).attaches(via)} == attached


def test_the_configs_own_gateway_listener_takes_routes_of_any_namespace() -> None:
    config = parse_config({"gateway": {"name": "default/gw"}}, "t.yaml", Path("."), [])
    assert config.gateway is not None and _route_in("tenant").attaches(config.gateway)


def test_the_docs_examples_load() -> None:
    """docs/inference-extension.md's config examples are configs the router takes."""
    docs = Path(__file__).resolve().parents[2] / "docs" / "inference-extension.md"
    blocks = re.findall(r"```yaml\n(.*?)```", docs.read_text(), re.S)
    loaded = [parse_config(yaml.safe_load(b), "docs", Path("."), []) for b in blocks]
    resources = loaded[0].resources
    assert (len(resources.pools), len(resources.httproutes), len(resources.rewrites)) == (1, 1, 1)
    assert loaded[1].gateway_api.enabled and len(loaded[1].resources.gateways) == 1
