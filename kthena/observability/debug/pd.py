"""
C{/debug/pd-groups}, C{/debug/pd-groups/{group_key}/status} and
C{/debug/kv-cache/connectors}: each prefill/decode group (the value of its server's
C{groupKey} label) with its pods by role and their health, the pairs recent requests
took, and what each KV connector did (operations by status, bytes moved, prefill
latency quantiles) with each server's KV sizing.
"""

from __future__ import annotations

from collections import Counter

from kthena.config.resources import ModelServer, Pod
from kthena.observability.debug.common import DebugError, Views
from kthena.record import RequestRecord

RECENT_PAIRS = 20
"""Pairs shown per group, newest first (from the decision ring)."""


class PDGroups(Views):
    def _groups(self) -> dict[str, list[tuple[ModelServer, Pod, str]]]:
        """Group value -> (server, pod, role) of every pod in a PD group."""
        groups: dict[str, list[tuple[ModelServer, Pod, str]]] = {}
        for server in self._resources.servers:
            group = server.pd_group
            if group is None:
                continue
            for pod in self._resources.pods:
                value = pod.meta.labels.get(group.group_key)
                role = server.pd_role(pod)
                if server.selects(pod) and value and role is not None:
                    groups.setdefault(value, []).append((server, pod, role))
        return groups

    def pd_groups(self) -> dict[str, object]:
        views = []
        for value, members in sorted(self._groups().items()):
            roles: Counter[str] = Counter()
            healthy: Counter[str] = Counter()
            for _, pod, role in members:
                roles[role] += 1
                healthy[role] += self._healthy(self._endpoint(pod))
            views.append(
                {
                    "group_key": value,
                    "model_servers": sorted({s.meta.key for s, _, _ in members}),
                    "pods": {role: roles[role] for role in ("prefill", "decode")},
                    "healthy_pods": {role: healthy[role] for role in ("prefill", "decode")},
                    "pairable": healthy["prefill"] > 0 and healthy["decode"] > 0,
                    "recent_pairs": self._recent_pairs(value),
                }
            )
        return {"pd_groups": views}

    def pd_group_status(self, group_key: str) -> dict[str, object]:
        members = self._groups().get(group_key)
        if not members:
            raise DebugError(404, f"no prefill/decode group {group_key!r}")
        by_role: dict[str, list[dict[str, object]]] = {"prefill": [], "decode": []}
        for server, pod, role in members:
            live = self._pod_live(pod)
            endpoint = self._endpoint(pod)
            state = endpoint.state if endpoint is not None else None
            live["model_server"] = server.meta.key
            live["kv_cache_usage"] = None if state is None else state.kv_usage
            live["waiting"] = None if state is None else state.waiting
            live["prefix_cache_hit_rate"] = None if state is None else state.prefix_hit_rate
            by_role[role].append(live)
        return {
            "group_key": group_key,
            "roles": {
                role: {
                    "pods": pods,
                    "in_flight": sum(_number(p["in_flight"]) for p in pods),
                    "failures": sum(_number(p["failures"]) for p in pods),
                }
                for role, pods in by_role.items()
            },
            "recent_pairs": self._recent_pairs(group_key),
        }

    def _recent_pairs(self, group_key: str) -> list[dict[str, object]]:
        pairs: list[dict[str, object]] = []
        for record in reversed(self.ring):
            if len(pairs) >= RECENT_PAIRS:
                break
            pairs.extend(_pairs_of(record, group_key))
        return pairs[:RECENT_PAIRS]

    def kv_connectors(self) -> dict[str, object]:
        metrics = self.metrics.pd
        connectors: dict[str, dict[str, object]] = {}

        def entry(name: str) -> dict[str, object]:
            return connectors.setdefault(
                name, {"operations": {}, "transfer_bytes": {}, "latency_seconds": {}}
            )

        for family in metrics.kv_cache_transfer_bytes.collect():
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    moved = entry(sample.labels["connector_type"])["transfer_bytes"]
                    assert isinstance(moved, dict)
                    moved[sample.labels["direction"]] = sample.value
        for family in metrics.kv_cache_operations.collect():
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    labels = sample.labels
                    ops = entry(labels["connector_type"])["operations"]
                    assert isinstance(ops, dict)
                    ops.setdefault(labels["operation"], {})[labels["status"]] = sample.value
        for family in metrics.kv_cache_latency.collect():
            for sample in family.samples:
                quantile = sample.labels.get("quantile")
                if quantile is not None:
                    latency = entry(sample.labels["connector_type"])["latency_seconds"]
                    assert isinstance(latency, dict)
                    latency.setdefault(sample.labels["operation"], {})[quantile] = sample.value
        for server in self._resources.servers:
            if server.pd_group is not None:
                servers = entry(server.kv_connector or "http").setdefault("model_servers", [])
                assert isinstance(servers, list)
                servers.append(
                    {
                        "name": server.meta.key,
                        "block_size": server.kv_block_size,
                        "bytes_per_token": server.kv_bytes_per_token,
                    }
                )
        return {"kv_connectors": connectors}


def _number(value: object) -> int:
    return value if isinstance(value, int) else 0


def _pairs_of(record: RequestRecord, group_key: str) -> list[dict[str, object]]:
    """The pairs C{record} tried in C{group_key}: each prefill leg with the decode after it."""
    legs = record.legs or []
    found: list[dict[str, object]] = []
    for i, leg in enumerate(legs):
        if leg.role != "prefill" or leg.group != group_key:
            continue
        decode = legs[i + 1] if i + 1 < len(legs) and legs[i + 1].role == "decode" else None
        found.append(
            {
                "request_id": record.request_id,
                "prefill_pod": leg.pod,
                "prefill_status": leg.status,
                "decode_pod": decode.pod if decode is not None else None,
                "decode_status": decode.status if decode is not None else None,
            }
        )
    return found
