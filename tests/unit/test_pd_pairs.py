"""
Prefill/decode pairing: decode candidates best first, each with the best prefill pod of
its own group by the same scheduler, never across groups, round the group's prefill
ranking on retries, and a group's prefill ranking made only when it is needed.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import islice
from pathlib import Path

from kthena.config.resources import PDPolicy
from kthena.config.router import parse_config
from kthena.pd.pairs import PDPlan, Rank, Roles
from kthena.pods import PodEndpoint
from kthena.scheduler.framework import Decision
from kthena.store import Datastore
from tests.unit.routerfixtures import pd_server, pod, simple_route

PD_SERVER = pd_server("pd", "pd", "org/m")


def pd_pod(name: str, ip: str, role: str, group: str | None) -> dict[str, object]:
    labels = {"app": "pd", "role": role}
    if group is not None:
        labels["group"] = group
    return pod(name, ip, labels)


def plan_for(*pods: dict[str, object], rank: Rank | None = None) -> tuple[PDPlan, list[str]]:
    config = parse_config(
        {"resources": [simple_route("m", "m", "pd"), PD_SERVER, *pods]}, "t.yaml", Path("."), []
    )
    store = Datastore()
    store.replace(config.resources)
    pd = next(s for s in config.resources.servers if s.meta.name == "pd")
    ranked: list[str] = []

    def by_name(pods: Sequence[PodEndpoint]) -> Decision:
        ranked.append(",".join(sorted(p.name for p in pods)))
        return Decision(candidates=sorted(pods, key=lambda p: p.name))

    return PDPlan.make(pd, store.server_pods(pd), rank or by_name), ranked


TWO_GROUPS = (
    pd_pod("d1a", "10.0.0.1", "decode", "g1"),
    pd_pod("p1a", "10.0.0.2", "prefill", "g1"),
    pd_pod("p1b", "10.0.0.3", "prefill", "g1"),
    pd_pod("d2a", "10.0.0.4", "decode", "g2"),
    pd_pod("d2b", "10.0.0.5", "decode", "g2"),
    pd_pod("p2a", "10.0.0.6", "prefill", "g2"),
)


def names(plan: PDPlan, count: int) -> list[tuple[str, str | None, str]]:
    """The first C{count} pairs (the dispatcher takes one per attempt)."""
    return [
        (p.group, None if p.prefill is None else p.prefill.name, p.decode.name)
        for p in islice(plan.pairs(), count)
    ]


def test_each_decode_candidate_pairs_with_its_groups_best_prefill() -> None:
    plan, ranked = plan_for(*TWO_GROUPS)
    assert names(plan, 3) == [("g1", "p1a", "d1a"), ("g2", "p2a", "d2a"), ("g2", "p2a", "d2b")]
    assert ranked == ["d1a,d2a,d2b", "p1a,p1b", "p2a"]  # the scheduler ranked both roles
    assert set(plan.prefill) == {"g1", "g2"}


def test_retries_go_round_a_groups_prefill_ranking() -> None:
    plan, _ = plan_for(
        pd_pod("d1", "10.0.0.1", "decode", "g"),
        pd_pod("d2", "10.0.0.2", "decode", "g"),
        pd_pod("d3", "10.0.0.3", "decode", "g"),
        pd_pod("pa", "10.0.0.4", "prefill", "g"),
        pd_pod("pb", "10.0.0.5", "prefill", "g"),
    )
    assert [(p, d) for _, p, d in names(plan, 3)] == [("pa", "d1"), ("pb", "d2"), ("pa", "d3")]


def test_with_one_decode_pod_a_retry_takes_the_next_prefill_pod() -> None:
    plan, _ = plan_for(
        pd_pod("d", "10.0.0.1", "decode", "g"),
        pd_pod("pa", "10.0.0.2", "prefill", "g"),
        pd_pod("pb", "10.0.0.3", "prefill", "g"),
    )
    assert [(p, d) for _, p, d in names(plan, 3)] == [("pa", "d"), ("pb", "d"), ("pa", "d")]


def test_pairs_never_cross_groups_and_unpaired_pods_are_left_out() -> None:
    plan, ranked = plan_for(
        pd_pod("d1", "10.0.0.1", "decode", "g1"),
        pd_pod("p2", "10.0.0.2", "prefill", "g2"),  # its group has no decode pod
        pd_pod("d3", "10.0.0.3", "decode", "g3"),  # its group has no prefill pod
        pd_pod("p1", "10.0.0.4", "prefill", "g1"),
        pd_pod("dx", "10.0.0.5", "decode", None),  # no group label
        pod("other", "10.0.0.6", {"app": "pd", "role": "neither", "group": "g1"}),
    )
    assert names(plan, 3) == [("g1", "p1", "d1")] * 3  # the one pair, round after round
    assert ranked[0] == "d1"  # only decode pods that can pair are ranked
    assert plan.roles.prefill == {
        "g1": [plan.roles.prefill["g1"][0]],
        "g2": plan.roles.prefill["g2"],
    }


def test_a_groups_prefill_ranking_is_made_only_when_reached() -> None:
    plan, ranked = plan_for(*TWO_GROUPS)
    first = next(plan.pairs())
    assert first.prefill is not None and first.prefill.name == "p1a"
    assert ranked == ["d1a,d2a,d2b", "p1a,p1b"]


def test_the_schedulers_filters_apply_to_prefill_pods() -> None:
    def no_p1a(pods: Sequence[PodEndpoint]) -> Decision:
        kept = sorted((p for p in pods if p.name != "p1a"), key=lambda p: p.name)
        return Decision(candidates=kept)

    plan, _ = plan_for(*TWO_GROUPS, rank=no_p1a)
    assert names(plan, 1) == [("g1", "p1b", "d1a")]


def test_roles_follow_kthenas_rule_decode_labels_win() -> None:
    config = parse_config(
        {"resources": [simple_route("m", "m", "pd"), PD_SERVER,
                       pod("both", "10.0.0.1", {"app": "pd", "role": "decode", "group": "g"})]},
        "t.yaml", Path("."), [],
    )  # fmt: skip
    store = Datastore()
    store.replace(config.resources)
    pd = next(s for s in config.resources.servers if s.meta.name == "pd")
    roles = Roles.of(pd, store.server_pods(pd))
    assert [p.name for p in roles.decode] == ["both"] and roles.prefill == {}


def test_decode_only_pairs_have_no_prefill_and_need_no_prefill_pod() -> None:
    config = parse_config(
        {"resources": [simple_route("m", "m", "pd"), PD_SERVER,
                       pd_pod("d1", "10.0.0.1", "decode", "g1"),
                       pd_pod("d2", "10.0.0.2", "decode", "g2")]},
        "t.yaml", Path("."), [],
    )  # fmt: skip
    store = Datastore()
    store.replace(config.resources)
    pd = next(s for s in config.resources.servers if s.meta.name == "pd")

    def by_name(pods: Sequence[PodEndpoint]) -> Decision:
        return Decision(candidates=sorted(pods, key=lambda p: p.name))

    assert list(PDPlan.make(pd, store.server_pods(pd), by_name).pairs()) == []  # it ends
    plan = PDPlan.make(pd, store.server_pods(pd), by_name, PDPolicy(below_tokens=10), 9)
    assert names(plan, 4) == [("g1", None, "d1"), ("g2", None, "d2")] * 2
    assert plan.prefill == {}
