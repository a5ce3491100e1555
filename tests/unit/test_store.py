"""Route matching and pod membership, as Kthena does them."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from kthena.config.router import parse_config
from kthena.store import Datastore
from tests.unit.routerfixtures import Doc, pod, route, server, simple_route


def store_of(*docs: Doc) -> Datastore:
    config = parse_config({"resources": list(docs)}, "t.yaml", Path("."), [])
    store = Datastore(random.Random(7))
    store.replace(config.resources)
    return store


def no_headers(name: str) -> str:
    return ""


def headers(**values: str) -> Any:
    lowered = {k.replace("_", "-").lower(): v for k, v in values.items()}
    return lambda name: lowered.get(name, "")


SERVERS = [
    server("a", {"app": "a"}, model="org/a"),
    server("b", {"app": "b"}, model="org/b"),
    server("c", {"app": "c"}),
]


def rule(targets: list[str], **match: Any) -> Doc:
    r: Doc = {"targetModels": [{"modelServerName": t} for t in targets]}
    if match:
        r["modelMatch"] = match
    return r


def test_by_model_name_then_lora() -> None:
    store = store_of(
        simple_route("base", "m", "a"),
        route("lora", {"loraAdapters": ["m-lora", "m"], "rules": [rule(["b"])]}),
        *SERVERS,
    )
    match = store.match("m", no_headers, "/v1/completions")
    assert match is not None
    assert (match.server.meta.name, match.is_lora) == ("a", False)
    match = store.match("m-lora", no_headers, "/v1/completions")
    assert match is not None
    assert (match.server.meta.name, match.is_lora) == ("b", True)
    assert store.match("other", no_headers, "/v1/completions") is None


def test_model_rewrite_except_lora() -> None:
    store = store_of(
        simple_route("base", "m", "a"),
        route("lora", {"loraAdapters": ["ad"], "rules": [rule(["a"])]}),
        simple_route("plain", "p", "c"),
        *SERVERS,
    )
    base = store.match("m", no_headers, "/")
    lora = store.match("ad", no_headers, "/")
    plain = store.match("p", no_headers, "/")
    assert base is not None and lora is not None and plain is not None
    assert base.upstream_model("m") == "org/a"
    assert lora.upstream_model("ad") == "ad"
    assert plain.upstream_model("p") == "p"


def test_rules_in_order_with_anded_conditions() -> None:
    store = store_of(
        route(
            "r",
            {
                "modelName": "m",
                "rules": [
                    rule(
                        ["a"],
                        headers={"x-tier": {"exact": "premium"}},
                        uri={"prefix": "/v1/chat"},
                    ),
                    rule(["b"], headers={"x-user": {"regex": "^team-[0-9]+$"}}),
                    rule(["c"], body={"model": "m"}, headers={"x-beta": {"prefix": "y"}}),
                    rule(["c"], body={"model": "not-m"}),
                ],
            },
        ),
        *SERVERS,
    )

    def where(h: Any, path: str = "/v1/chat/completions") -> str | None:
        match = store.match("m", h, path)
        return None if match is None else match.server.meta.name

    assert where(headers(x_tier="premium")) == "a"
    assert where(headers(x_tier="premium"), "/v1/completions") is None  # uri fails, rest none
    assert where(headers(x_tier="basic", x_user="team-42")) == "b"
    assert where(headers(x_user="team-42x")) is None
    assert where(headers(x_beta="yes")) == "c"
    assert where(no_headers) is None


def test_a_route_whose_rules_do_not_match_lets_the_next_route_try() -> None:
    store = store_of(
        route(
            "old",
            {"modelName": "m", "rules": [rule(["a"], headers={"x": {"exact": "1"}})]},
            created="2024-01-01T00:00:00Z",
        ),
        route("new", {"modelName": "m", "rules": [rule(["b"])]}, created="2025-01-01T00:00:00Z"),
        *SERVERS,
    )
    first = store.match("m", headers(x="1"), "/")
    second = store.match("m", no_headers, "/")
    assert first is not None and first.route.meta.name == "old"
    assert second is not None and second.route.meta.name == "new"


def test_oldest_route_first() -> None:
    store = store_of(
        route("young", {"modelName": "m", "rules": [rule(["b"])]}, created="2025-06-01T00:00:00Z"),
        route("old", {"modelName": "m", "rules": [rule(["a"])]}, created="2024-06-01T00:00:00Z"),
        *SERVERS,
    )
    match = store.match("m", no_headers, "/")
    assert match is not None and match.route.meta.name == "old"


def test_weighted_targets() -> None:
    store = store_of(
        route(
            "r",
            {
                "modelName": "m",
                "rules": [
                    {
                        "targetModels": [
                            {"modelServerName": "a", "weight": 70},
                            {"modelServerName": "b", "weight": 30},
                            {"modelServerName": "c", "weight": 0},
                        ]
                    }
                ],
            },
        ),
        *SERVERS,
    )
    counts: Counter[str] = Counter()
    for _ in range(10_000):
        match = store.match("m", no_headers, "/")
        assert match is not None
        counts[match.server.meta.name] += 1
    assert counts["c"] == 0
    assert counts["a"] / 10_000 == pytest.approx(0.7, abs=0.03)


def test_pod_membership_by_labels_running_ready() -> None:
    store = store_of(
        simple_route("r", "m", "a"),
        *SERVERS,
        pod("ok", "10.0.0.1", {"app": "a", "extra": "x"}),
        pod("other-app", "10.0.0.2", {"app": "b"}),
        pod("pending", "10.0.0.3", {"app": "a"}, phase="Pending"),
        pod("unready", "10.0.0.4", {"app": "a"}, ready=False),
        pod("deleting", "10.0.0.5", {"app": "a"}, deleting=True),
        pod("own-port", "10.0.0.1", {"app": "a"}, port=8001),
    )
    a = store.resources.servers[0]
    members = {(p.name, p.authority) for p in store.server_pods(a)}
    assert members == {("ok", "10.0.0.1:8000"), ("own-port", "10.0.0.1:8001")}


def test_pod_state_survives_reload_and_leaves_with_the_pod() -> None:
    docs = [simple_route("r", "m", "a"), *SERVERS, pod("p1", "10.0.0.1", {"app": "a"})]
    store = store_of(*docs)
    (endpoint,) = store.server_pods(store.resources.servers[0])
    endpoint.in_flight = 3
    config = parse_config(
        {"resources": [*docs, pod("p2", "10.0.0.2", {"app": "a"})]}, "t", Path("."), []
    )
    store.replace(config.resources)
    assert store.generation == 2
    assert store.pods["default/p1"] is endpoint
    assert endpoint.in_flight == 3
    config = parse_config({"resources": docs[:-1]}, "t", Path("."), [])
    store.replace(config.resources)
    assert store.pods == {}


def test_model_names() -> None:
    store = store_of(
        simple_route("r", "m", "a"),
        route("l", {"loraAdapters": ["ad1", "ad2"], "rules": [rule(["a"])]}),
        *SERVERS,
    )
    assert [name for name, _ in store.model_names()] == ["ad1", "ad2", "m"]


def gateway_route(
    name: str, model: str, *parents: dict[str, Any], namespace: str = "default"
) -> Doc:
    doc = simple_route(name, model, "s")
    doc["metadata"]["namespace"] = namespace
    if parents:
        doc["spec"]["parentRefs"] = list(parents)
    return doc


def test_routes_with_parent_refs_serve_only_through_their_gateway() -> None:
    """Kthena's store.go matching: parentRefs bind a route to Gateways (the route's
    namespace by default); a request through no Gateway skips such routes; a route
    without parentRefs serves requests through no Gateway, and through a Gateway of
    its own namespace."""
    from kthena.config.resources import GatewayListener

    store = store_of(
        server("s", {"app": "s"}),
        server("s", {"app": "s"}) | {"metadata": {"name": "s", "namespace": "other"}},
        gateway_route("bound", "m", {"name": "gw"}),
        gateway_route("free", "m"),
        gateway_route("on-listener", "l", {"name": "gw", "sectionName": "https"}),
        gateway_route("elsewhere", "e", {"name": "gw", "namespace": "other"}),
        gateway_route("not-a-gateway", "n", {"name": "gw", "kind": "Service", "group": ""}),
        gateway_route("other-free", "o", namespace="other"),
    )

    def routed(model: str, via: GatewayListener | None) -> str | None:
        match = store.match(model, no_headers, "/v1/chat/completions", via)
        return None if match is None else match.route.meta.name

    gw = GatewayListener("default", "gw", "http")
    assert routed("m", None) == "free"  # "bound" needs its Gateway
    assert routed("m", gw) == "bound"  # the oldest route that attaches
    assert routed("l", gw) is None  # bound to the https listener only
    assert routed("l", GatewayListener("default", "gw", "https")) == "on-listener"
    assert routed("e", gw) is None and routed("e", GatewayListener("other", "gw")) == "elsewhere"
    assert routed("n", gw) is None and routed("n", None) is None  # refs, none a Gateway
    assert routed("o", gw) is None  # no parentRefs: only Gateways of its own namespace
    assert routed("o", GatewayListener("other", "gw")) == "other-free"


def test_the_gateway_section_names_namespace_and_name() -> None:
    from kthena.config.validate import ConfigError

    config = parse_config({"gateway": {"name": "kthena-system/default", "listener": "http"}},
                          "t.yaml", Path("."), [])  # fmt: skip
    assert config.gateway is not None
    assert (config.gateway.namespace, config.gateway.name) == ("kthena-system", "default")
    with pytest.raises(ConfigError, match="namespace/name"):
        parse_config({"gateway": {"name": "default"}}, "t.yaml", Path("."), [])


def test_the_route_stage_matches_through_the_configured_gateway() -> None:
    from kthena.pipeline.route import Routing

    docs = [server("s", {"app": "s"}), gateway_route("bound", "m", {"name": "gw"})]
    plain = parse_config({"resources": docs}, "t.yaml", Path("."), [])
    bound = parse_config(
        {"resources": docs, "gateway": {"name": "default/gw"}}, "t.yaml", Path("."), []
    )
    routing = Routing(store_of(*docs), plain)
    assert routing.via is None
    routing.reconfigure(bound)
    assert routing.via == bound.gateway
    assert routing.store.match("m", no_headers, "/v1/chat/completions", routing.via) is not None
    routing.reconfigure(plain)
    assert routing.store.match("m", no_headers, "/v1/chat/completions", routing.via) is None
