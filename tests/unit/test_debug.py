"""
The debug endpoints (/debug/* on the admin listener), in memory: every endpoint's shape
and status, 404 / 405 / 403, the allow-list and bearer token, and redaction of secrets.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.error import ConnectionRefusedError

from kthena.config.observability import LOOPBACK_NETWORKS
from kthena.config.router import parse_config
from kthena.config.validate import ConfigError
from kthena.engines.snapshot import EngineSnapshot
from kthena.observability.debug.app import ENDPOINTS
from kthena.redact import REDACTED
from tests.unit.adminfixtures import (
    AUTH_HEADER_VALUE,
    REDIS_PASSWORD,
    REMOTE_PEER,
    TOKEN,
    AdminHarness,
    completion,
)
from tests.unit.proxyfixtures import Client

LIST_ENDPOINTS = [
    "/debug/",
    "/debug/config_dump/modelroutes",
    "/debug/config_dump/modelservers",
    "/debug/config_dump/pods",
    "/debug/config_dump/gateways",
    "/debug/config_dump/httproutes",
    "/debug/config_dump/inferencepools",
    "/debug/config_dump/inferencemodelrewrites",
    "/debug/config_dump/namespaces/default/modelroutes/m",
    "/debug/config_dump/namespaces/default/modelservers/pd",
    "/debug/config_dump/namespaces/default/pods/p0",
    "/debug/router/state",
    "/debug/routing/table",
    "/debug/routing/decisions",
    "/debug/routing/backends",
    "/debug/model-servers",
    "/debug/model-servers/pd/status",
    "/debug/model-servers/pd/metrics",
    "/debug/inference-extension/pools",
    "/debug/inference-extension/decisions",
]


@pytest.fixture
def admin() -> AdminHarness:
    return AdminHarness()


def served_with_retry(admin: AdminHarness, request_id: str = "req-1") -> None:
    """A chat request: p0 refuses the connection, p1 answers."""
    client = admin.send_chat(request_id=request_id)
    first = admin.upstream.last
    assert first.pod.name == "p0"
    first.fail(ConnectionRefusedError())
    second = admin.upstream.last
    assert second.pod.name == "p1"
    second.respond_json(completion())
    assert client.got().status == 200


# -- config_dump: Kthena's shapes


def test_modelroutes_list_shows_specs_as_written_with_secrets_redacted(
    admin: AdminHarness,
) -> None:
    body = admin.json("/debug/config_dump/modelroutes")
    assert list(body) == ["modelroutes"]
    routes = body["modelroutes"]
    assert [(r["name"], r["namespace"]) for r in routes] == [("m", "default"), ("m-old", "default")]
    assert all(set(r) == {"name", "namespace", "spec"} for r in routes)
    spec = routes[0]["spec"]
    assert spec["modelName"] == "m"
    assert spec["loraAdapters"] == ["m-lora"]
    assert spec["rules"][1] == {"name": "default", "targetModels": [{"modelServerName": "base"}]}
    headers = spec["rules"][0]["modelMatch"]["headers"]
    assert headers == {"Authorization": {"exact": REDACTED}, "X-Tier": {"exact": "gold"}}
    assert spec["rateLimit"]["inputTokensPerUnit"] == 100
    assert spec["rateLimit"]["global"]["redis"]["address"] == (
        f"redis://admin:{REDACTED}@redis.local:6379/0"
    )


def test_modelservers_list_with_pods_and_pd_roles(admin: AdminHarness) -> None:
    servers = admin.json("/debug/config_dump/modelservers")["modelservers"]
    by_key = {f"{s['namespace']}/{s['name']}": s for s in servers}
    assert list(by_key) == ["default/base", "default/pd", "default/empty", "other/base"]
    keys = {"name", "namespace", "spec", "pods", "associatedPods", "prefillPods", "decodePods"}
    assert all(set(s) == keys for s in servers)
    base = by_key["default/base"]
    assert base["spec"]["workloadSelector"] == {"matchLabels": {"app": "m"}}
    assert base["pods"] == ["default/p0", "default/p1"]  # the Pending pod does not serve
    assert base["associatedPods"] == base["pods"]
    assert (base["prefillPods"], base["decodePods"]) == ([], [])
    pd = by_key["default/pd"]
    assert pd["pods"] == ["default/pre0", "default/dec0"]
    assert pd["prefillPods"] == ["default/pre0"]
    assert pd["decodePods"] == ["default/dec0"]
    assert by_key["default/empty"]["pods"] == []
    assert by_key["other/base"]["pods"] == ["other/o0"]


def test_pods_list_in_the_spec_example_shape(admin: AdminHarness) -> None:
    pods = {p["name"]: p for p in admin.json("/debug/config_dump/pods")["pods"]}
    assert list(pods) == ["p0", "p1", "pre0", "dec0", "pending", "o0"]
    keys = {"name", "namespace", "podInfo", "engine", "metrics", "models", "modelServers"}
    assert all(set(p) == keys for p in pods.values())
    assert pods["p0"] == {
        "name": "p0",
        "namespace": "default",
        "podInfo": {
            "podIP": "10.0.0.1",
            "nodeName": "node-a",
            "phase": "Running",
            "startTime": "2025-01-15T10:00:00Z",
            "labels": {"app": "m", "version": "v1"},
        },
        "engine": "vLLM",
        "metrics": {
            "gpuCacheUsage": 0.0,
            "requestWaitingNum": 0,
            "requestRunningNum": 0,
            "tpot": 0.0,
            "ttft": 0.0,
        },
        "models": ["org/m", "m-lora"],
        "modelServers": ["default/base"],
    }
    assert pods["p1"]["podInfo"]["startTime"] == "2025-01-16T08:30:00Z"  # a YAML timestamp
    assert pods["p1"]["podInfo"]["nodeName"] == ""
    assert pods["pre0"]["modelServers"] == ["default/pd"]
    assert pods["o0"]["engine"] == "SGLang"
    pending = pods["pending"]
    assert pending["podInfo"]["phase"] == "Pending"
    assert (pending["engine"], pending["modelServers"], pending["models"]) == (None, [], [])


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/debug/config_dump/namespaces/default/modelroutes/m-old", ("m-old", "default")),
        ("/debug/config_dump/namespaces/other/modelservers/base", ("base", "other")),
        ("/debug/config_dump/namespaces/other/pods/o0", ("o0", "other")),
    ],
)
def test_one_object_by_namespace_and_name(
    admin: AdminHarness, path: str, expected: tuple[str, str]
) -> None:
    body = admin.json(path)
    assert (body["name"], body["namespace"]) == expected
    listing = path.split("/")[5]
    everything = admin.json(f"/debug/config_dump/{listing}")[listing]
    assert body in everything  # the same object as in the list


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("/debug/config_dump/namespaces/default/modelroutes/nope", "ModelRoute default/nope"),
        ("/debug/config_dump/namespaces/other/modelroutes/m", "ModelRoute other/m"),
        ("/debug/config_dump/namespaces/default/modelservers/nope", "ModelServer default/nope"),
        ("/debug/config_dump/namespaces/default/pods/o0", "Pod default/o0"),
        ("/debug/config_dump/namespaces/default/gateways/m", "Gateway default/m not found"),
        ("/debug/config_dump/namespaces/default/widgets/m", "unknown kind 'widgets'"),
        ("/debug/config_dump/widgets", "unknown kind 'widgets'; known kinds: modelroutes"),
        ("/debug/model-servers/nope/status", "ModelServer nope not found"),
        ("/debug/model-servers/nope/metrics", "ModelServer nope not found"),
        ("/debug/model-servers/pd/metrics?namespace=other", "ModelServer other/pd not found"),
        ("/debug/no/such/thing", "no debug endpoint at /debug/no/such/thing"),
        ("/debug/config_dump", "no debug endpoint"),
    ],
)
def test_absent_objects_and_paths_are_404_json(
    admin: AdminHarness, path: str, message: str
) -> None:
    body = admin.json(path, status=404)
    assert set(body) == {"error"}
    assert message in body["error"]


@pytest.mark.parametrize("path", LIST_ENDPOINTS)
def test_every_endpoint_answers_json(admin: AdminHarness, path: str) -> None:
    response = admin.get(path)
    assert response.status == 200, response.body
    assert response.header("content-type") == "application/json"
    assert response.header("cache-control") == "no-store"
    assert response.body.endswith(b"\n")


def test_a_url_that_is_not_utf8_is_a_json_400(admin: AdminHarness) -> None:
    assert admin.json("/debug/config_dump/namespaces/%ff/pods/x", status=400) == {
        "error": "the URL is not UTF-8"
    }


def test_index_lists_the_endpoints(admin: AdminHarness) -> None:
    assert admin.json("/debug")["endpoints"] == list(ENDPOINTS)
    assert admin.json("/debug/routing/table/") == admin.json("/debug/routing/table")


# -- the router's own views


def test_router_state_shows_identity_and_fairness_but_never_a_secret() -> None:
    admin = AdminHarness(
        identity={
            "jwt": {
                "issuer": "https://idp.example",
                "audiences": ["kthena"],
                "jwksUrl": "https://svc:hunter2@idp.example/jwks?access_token=s3cr3t",
            },
            "header": {"user": "x-user-id"},
        },
        fairness={"topUsers": 3, "models": [{"model": "m", "maxConcurrency": 2}]},
    )
    response = admin.get("/debug/router/state")
    assert b"hunter2" not in response.body and b"s3cr3t" not in response.body
    state = json.loads(response.body)
    identity = state["identity"]
    assert identity["jwt"]["issuer"] == "https://idp.example"
    assert identity["jwt"]["keys"] == 0 and identity["jwt"]["key_ids"] == []
    assert identity["header"] == {"user": "x-user-id", "priority": None}
    assert identity["priorities"] == ["critical", "standard", "sheddable"]
    queue = state["fairness"]["m"]
    assert (queue["length"], queue["in_flight"], queue["oldest_wait_seconds"]) == (0, 0, None)
    assert queue["settings"]["max_concurrency"] == 2
    assert queue["classes"] == {"critical": 0, "standard": 0, "sheddable": 0}


def test_router_state(admin: AdminHarness) -> None:
    admin.upstream.idle["default/p1"] = 3
    client = admin.send_chat(request_id="in-flight")
    state = admin.json("/debug/router/state")
    assert state["uptime_seconds"] >= 0
    assert state["started_at"].endswith("Z")
    assert (state["ready"], state["draining"]) == (admin.plane.readiness.check()[0], False)
    assert state["config"]["generation"] == 1
    assert state["config"]["source"] == "admin-test.yaml"
    assert state["config"]["resources"] == {
        "modelroutes": 2,
        "modelservers": 4,
        "pods": 6,
        "inferencepools": 0,
        "httproutes": 0,
        "inferencemodelrewrites": 0,
    }
    assert state["config"]["debug_access"] == {"allow": ["127.0.0.0/8", "::1/128"], "token": None}
    assert state["active_requests"] == {"total": 1, "by_model": {"m": 1}}
    limits = state["rate_limits"]
    assert [b["backend"] for b in limits["backends"]] == ["local", "redis"]
    assert limits["backends"][1]["healthy"] is False  # never started here
    assert [(r["route"], r["backend"]) for r in limits["routes"]] == [("default/m", "redis")]
    assert limits["routes"][0]["buckets"][0]["level"] is None  # Redis cannot say
    why = "a backend cannot answer: not connected to redis redis.local:6379/0"
    assert limits["error"] == limits["routes"][0]["error"] == why
    assert (limits["fail_open"], limits["redis_timeout_seconds"]) == (True, 0.05)  # still told
    assert state["listeners"] == [
        {
            "name": "proxy",
            "endpoint": "tcp:8080",
            "listening": False,
            "host": None,
            "port": None,
            "serves": ["/v1/*", "/healthz", "/readyz"],
        },
        {
            "name": "admin",
            "endpoint": "tcp:9090",
            "listening": False,
            "host": None,
            "port": None,
            "serves": ["/metrics", "/debug/"],
        },
    ]
    pools = {p["pod"]: p for p in state["upstream"]["pools"]}
    assert pools["default/p0"] == {
        "pod": "default/p0",
        "address": "10.0.0.1:8000",
        "idle_connections": 0,
        "in_flight": 1,
    }
    assert (pools["default/p1"]["idle_connections"], pools["default/p1"]["in_flight"]) == (3, 0)
    assert "default/pending" not in pools
    assert state["upstream"]["max_connections_per_pod"] == 128
    admin.upstream.last.respond_json(completion())
    assert client.got().status == 200
    after = admin.json("/debug/router/state")
    assert after["active_requests"] == {"total": 0, "by_model": {}}


def test_routing_table_oldest_route_first_with_weighted_targets(admin: AdminHarness) -> None:
    table = admin.json("/debug/routing/table")
    assert table["generation"] == 1
    assert list(table["models"]) == ["m", "m-lora"]
    m = table["models"]["m"]
    assert m["matched_by"] == "modelName"
    assert [r["route"] for r in m["routes"]] == ["default/m-old", "default/m"]
    old, new = m["routes"]
    assert old["rules"][0]["match"] == {"uri": {"prefix": "/v1/completions"}}
    assert new["rate_limit"] == {
        "input_tokens_per_unit": 100,
        "output_tokens_per_unit": None,
        "unit": "minute",
        "global_redis": f"redis://admin:{REDACTED}@redis.local:6379/0",
    }
    tier, default = new["rules"]
    assert tier["name"] == "tier"
    assert tier["match"] == {
        "headers": {"authorization": {"exact": REDACTED}, "x-tier": {"exact": "gold"}}
    }
    assert [(t["model_server"], t["weight"], t["share"]) for t in tier["targets"]] == [
        ("default/base", 70, 0.7),
        ("default/pd", 30, 0.3),
    ]
    assert [p["pod"] for p in tier["targets"][1]["ready_pods"]] == ["default/pre0", "default/dec0"]
    assert default["match"] is None
    (target,) = default["targets"]
    assert target["upstream_model"] == "org/m"
    assert target["ready_pods"] == [
        {"pod": "default/p0", "address": "10.0.0.1:8000", "in_flight": 0},
        {"pod": "default/p1", "address": "10.0.0.2:8000", "in_flight": 0},
    ]
    lora = table["models"]["m-lora"]
    assert lora["matched_by"] == "loraAdapters"
    assert [r["route"] for r in lora["routes"]] == ["default/m"]


def test_decisions_newest_first_with_the_reason(admin: AdminHarness) -> None:
    assert admin.json("/debug/routing/decisions") == {"kept": 256, "decisions": []}
    served_with_retry(admin, "req-1")
    client = admin.send_chat(request_id="req-2")
    decisions = admin.json("/debug/routing/decisions")["decisions"]
    assert [d["request_id"] for d in decisions] == ["req-2", "req-1"]
    newest, first = decisions
    assert newest["in_flight"] is True
    assert (newest["status"], newest["error_type"], newest["duration_ms"]) == (None, None, None)
    assert newest["why"].endswith("in flight")
    assert first["model"] == "m"
    assert (first["route"], first["rule"], first["model_server"]) == (
        "default/m",
        "default",
        "default/base",
    )
    assert first["candidates"] == ["p0", "p1"]
    assert (first["chosen"], first["attempts"], first["status"]) == ("p1", 2, 200)
    assert first["error_type"] == "successful_request"
    assert first["failed_attempts"] == [
        {"pod": "p0", "error": "pod p0 unreachable: connection refused"}
    ]
    assert "attempt 2 after p0 failed: pod p0 unreachable: connection refused" in first["why"]
    assert first["in_flight"] is False
    assert first["duration_ms"] >= 0
    admin.upstream.last.respond_json(completion())
    assert client.got().status == 200
    assert [
        d["request_id"] for d in admin.json("/debug/routing/decisions?limit=1")["decisions"]
    ] == ["req-2"]
    assert admin.json("/debug/routing/decisions?model=other")["decisions"] == []
    assert admin.json("/debug/routing/decisions?limit=x", status=400)["error"] == (
        "limit must be a whole number"
    )


def test_a_request_that_failed_on_every_pod(admin: AdminHarness) -> None:
    client = admin.send_chat(request_id="doomed")
    for _ in range(3):  # no retry policy: connection failures are retried twice
        admin.upstream.last.fail(ConnectionRefusedError())
    assert client.got().status == 503
    (decision,) = admin.json("/debug/routing/decisions")["decisions"]
    assert (decision["status"], decision["error_type"], decision["attempts"]) == (503, "proxy", 3)
    assert decision["error"] == (
        "request to all pods failed: 3 attempts, the last: pod p0 unreachable: connection refused"
    )
    assert "gave up after attempt 3 on p0" in decision["why"]


def test_backends_per_pod(admin: AdminHarness) -> None:
    served_with_retry(admin)
    backends = {b["pod"]: b for b in admin.json("/debug/routing/backends")["backends"]}
    assert list(backends) == [
        "default/p0",
        "default/p1",
        "default/pre0",
        "default/dec0",
        "default/pending",
        "other/o0",
    ]
    p0 = backends["default/p0"]
    assert {k: v for k, v in p0.items() if k != "metrics"} == {
        "pod": "default/p0",
        "name": "p0",
        "namespace": "default",
        "address": "10.0.0.1:8000",
        "phase": "Running",
        "ready": True,
        "serving": True,
        "healthy": False,  # never scraped
        "in_flight": 0,
        "failures": 1,
        "last_error": "pod p0 unreachable: connection refused",
        "servers": ["default/base"],
        "idle_connections": 0,
        "outlier": {
            "ejected": False,
            "ejected_until": None,
            "ejections": 0,
            "consecutive_failures": 1,
            "last_failure": "pod p0 unreachable: connection refused",
        },
    }
    assert p0["metrics"]["scraped_at"] is None
    assert p0["metrics"]["scrapes"] == 0
    assert backends["default/p1"]["failures"] == 0
    pending = backends["default/pending"]
    assert (pending["ready"], pending["serving"], pending["servers"]) == (False, False, [])
    assert (pending["healthy"], pending["metrics"], pending["outlier"]) == (False, {}, None)


def test_pods_show_their_last_scrape() -> None:
    admin = AdminHarness()
    state = admin.pod("default/p0").state
    snapshot = EngineSnapshot(waiting=3, running=2, kv_usage=0.75)
    state.update(snapshot, admin.clock.seconds())
    state.ttft, state.tpot = 1.2, 0.045
    state.models, state.loras = frozenset({"org/m", "m-lora"}), frozenset({"m-lora"})
    pod = admin.json("/debug/config_dump/namespaces/default/pods/p0")
    assert pod["metrics"] == {
        "gpuCacheUsage": 0.75,
        "requestWaitingNum": 3,
        "requestRunningNum": 2,
        "tpot": 0.045,
        "ttft": 1.2,
    }
    assert pod["models"] == ["org/m", "m-lora"]
    backend = admin.json("/debug/routing/backends")["backends"][0]
    assert backend["healthy"] is True
    metrics = backend["metrics"]
    assert (metrics["waiting"], metrics["running"], metrics["kv_cache_usage"]) == (3, 2, 0.75)
    assert (metrics["scrapes"], metrics["loras"]) == (1, ["m-lora"])
    state.failed("connection refused")
    assert admin.json("/debug/routing/backends")["backends"][0]["metrics"]["last_scrape_error"] == (
        "connection refused"
    )
    admin.clock.advance(60)  # stale
    assert admin.json("/debug/routing/backends")["backends"][0]["healthy"] is False


def scraped(admin: AdminHarness) -> None:
    """Every serving pod answered a scrape just now."""
    for endpoint in admin.service.store.pods.values():
        endpoint.state.update(EngineSnapshot(), admin.clock.seconds())


def test_model_servers_and_their_status(admin: AdminHarness) -> None:
    scraped(admin)
    servers = admin.json("/debug/model-servers")["model_servers"]
    summary = {f"{s['namespace']}/{s['name']}": s for s in servers}
    assert summary["default/base"] == {
        "name": "base",
        "namespace": "default",
        "model": "org/m",
        "engine": "vLLM",
        "pd_group_key": None,
        "total_pods": 3,
        "serving_pods": 2,
        "ready_pods": 2,
        "health": "degraded",  # the Pending pod
    }
    assert (summary["default/pd"]["health"], summary["default/pd"]["pd_group_key"]) == (
        "healthy",
        "group",
    )
    assert summary["default/empty"]["health"] == "unhealthy"
    status = admin.json("/debug/model-servers/pd/status")
    assert [(p["name"], p["role"], p["serving"]) for p in status["pods"]] == [
        ("pre0", "prefill", True),
        ("dec0", "decode", True),
    ]
    assert status["traffic_policy"] == {"timeout_seconds": None, "retry": None}
    base = admin.json("/debug/model-servers/base/status?namespace=default")
    assert [(p["name"], p["serving"]) for p in base["pods"]] == [
        ("p0", True),
        ("p1", True),
        ("pending", False),
    ]


def test_one_health_rule_in_every_view() -> None:
    """Every pod unreachable: the views, the gauges and readiness all say so; then not."""
    admin = AdminHarness(readiness="anyModel")
    admin.plane.readiness.scraped = True
    for endpoint in admin.service.store.pods.values():
        for _ in range(3):
            endpoint.state.failed("ConnectionRefusedError: connection refused")

    def agree(healthy: bool) -> None:
        admin.service.metrics.observe_pods(admin.plane)
        base = admin.json("/debug/model-servers/base/status?namespace=default")
        assert (base["ready_pods"], base["health"]) == (
            (2, "degraded") if healthy else (0, "unhealthy")
        )
        assert [p["healthy"] for p in base["pods"]] == [healthy, healthy, False]
        backends = {b["pod"]: b for b in admin.json("/debug/routing/backends")["backends"]}
        assert backends["default/p0"]["healthy"] is healthy
        metrics = admin.service.metrics
        assert metrics.pods.server_health.labels("default/base", "default")._value.get() == healthy
        assert metrics.pods.lb_target_health.labels("default/p0", "org/m")._value.get() == healthy
        failures = metrics.pods.scrape_failures.labels("default/p0")._value.get()
        assert failures == (0 if healthy else 3)  # failed scrapes in a row
        readyz = Client(admin.proxy_site)
        readyz.request("GET", "/readyz")
        assert readyz.got().status == (200 if healthy else 503)
        assert admin.json("/debug/router/state")["ready"] is healthy

    agree(False)
    scraped(admin)
    agree(True)


def test_a_name_in_two_namespaces_needs_the_namespace(admin: AdminHarness) -> None:
    body = admin.json("/debug/model-servers/base/status", status=409)
    assert body["namespaces"] == ["default", "other"]
    assert "?namespace=" in body["error"]
    other = admin.json("/debug/model-servers/base/status?namespace=other")
    assert (other["namespace"], other["engine"]) == ("other", "SGLang")
    metrics = admin.json("/debug/model-servers/base/metrics?namespace=other")
    assert metrics["namespace"] == "other"


def test_model_server_metrics(admin: AdminHarness) -> None:
    served_with_retry(admin)
    client = admin.send_chat(request_id="open")
    metrics = admin.json("/debug/model-servers/base/metrics?namespace=default")
    assert (metrics["ready_pods"], metrics["in_flight"], metrics["failures"]) == (2, 1, 1)
    assert metrics["recent_requests"] == {
        "window": 2,
        "total": 2,
        "by_status": {"200": 1, "in_flight": 1},
        "retried": 1,
    }
    assert {
        "name": "kthena_router_active_upstream_requests",
        "labels": {"model_route": "default/m", "model_server": "default/base"},
        "value": 1.0,
    } in metrics["prometheus"]
    admin.upstream.last.respond_json(completion())
    assert client.got().status == 200
    pd = admin.json("/debug/model-servers/pd/metrics")
    assert (pd["in_flight"], pd["recent_requests"]["total"], pd["prometheus"]) == (0, 0, [])


# -- read-only


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH", "OPTIONS"])
@pytest.mark.parametrize("path", ["/debug/router/state", "/debug/no/such/thing", "/debug/"])
def test_only_get_and_head(admin: AdminHarness, method: str, path: str) -> None:
    response = admin.get(path, method=method)
    assert response.status == 405
    assert response.header("allow") == "GET, HEAD"
    assert response.header("content-type") == "application/json"
    assert "read-only" in response.json()["error"]


def test_head_answers_without_a_body(admin: AdminHarness) -> None:
    response = admin.get("/debug/router/state", method="HEAD")
    assert response.status == 200
    assert response.header("content-type") == "application/json"
    assert response.body == b""


# -- who may ask


def test_remote_clients_are_refused_by_default(admin: AdminHarness) -> None:
    for path in ("/debug/router/state", "/debug/no/such/thing"):
        response = admin.get(path, peer=REMOTE_PEER)
        assert response.status == 403
        assert response.header("content-type") == "application/json"
        assert "10.1.2.3 is not one" in response.json()["error"]
    assert admin.get("/debug/router/state", method="POST", peer=REMOTE_PEER).status == 403


@pytest.mark.parametrize(
    "peer",
    [
        IPv6Address("TCP", "::1", 5555),
        IPv6Address("TCP", "::ffff:127.0.0.1", 5555),
        IPv4Address("TCP", "127.9.9.9", 5555),
    ],
)
def test_loopback_in_every_form_is_allowed(
    admin: AdminHarness, peer: IPv4Address | IPv6Address
) -> None:
    assert admin.get("/debug/router/state", peer=peer).status == 200


def test_allow_list() -> None:
    admin = AdminHarness(observability={"debug": {"allow": ["10.0.0.0/8", "2001:db8::/32"]}})
    assert admin.get("/debug/router/state", peer=REMOTE_PEER).status == 200
    assert admin.get("/debug/router/state", peer=IPv6Address("TCP", "2001:db8::7", 1)).status == 200
    assert admin.get("/debug/router/state").status == 403  # loopback is not listed
    assert admin.get("/debug/router/state", peer=IPv4Address("TCP", "11.0.0.1", 1)).status == 403
    state = admin.json("/debug/router/state", peer=REMOTE_PEER)
    assert state["config"]["debug_access"]["allow"] == ["10.0.0.0/8", "2001:db8::/32"]


def bearer(token: str) -> list[tuple[str, str]]:
    return [("Authorization", f"Bearer {token}")]


def test_bearer_token_is_needed_on_top_of_the_address() -> None:
    admin = AdminHarness(observability={"debug": {"token": TOKEN}})
    assert admin.get("/debug/router/state").status == 403
    refused = admin.get("/debug/router/state", headers=bearer("wrong-token-0123456789"))
    assert refused.status == 403
    assert "Bearer" in refused.json()["error"]
    assert admin.get("/debug/router/state", headers=[("Authorization", TOKEN)]).status == 403
    assert admin.get("/debug/router/state", headers=bearer(TOKEN)).status == 200
    assert (
        admin.get("/debug/router/state", headers=[("authorization", f"bearer {TOKEN}")]).status
        == 200
    )
    # Loopback is still the only network allowed: the token alone does not let 10.1.2.3 in.
    assert admin.get("/debug/router/state", peer=REMOTE_PEER, headers=bearer(TOKEN)).status == 403


def test_token_from_anywhere_with_an_empty_allow_list() -> None:
    admin = AdminHarness(observability={"debug": {"token": TOKEN, "allow": []}})
    state = admin.get("/debug/router/state", peer=REMOTE_PEER, headers=bearer(TOKEN))
    assert state.status == 200
    assert TOKEN not in state.body.decode()
    assert state.json()["config"]["debug_access"] == {"allow": ["any address"], "token": "set"}
    assert admin.get("/debug/router/state", peer=REMOTE_PEER).status == 403


def test_debug_disabled_leaves_metrics_alone() -> None:
    admin = AdminHarness(observability={"debug": {"enabled": False}})
    body = admin.json("/debug/router/state", status=404)
    assert body == {"error": "nothing at /debug/router/state"}
    assert admin.get("/metrics").status == 200
    assert admin.service.admin.debug_resource is None


def test_debug_on_a_port_of_its_own() -> None:
    admin = AdminHarness(observability={"debug": {"port": 9091}})
    assert sorted(admin.sites) == ["admin", "debug"]
    assert admin.get("/debug/router/state", listener="admin").status == 404
    assert admin.get("/metrics", listener="debug").status == 404
    state = admin.json("/debug/router/state", listener="debug")
    assert [(x["name"], x["endpoint"], x["serves"]) for x in state["listeners"]] == [
        ("proxy", "tcp:8080", ["/v1/*", "/healthz", "/readyz"]),
        ("admin", "tcp:9090", ["/metrics"]),
        ("debug", "tcp:9091", ["/debug/"]),
    ]


# -- secrets


def test_no_secret_in_any_answer() -> None:
    admin = AdminHarness(observability={"debug": {"token": TOKEN}})
    served_with_retry(admin)
    for path in LIST_ENDPOINTS:
        body = admin.get(path, headers=bearer(TOKEN)).body.decode()
        for secret in (REDIS_PASSWORD, AUTH_HEADER_VALUE, "sk-live", TOKEN):
            assert secret not in body, (path, secret)


# -- config


def parse_debug(debug: dict[str, Any]) -> Any:
    config = parse_config({"observability": {"debug": debug}}, "r.yaml", Path("."), [])
    return config.observability.debug


def test_debug_config_defaults_and_values() -> None:
    default = parse_debug({})
    assert (default.enabled, default.port, default.allow, default.token) == (
        True,
        9090,
        LOOPBACK_NETWORKS,
        None,
    )
    given = parse_debug({"allow": ["10.0.0.0/8", "192.168.1.7", "::1"], "token": TOKEN})
    assert [str(n) for n in given.allow] == ["10.0.0.0/8", "192.168.1.7/32", "::1/128"]
    assert given.token == TOKEN
    assert TOKEN not in repr(given)


@pytest.mark.parametrize(
    ("debug", "message"),
    [
        (
            {"allow": ["10.1.2.3/8"]},
            "allow[0]: '10.1.2.3/8' has host bits set; did you mean 10.0.0.0/8?",
        ),
        ({"allow": ["localhost"]}, "allow[0]: must be an IP address or network (CIDR)"),
        ({"allow": "10.0.0.0/8"}, "allow: must be a list"),
        ({"allow": None}, "allow: must be a list of networks"),
        ({"allow": []}, "allow: an empty list lets every address in, which needs a token"),
        ({"token": "short"}, "token: must be at least 16 characters long"),
        ({"token": "has spaces in it, quite long"}, "token: must be a bearer token"),
        ({"token": 1234567890123456789}, "token: must be a string"),
        ({"tokne": TOKEN}, "debug.tokne: unknown field"),
    ],
)
def test_debug_config_errors(debug: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_debug(debug)
    assert "r.yaml: observability.debug." in str(caught.value)
    assert message in str(caught.value)


def test_admin_and_debug_listen_keys() -> None:
    config = parse_config(
        {"adminListen": "tcp:9090:interface=127.0.0.1", "debugListen": 9191},
        "r.yaml",
        Path("."),
        [],
    )
    assert (config.admin_listen, config.debug_listen) == (
        "tcp:9090:interface=127.0.0.1",
        "tcp:9191",
    )
    assert parse_config({}, "r.yaml", Path("."), []).admin_listen is None


def test_a_redis_in_use_has_its_error_series_at_zero(admin: AdminHarness) -> None:
    """So that a rate over them reads 0, not nothing, while Redis answers (the alert and
    the dashboard panel on them have data before the first failure)."""
    registry = admin.service.registry
    name = "kthena_router_rate_limit_backend_errors_total"
    for operation in ("check", "settle"):
        labels = {"backend": "redis", "operation": operation}
        assert registry.get_sample_value(name, labels) == 0
