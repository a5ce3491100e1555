"""
C{/debug/model-servers}, C{/debug/model-servers/{name}/status} and C{.../metrics}: each
model server's pods and health (the one health rule), traffic policy, recent requests and
its Prometheus series.
"""

from __future__ import annotations

from collections import Counter

from kthena.config.resources import ModelServer, Pod
from kthena.observability.debug.common import Views, _find_named


class Servers(Views):
    def _server_pods(self, server: ModelServer) -> list[tuple[Pod, str | None]]:
        """Every pod the server selects by labels, serving or not, with its PD role."""
        return [(p, server.pd_role(p)) for p in self._resources.pods if server.selects(p)]

    def _server_summary(self, server: ModelServer) -> dict[str, object]:
        health = self.plane.health.server(server)
        group = server.pd_group
        return {
            "name": server.meta.name,
            "namespace": server.meta.namespace,
            "model": server.model,
            "engine": server.engine,
            "pd_group_key": group.group_key if group is not None else None,
            "total_pods": health.selected,
            "serving_pods": len(health.pods),
            "ready_pods": len(health.healthy),
            "health": health.status,
        }

    def model_servers(self) -> dict[str, object]:
        return {"model_servers": [self._server_summary(s) for s in self._resources.servers]}

    def find_server(self, name: str, namespace: str | None) -> ModelServer:
        return _find_named("ModelServer", self._resources.servers, name, namespace)

    def server_status(self, server: ModelServer) -> dict[str, object]:
        view = self._server_summary(server)
        pods = []
        for pod, role in self._server_pods(server):
            live = self._pod_live(pod)
            live["role"] = role
            pods.append(live)
        view["pods"] = pods
        retry = server.retry
        view["traffic_policy"] = {
            "timeout_seconds": server.timeout,
            "retry": None
            if retry is None
            else {"attempts": retry.attempts, "interval_seconds": retry.interval},
        }
        return view

    def server_metrics(self, server: ModelServer) -> dict[str, object]:
        key = server.meta.key
        members = self.store.server_pods(server)
        recent = [
            ctx for ctx in self.ring if ctx.match is not None and ctx.match.model_server == key
        ]
        by_status = Counter(
            "in_flight" if ctx.finished is None else str(ctx.status) for ctx in recent
        )
        metrics = self.metrics
        families = (
            metrics.active_upstream,
            metrics.pods.server_health,
            metrics.pods.server_queue_depth,
            metrics.pods.server_gpu_utilization,
            metrics.pods.server_memory,
        )
        samples = []
        for family in families:
            for metric in family.collect():
                for sample in metric.samples:
                    labels = sample.labels
                    if labels.get("model_server") not in (key, server.meta.name):
                        continue
                    if labels.get("namespace", server.meta.namespace) != server.meta.namespace:
                        continue
                    samples.append(
                        {"name": sample.name, "labels": dict(labels), "value": sample.value}
                    )
        return {
            "name": server.meta.name,
            "namespace": server.meta.namespace,
            "ready_pods": len(members),
            "in_flight": sum(p.in_flight for p in members),
            "failures": sum(p.failures for p in members),
            "recent_requests": {
                "window": len(self.ring),
                "total": len(recent),
                "by_status": dict(sorted(by_status.items())),
                "retried": sum(1 for ctx in recent if ctx.attempts > 1),
            },
            "prometheus": samples,
        }
