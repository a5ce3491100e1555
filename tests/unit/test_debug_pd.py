"""
The prefill/decode debug views: each group with its pods by role and health, a group's
status per role, the pairs recent requests took, 404 for an unknown group, and what each
KV connector did, from the router's own metrics.
"""

from __future__ import annotations

from collections.abc import Sequence

from kthena.pd.pairs import PDPlan
from kthena.pods import PodEndpoint
from kthena.record import Leg, RequestRecord
from kthena.scheduler.framework import Decision
from tests.unit.adminfixtures import AdminHarness


def pd_record(admin: AdminHarness, request_id: str, *legs: Leg) -> RequestRecord:
    record = RequestRecord(request_id, "POST", "/v1/chat/completions", 0.0, model="m")
    record.legs = list(legs)
    admin.service.decisions.started(record)
    return record


def test_pd_groups_list_each_group_with_its_pods_by_role() -> None:
    admin = AdminHarness()
    pd_record(
        admin,
        "r1",
        Leg("g1", "prefill", "pre0", 1.0, 1.2, 503),
        Leg("g1", "prefill", "pre0", 1.3, 1.4, 200),
        Leg("g1", "decode", "dec0", 1.4, 2.0, 200),
    )
    groups = admin.json("/debug/pd-groups")["pd_groups"]
    assert [g["group_key"] for g in groups] == ["g1"]
    group = groups[0]
    assert group["model_servers"] == ["default/pd"]
    assert group["pods"] == {"prefill": 1, "decode": 1}
    assert group["recent_pairs"] == [
        {"request_id": "r1", "prefill_pod": "pre0", "prefill_status": 503,
         "decode_pod": None, "decode_status": None},
        {"request_id": "r1", "prefill_pod": "pre0", "prefill_status": 200,
         "decode_pod": "dec0", "decode_status": 200},
    ]  # fmt: skip


def test_a_groups_status_per_role_and_an_unknown_group() -> None:
    admin = AdminHarness()
    admin.pod("default/dec0").in_flight = 2
    status = admin.json("/debug/pd-groups/g1/status")
    assert status["group_key"] == "g1"
    roles = status["roles"]
    assert [p["name"] for p in roles["prefill"]["pods"]] == ["pre0"]
    assert [p["name"] for p in roles["decode"]["pods"]] == ["dec0"]
    assert (roles["decode"]["in_flight"], roles["prefill"]["in_flight"]) == (2, 0)
    assert {"kv_cache_usage", "waiting", "prefix_cache_hit_rate"} <= set(roles["decode"]["pods"][0])
    assert admin.json("/debug/pd-groups/nope/status", status=404) == {
        "error": "no prefill/decode group 'nope'"
    }


def test_kv_connectors_say_what_each_did() -> None:
    admin = AdminHarness()
    metrics = admin.service.metrics
    metrics.pd.kv_cache_operations.labels("http", "prefill", "success").inc(3)
    metrics.pd.kv_cache_operations.labels("http", "prefill", "failure").inc()
    metrics.pd.kv_cache_latency.observe(0.25, "http", "prefill")
    metrics.pd.kv_cache_transfer_bytes.labels("http", "send").inc(4096)
    view = admin.json("/debug/kv-cache/connectors")["kv_connectors"]
    http = view["http"]
    assert http["operations"] == {"prefill": {"success": 3.0, "failure": 1.0}}
    assert http["transfer_bytes"] == {"send": 4096.0}
    assert http["latency_seconds"]["prefill"]["0.5"] == 0.25
    server = {"name": "default/pd", "block_size": 16, "bytes_per_token": None}
    assert http["model_servers"] == [server]


def test_a_pd_decision_shows_both_rankings_and_the_legs() -> None:
    admin = AdminHarness()
    store = admin.service.store
    server = next(s for s in store.resources.servers if s.meta.name == "pd")

    def by_name(pods: Sequence[PodEndpoint]) -> Decision:
        return Decision(candidates=sorted(pods, key=lambda p: p.name))

    plan = PDPlan.make(server, store.server_pods(server), by_name)
    first = next(plan.pairs())
    assert (first.prefill is not None, first.decode.name) == (True, "dec0")
    record = pd_record(
        admin,
        "r2",
        Leg("g1", "prefill", "pre0", 1.0, 1.1, 200),
        Leg("g1", "decode", "dec0", 1.1, 1.5, 200),
    )
    record.pd_plan, record.decision = plan, plan.decode
    view = admin.json("/debug/routing/decisions")["decisions"][0]
    assert view["candidates"] == ["dec0"]
    assert view["prefill"]["by_group"]["g1"]["candidates"] == ["pre0"]
    assert [leg["role"] for leg in view["prefill"]["legs"]] == ["prefill", "decode"]
    assert view["prefill"]["decode_only"] is None
    plan.why_direct = "dec0 holds 0.95 of the prefix (>= 0.9)"
    view = admin.json("/debug/routing/decisions")["decisions"][0]
    assert view["prefill"]["decode_only"] == "dec0 holds 0.95 of the prefix (>= 0.9)"


def test_a_groups_kv_cache_hit_rate_is_its_pods_hits_over_queries() -> None:
    admin = AdminHarness()
    metrics = admin.service.metrics
    name = "kthena_pd_group_kv_cache_hit_rate"
    labels = {"group_key": "g1", "model": "org/m"}
    admin.pod("default/pre0").state.prefix_period = (30.0, 40.0)
    admin.pod("default/dec0").state.prefix_period = (10.0, 60.0)
    metrics.observe_pods(admin.plane)
    assert metrics.registry.get_sample_value(name, labels) == 0.4  # 40 hits of 100 queries
    for key in ("default/pre0", "default/dec0"):
        admin.pod(key).state.prefix_period = (0.0, 0.0)  # no query in the period
    metrics.observe_pods(admin.plane)
    assert metrics.registry.get_sample_value(name, labels) is None
