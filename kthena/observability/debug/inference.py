"""
C{/debug/inference-extension/pools}, C{.../pools/{pool}/endpoints} and
C{.../decisions}: the Gateway API Inference Extension as the router routes by it. For
each InferencePool, what sends to it (the HTTPRoutes' rules), what renames models in it
(its InferenceModelRewrites) and its pods under the one health rule; then the last
requests HTTPRoutes sent to pools, with the route, the pool, the Gateway listener and
the model a rewrite gave them, which is what one needs to answer "why did this request
go there, under that name?".

The router picks a pool's endpoints itself (a pool's C{endpointPickerRef} is not
called), so a pool's pods are shown exactly as a model server's are
(L{kthena.observability.debug.servers}), and its decisions exactly as
C{/debug/routing/decisions} shows them (L{Routing.decision_view}: its C{http_route},
C{inference_pool}, C{gateway} and C{rewritten_model} are set for them).
"""

from __future__ import annotations

from kthena.config.inference import InferencePool, ModelRewrite
from kthena.config.resources import Pod
from kthena.inference_routing import route_order
from kthena.observability.debug.common import DebugSources, Views, _find_named, _scraped
from kthena.observability.debug.routing import Routing
from kthena.observability.decisions import DECISIONS_KEPT
from kthena.pods import PodEndpoint


def _address(ip: str | None, port: int) -> str | None:
    """C{ip:port} as an authority (IPv6 in brackets); C{None} for a pod with no IP yet."""
    if not ip:
        return None
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def _rewrite_view(rewrite: ModelRewrite) -> dict[str, object]:
    """A rewrite's rules as they apply: C{models} C{[]} takes every model (a generic
    rule, which an exact rule of any of the pool's rewrites outranks)."""
    return {
        "name": rewrite.meta.name,
        "created": rewrite.meta.created,
        "rules": [
            {
                "models": list(rule.models),
                "targets": [{"model": t.model, "weight": t.weight} for t in rule.targets],
            }
            for rule in rewrite.rules
        ],
    }


class InferenceExtension(Views):
    def __init__(self, sources: DebugSources) -> None:
        super().__init__(sources)
        self._routing = Routing(sources)

    # -- pools

    def _route_views(self, pool: InferencePool) -> list[dict[str, object]]:
        """
        The HTTPRoutes with a rule that sends to C{pool}, in the order the Gateway API
        breaks ties between routes; whether each attaches to the router's Gateway
        listener (a route that does not never sends it a request, however its rules
        read), and each rule's weight for the pool among the rule's pools.
        """
        key = pool.meta.key
        via = self.plane.config.gateway
        views: list[dict[str, object]] = []
        for route in sorted(self._resources.httproutes, key=route_order):
            rules = []
            for rule in route.rules:
                weight = sum(b.weight for b in rule.backends if b.key == key)
                if not weight:
                    continue
                total = sum(b.weight for b in rule.backends)
                rules.append(
                    {"name": rule.name, "weight": weight, "share": round(weight / total, 4)}
                )
            if rules:
                views.append(
                    {"route": route.meta.key, "attached": route.attaches(via), "rules": rules}
                )
        return views

    def _pool_summary(self, pool: InferencePool) -> dict[str, object]:
        """A pool and its pod counts by the one health rule (as a model server's: a pod
        counts as ready with one healthy endpoint), and its endpoints' (a pod on each
        target port)."""
        health = self.plane.health.server(pool.server)
        return {
            "name": pool.meta.name,
            "namespace": pool.meta.namespace,
            "selector": {"matchLabels": dict(pool.match_labels)},
            "target_ports": list(pool.target_ports),
            "engine": pool.server.engine,
            "http_routes": self._route_views(pool),
            "rewrites": [_rewrite_view(r) for r in self.store.pool_rewrites(pool)],
            "total_pods": health.selected,
            "serving_pods": len({e.pod.meta.key for e in health.pods}),
            "ready_pods": len({e.pod.meta.key for e in health.healthy}),
            "serving_endpoints": len(health.pods),
            "ready_endpoints": len(health.healthy),
            "health": health.status,
        }

    def pools(self) -> dict[str, object]:
        gateway = self.plane.config.gateway
        return {
            "gateway": gateway.key if gateway is not None else None,
            "pools": [self._pool_summary(p) for p in self._resources.pools],
        }

    def find_pool(self, name: str, namespace: str | None) -> InferencePool:
        return _find_named("InferencePool", self._resources.pools, name, namespace)

    # -- endpoints

    def _endpoint_view(
        self, pool: InferencePool, pod: Pod, endpoint: PodEndpoint | None, port: int
    ) -> dict[str, object]:
        """
        A pod as the model-server status view shows it, its last scrape, and two
        addresses: the pool's (the pod's IP and target C{port}) and the one the router
        sends to (C{None} while the pod does not serve), which differ when the pod's port
        annotation sets it.
        """
        view = self._endpoint_live(pod, endpoint)
        view["endpoint"] = endpoint.key if endpoint is not None else None
        view["address"] = _address(pod.ip, port)
        view["upstream_address"] = endpoint.authority if endpoint is not None else None
        view["metrics"] = _scraped(endpoint)
        return view

    def pool_endpoints(self, pool: InferencePool) -> dict[str, object]:
        """Every pod the pool's selector selects, serving or not: one entry for each of
        its endpoints (each target port), one for a pod that serves none."""
        view = self._pool_summary(pool)
        members = self.store.server_pods(pool.server)
        entries = []
        for pod in self._resources.pods:
            if not pool.selects(pod):
                continue
            mine = [e for e in members if e.pod is pod]
            if not mine:
                entries.append(self._endpoint_view(pool, pod, None, pool.target_ports[0]))
            several = len(pool.target_ports) > 1
            for endpoint in mine:
                port = endpoint.port if several else pool.target_ports[0]
                entries.append(self._endpoint_view(pool, pod, endpoint, port))
        view["endpoints"] = entries
        return view

    # -- decisions

    def decisions(self, limit: int | None = None) -> dict[str, object]:
        """The last requests sent to a pool, newest first (from the decision ring,
        which also keeps those sent to model servers)."""
        views: list[dict[str, object]] = []
        for record in reversed(self.ring):
            if limit is not None and len(views) >= limit:
                break
            match = record.match
            if match is None or match.server.kind != "InferencePool":
                continue
            views.append(self._routing.decision_view(record))
        return {"kept": DECISIONS_KEPT, "decisions": views}
