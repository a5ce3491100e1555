"""
The Gateway API Inference Extension's debug endpoints (/debug/inference-extension/*),
in memory: every InferencePool with what sends to it and renames models in it, one
pool's endpoints under the one health rule (404 / 409 as for model servers), and the
decisions of the requests HTTPRoutes sent to pools, after requests really went through
the pipeline.
"""

from __future__ import annotations

from typing import Any

import pytest

from kthena.engines.snapshot import EngineSnapshot
from kthena.observability.debug.app import ENDPOINTS
from tests.unit.adminfixtures import AdminHarness, completion
from tests.unit.routerfixtures import (
    Doc,
    http_route,
    in_namespace,
    inference_pool,
    model_rewrite,
    pod,
    pool_ref,
    server,
    simple_route,
)

POOLS = "/debug/inference-extension/pools"
DECISIONS = "/debug/inference-extension/decisions"


def rewrite_rule(models: list[str], targets: list[str]) -> Doc:
    return {
        "matches": [{"model": {"value": m}} for m in models],
        "targets": [{"modelRewrite": t} for t in targets],
    }


def resources() -> list[Doc]:
    """
    ModelRoute C{m} -> ModelServer C{base} (pod p0); InferencePool C{pool} (pods pp0,
    pp1 and a Pending one; SGLang by its annotation), sent to by HTTPRoute C{chat}
    (attached to the Gateway C{default/gw}: its rule C{split} shares with C{spare}) and
    C{elsewhere} (attached to another Gateway); C{rename} rewrites model C{a} to C{b};
    a second C{pool} in namespace C{other}; C{spare} has no pods.
    """
    return [
        simple_route("m", "m", "base"),
        server("base", {"app": "m"}, model="org/m"),
        pod("p0", "10.0.0.1", {"app": "m"}),
        inference_pool(
            "pool", {"app": "pool"}, 9000, annotations={"kthena.io/inference-engine": "SGLang"}
        ),
        in_namespace("other", inference_pool("pool", {"app": "pool"}, 9000)),
        inference_pool("spare", {"app": "spare"}, 9000),
        http_route(
            "chat",
            "gw",
            [
                {
                    "name": "main",
                    "matches": [{"path": {"type": "PathPrefix", "value": "/v1"}}],
                    "backendRefs": [pool_ref("pool")],
                },
                {
                    "name": "split",
                    "matches": [{"path": {"type": "Exact", "value": "/v1/completions"}}],
                    "backendRefs": [pool_ref("pool", 3), pool_ref("spare", 1)],
                },
            ],
            created="2025-01-01T00:00:00Z",
        ),
        http_route("elsewhere", "other-gw", [{"backendRefs": [pool_ref("pool")]}]),
        model_rewrite(
            "rename", "pool", [rewrite_rule(["a"], ["b"]), rewrite_rule([], ["fallback"])]
        ),
        pod("pp0", "10.0.3.1", {"app": "pool"}),
        pod("pp1", "10.0.3.2", {"app": "pool"}),
        pod("pp-pending", "10.0.3.9", {"app": "pool"}, phase="Pending", ready=False),
    ]


@pytest.fixture
def admin() -> AdminHarness:
    return AdminHarness(resources(), gateway={"name": "default/gw"})


def scraped(admin: AdminHarness, *keys: str) -> None:
    """These pods answered a scrape just now (so the health rule counts them healthy)."""
    for key in keys:
        admin.pod(key).state.update(EngineSnapshot(waiting=2), admin.clock.seconds())


def by_key(pools: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {f"{p['namespace']}/{p['name']}": p for p in pools}


def served(admin: AdminHarness, model: str, request_id: str) -> None:
    client = admin.send_chat(model=model, request_id=request_id)
    admin.upstream.last.respond_json(completion())
    assert client.got().status == 200


# -- pools


def test_the_index_lists_the_endpoints() -> None:
    assert {
        "/debug/inference-extension/pools",
        "/debug/inference-extension/pools/{pool}/endpoints?namespace=NS",
        "/debug/inference-extension/decisions?limit=N",
    } <= set(ENDPOINTS)


def test_pools_with_their_routes_rewrites_and_pod_counts(admin: AdminHarness) -> None:
    scraped(admin, "default/pp0")
    body = admin.json(POOLS)
    assert body["gateway"] == "default/gw"
    pools = by_key(body["pools"])
    assert list(pools) == ["default/pool", "other/pool", "default/spare"]
    assert pools["default/pool"] == {
        "name": "pool",
        "namespace": "default",
        "selector": {"matchLabels": {"app": "pool"}},
        "target_ports": [9000],
        "engine": "SGLang",
        "http_routes": [
            {
                "route": "default/chat",  # the oldest first
                "attached": True,
                "rules": [
                    {"name": "main", "weight": 1, "share": 1.0},
                    {"name": "split", "weight": 3, "share": 0.75},
                ],
            },
            {
                "route": "default/elsewhere",
                "attached": False,  # another Gateway's: it never sends here
                "rules": [{"name": "rules[0]", "weight": 1, "share": 1.0}],
            },
        ],
        "rewrites": [
            {
                "name": "rename",
                "created": None,
                "rules": [
                    {"models": ["a"], "targets": [{"model": "b", "weight": 1}]},
                    {"models": [], "targets": [{"model": "fallback", "weight": 1}]},
                ],
            }
        ],
        "total_pods": 3,
        "serving_pods": 2,
        "ready_pods": 1,  # pp1 was never scraped
        "serving_endpoints": 2,
        "ready_endpoints": 1,
        "health": "degraded",
    }
    spare = pools["default/spare"]
    assert spare["http_routes"] == [
        {
            "route": "default/chat",
            "attached": True,
            "rules": [{"name": "split", "weight": 1, "share": 0.25}],
        }
    ]
    assert (spare["rewrites"], spare["engine"]) == ([], "vLLM")
    assert (spare["total_pods"], spare["serving_pods"], spare["health"]) == (0, 0, "unhealthy")
    other = pools["other/pool"]
    assert (other["http_routes"], other["rewrites"], other["total_pods"]) == ([], [], 0)


def test_pool_health_follows_the_one_health_rule(admin: AdminHarness) -> None:
    scraped(admin, "default/pp0", "default/pp1")
    pool = by_key(admin.json(POOLS)["pools"])["default/pool"]
    assert (pool["ready_pods"], pool["health"]) == (2, "degraded")  # the Pending pod
    admin.clock.advance(60)  # the scrapes went stale
    pool = by_key(admin.json(POOLS)["pools"])["default/pool"]
    assert (pool["ready_pods"], pool["health"]) == (0, "unhealthy")


def test_pools_without_a_gateway_or_any_pool() -> None:
    admin = AdminHarness(resources()[:3])
    assert admin.json(POOLS) == {"gateway": None, "pools": []}


# -- endpoints


def test_a_pools_endpoints_serving_or_not(admin: AdminHarness) -> None:
    scraped(admin, "default/pp0")
    body = admin.json(f"{POOLS}/pool/endpoints?namespace=default")
    assert (body["name"], body["namespace"], body["health"]) == ("pool", "default", "degraded")
    endpoints = {e["pod"]: e for e in body["endpoints"]}
    assert list(endpoints) == ["default/pp0", "default/pp1", "default/pp-pending"]
    pp0 = endpoints["default/pp0"]
    assert {k: v for k, v in pp0.items() if k not in ("metrics", "outlier")} == {
        "pod": "default/pp0",
        "endpoint": "default/pp0",
        "name": "pp0",
        "namespace": "default",
        "address": "10.0.3.1:9000",  # the pool's target port
        "upstream_address": "10.0.3.1:9000",
        "phase": "Running",
        "ready": True,
        "serving": True,
        "healthy": True,
        "in_flight": 0,
        "failures": 0,
        "last_error": None,
        "servers": [],  # no ModelServer selects it
    }
    assert pp0["outlier"]["ejected"] is False
    assert (pp0["metrics"]["waiting"], pp0["metrics"]["scrapes"]) == (2, 1)
    pp1 = endpoints["default/pp1"]
    assert (pp1["serving"], pp1["healthy"], pp1["metrics"]["scrapes"]) == (True, False, 0)
    pending = endpoints["default/pp-pending"]
    assert (pending["address"], pending["upstream_address"]) == ("10.0.3.9:9000", None)
    assert (pending["serving"], pending["healthy"]) == (False, False)
    assert (pending["metrics"], pending["outlier"]) == ({}, None)


def test_endpoints_show_pods_as_the_model_server_status_does() -> None:
    """One pod view: a pod that a ModelServer (on 8000) and a pool (on 7000) both select
    is two endpoints, each shown with its own live state, as the model-server status
    shows its pods."""
    docs = [*resources(), pod("both", "10.0.4.1", {"app": "m", "pool": "yes"})]
    docs.append(inference_pool("shared", {"pool": "yes"}, 7000))
    admin = AdminHarness(docs, gateway={"name": "default/gw"})
    scraped(admin, "default/both")
    status = admin.json("/debug/model-servers/base/status")
    (as_server,) = [p for p in status["pods"] if p["name"] == "both"]
    (as_endpoint,) = admin.json(f"{POOLS}/shared/endpoints")["endpoints"]
    assert (as_server["address"], as_server["healthy"]) == ("10.0.4.1:8000", True)
    assert as_endpoint["endpoint"] == "default/both:7000"
    assert as_endpoint["address"] == as_endpoint["upstream_address"] == "10.0.4.1:7000"
    assert (as_endpoint["serving"], as_endpoint["healthy"]) == (True, False)  # not scraped
    for key, value in as_server.items():
        if key not in ("role", "address", "healthy", "servers"):
            assert as_endpoint[key] == value, key


def test_each_target_port_of_a_pool_is_an_endpoint() -> None:
    docs = [*resources(), inference_pool("ranks", {"app": "pool"}, 9000, 9001)]
    admin = AdminHarness(docs, gateway={"name": "default/gw"})
    scraped(admin, "default/pp0")
    body = admin.json(f"{POOLS}/ranks/endpoints")
    assert (body["total_pods"], body["serving_pods"], body["serving_endpoints"]) == (3, 2, 4)
    assert (body["ready_pods"], body["ready_endpoints"], body["health"]) == (1, 1, "degraded")
    shown = [(e["pod"], e["endpoint"], e["address"], e["healthy"]) for e in body["endpoints"]]
    assert shown == [
        ("default/pp0", "default/pp0", "10.0.3.1:9000", True),
        ("default/pp0", "default/pp0:9001", "10.0.3.1:9001", False),
        ("default/pp1", "default/pp1", "10.0.3.2:9000", False),
        ("default/pp1", "default/pp1:9001", "10.0.3.2:9001", False),
        ("default/pp-pending", None, "10.0.3.9:9000", False),
    ]


def test_a_pool_name_in_two_namespaces_needs_the_namespace(admin: AdminHarness) -> None:
    body = admin.json(f"{POOLS}/pool/endpoints", status=409)
    assert body["namespaces"] == ["default", "other"]
    assert body["error"] == "InferencePool pool exists in several namespaces; add ?namespace="
    other = admin.json(f"{POOLS}/pool/endpoints?namespace=other")
    assert (other["namespace"], other["endpoints"]) == ("other", [])
    assert admin.json(f"{POOLS}/spare/endpoints")["endpoints"] == []  # unique: no namespace


@pytest.mark.parametrize(
    ("path", "message"),
    [
        (f"{POOLS}/nope/endpoints", "InferencePool nope not found"),
        (f"{POOLS}/spare/endpoints?namespace=other", "InferencePool other/spare not found"),
        (f"{POOLS}/pool", "no debug endpoint at /debug/inference-extension/pools/pool"),
    ],
)
def test_absent_pools_are_404(admin: AdminHarness, path: str, message: str) -> None:
    assert admin.json(path, status=404) == {"error": message}


# -- decisions


def test_decisions_list_only_pool_routed_requests(admin: AdminHarness) -> None:
    assert admin.json(DECISIONS) == {"kept": 256, "decisions": []}
    served(admin, "m", "by-model-route")
    assert admin.upstream.last.pod.name == "p0"
    assert admin.json(DECISIONS)["decisions"] == []
    served(admin, "a", "renamed")
    sent = admin.upstream.last
    assert (sent.pod.name, sent.pod.port, sent.json()["model"]) == ("pp0", 9000, "b")
    client = admin.send_chat(model="z", request_id="in-flight")  # the generic rule
    everything = admin.json("/debug/routing/decisions")["decisions"]
    assert [d["request_id"] for d in everything] == ["in-flight", "renamed", "by-model-route"]
    decisions = admin.json(DECISIONS)["decisions"]
    assert [d["request_id"] for d in decisions] == ["in-flight", "renamed"]
    newest, renamed = decisions
    assert set(renamed) == {
        *everything[1],
        "http_route",
        "inference_pool",
        "gateway",
        "rewritten_model",
    }
    assert renamed == {
        **everything[1],
        "model_server": None,  # a pool is not a model server: inference_pool names it
        "http_route": "default/chat",
        "inference_pool": "default/pool",
        "gateway": "default/gw",
        "rewritten_model": "b",
    }
    assert (renamed["model"], renamed["route"], renamed["rule"]) == ("a", "default/chat", "main")
    assert (renamed["chosen"], renamed["status"], renamed["in_flight"]) == ("pp0", 200, False)
    assert renamed["candidates"] == ["pp0", "pp1"]
    assert (newest["model"], newest["rewritten_model"], newest["in_flight"]) == (
        "z",
        "fallback",
        True,
    )
    admin.upstream.last.respond_json(completion())
    assert client.got().status == 200
    assert [d["request_id"] for d in admin.json(f"{DECISIONS}?limit=1")["decisions"]] == [
        "in-flight"
    ]
    assert admin.json(f"{DECISIONS}?limit=0")["decisions"] == []
    assert admin.json(f"{DECISIONS}?limit=x", status=400) == {
        "error": "limit must be a whole number"
    }


def test_a_pool_without_a_rewrite_sends_the_model_as_asked() -> None:
    docs = [d for d in resources() if d["kind"] != "InferenceModelRewrite"]
    admin = AdminHarness(docs, gateway={"name": "default/gw"})
    served(admin, "anything", "as-asked")
    assert admin.upstream.last.json()["model"] == "anything"
    (decision,) = admin.json(DECISIONS)["decisions"]
    assert (decision["rewritten_model"], decision["inference_pool"]) == (None, "default/pool")


@pytest.mark.parametrize(
    ("kind", "names"),
    [
        ("inferencepools", [("default", "pool"), ("other", "pool"), ("default", "spare")]),
        ("httproutes", [("default", "chat"), ("default", "elsewhere")]),
        ("inferencemodelrewrites", [("default", "rename")]),
        ("gateways", []),
    ],
)
def test_config_dump_shows_the_gateway_api_kinds_as_written(
    admin: AdminHarness, kind: str, names: list[tuple[str, str]]
) -> None:
    listed = admin.json(f"/debug/config_dump/{kind}")[kind]
    assert [(o["namespace"], o["name"]) for o in listed] == names
    written = {
        (d["kind"].lower() + "s", d["metadata"]["namespace"], d["metadata"]["name"]): d["spec"]
        for d in resources()
        if "spec" in d
    }
    for shown in listed:
        namespace, name = shown["namespace"], shown["name"]
        assert shown["spec"] == written[(kind, namespace, name)]
        one = admin.json(f"/debug/config_dump/namespaces/{namespace}/{kind}/{name}")
        assert one == shown
