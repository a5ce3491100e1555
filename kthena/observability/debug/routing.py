"""
C{/debug/router/state}, C{/debug/routing/table}, C{/debug/routing/decisions} and
C{/debug/routing/backends}: the router's own views, in snake_case like the access log.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from twisted.internet.defer import Deferred

from kthena.config.resources import ModelRoute, Rule
from kthena.observability.debug.common import (
    Views,
    _epoch_text,
    _match_view,
    _scores,
    _scraped,
)
from kthena.observability.decisions import DECISIONS_KEPT
from kthena.pd.pairs import PDPlan
from kthena.record import RequestRecord
from kthena.redact import redact_url


def _prefill_rankings(ctx: RequestRecord) -> dict[str, object] | None:
    """A PD request's prefill rankings per group (its C{candidates} are decode pods), and
    the legs it sent; C{None} for an aggregated request."""
    plan = ctx.pd_plan
    if not isinstance(plan, PDPlan):
        return None
    return {
        "decode_only": plan.why_direct,
        "by_group": {
            group: {"candidates": [p.name for p in d.candidates], "scores": _scores(d)}
            for group, d in sorted(plan.prefill.items())
        },
        "legs": [
            {"group": leg.group, "role": leg.role, "pod": leg.pod, "status": leg.status}
            for leg in ctx.legs or ()
        ],
    }


class Routing(Views):
    def router_state(self) -> Deferred[dict[str, object]]:
        """The router's state; its rate limits may be in Redis (a Deferred, then)."""
        state = self._router_state()
        plane = self.plane
        state["identity"] = plane.identification.identifier.state()
        state["fairness"] = plane.fairness.state()

        def with_limits(limits: dict[str, object]) -> dict[str, object]:
            state["rate_limits"] = limits
            return state

        return self.plane.limits.state().addCallback(with_limits)

    def _router_state(self) -> dict[str, object]:
        plane = self.plane
        config = plane.config
        store = self.store
        access = self.sources.access
        in_flight = plane.inflight.records()
        by_model: Counter[str] = Counter(record.model or "unknown" for record in in_flight)
        pools = [
            {
                "pod": endpoint.key,
                "address": endpoint.authority,
                "idle_connections": plane.upstream.idle_connections(endpoint),
                "in_flight": endpoint.in_flight,
            }
            for endpoint in sorted(store.pods.values(), key=lambda e: e.key)
        ]
        now = self.sources.clock()
        return {
            "started_at": _epoch_text(plane.started_at),
            "uptime_seconds": round(max(0.0, now - plane.started_at), 3),
            "ready": plane.readiness.check()[0],
            "draining": plane.readiness.draining,
            "config": {
                "generation": store.generation,
                "source": config.source,
                "files": list(config.files),
                "resources": {
                    "modelroutes": len(store.resources.routes),
                    "modelservers": len(store.resources.servers),
                    "pods": len(store.resources.pods),
                    "inferencepools": len(store.resources.pools),
                    "httproutes": len(store.resources.httproutes),
                    "inferencemodelrewrites": len(store.resources.rewrites),
                },
                "debug_access": {
                    "allow": [str(n) for n in access.allow] or ["any address"],
                    "token": "set" if access.token_set else None,
                },
            },
            "active_requests": {
                "total": len(in_flight),
                "by_model": dict(sorted(by_model.items())),
            },
            "listeners": [listener.view() for listener in self.sources.listeners()],
            "kubernetes": self._watches(now),
            "upstream": {
                "max_connections_per_pod": config.upstream.max_connections_per_pod,
                "pool_idle_timeout_seconds": config.upstream.pool_idle_timeout,
                "connect_timeout_seconds": config.upstream.connect_timeout,
                "pools": pools,
            },
        }

    def _watches(self, now: float) -> dict[str, object] | None:
        """The Kubernetes source's watches: synced, objects, errors, the last sync's age."""
        watches = self.plane.resource_watches()
        if not watches:
            return None
        return {
            "watches": [
                {
                    "kind": w.kind,
                    "namespace": w.namespace,
                    "synced": w.synced,
                    "objects": w.objects,
                    "errors": w.errors,
                    "failing": w.failing,
                    "last_error": w.last_error,
                    "last_sync_age_seconds": None
                    if w.last_sync is None
                    else round(max(0.0, now - w.last_sync), 3),
                }
                for w in watches
            ]
        }

    def _target_views(self, route: ModelRoute, rule: Rule) -> list[dict[str, object]]:
        servers = self._servers()
        total = sum(rule.weights)
        views: list[dict[str, object]] = []
        for target, weight in zip(rule.targets, rule.weights, strict=True):
            key = f"{route.meta.namespace}/{target.model_server_name}"
            server = servers.get(key)
            members = self.store.server_pods(server) if server is not None else []
            views.append(
                {
                    "model_server": key,
                    "weight": target.weight,
                    "share": round(weight / total, 4) if total else 0.0,
                    "upstream_model": server.model if server is not None else None,
                    "ready_pods": [
                        {"pod": p.key, "address": p.authority, "in_flight": p.in_flight}
                        for p in members
                    ],
                }
            )
        return views

    def _route_entry(self, route: ModelRoute) -> dict[str, object]:
        limit = route.rate_limit
        return {
            "route": route.meta.key,
            "created": route.meta.created,
            "rate_limit": None
            if limit is None
            else {
                "input_tokens_per_unit": limit.input_tokens_per_unit,
                "output_tokens_per_unit": limit.output_tokens_per_unit,
                "unit": limit.unit,
                "global_redis": None
                if limit.redis_address is None
                else redact_url(limit.redis_address),
            },
            "rules": [
                {
                    "name": rule.name,
                    "match": _match_view(rule.match),
                    "targets": self._target_views(route, rule),
                }
                for rule in route.rules
            ],
        }

    def routing_table(self) -> dict[str, object]:
        models: dict[str, dict[str, object]] = {}
        for name, matched_by, routes in self.store.route_table():
            entry = models.get(name)
            if entry is not None:
                # The name is a modelName too: these adapter routes are never consulted.
                entry["shadowed_lora_routes"] = [r.meta.key for r in routes]
                continue
            models[name] = {
                "matched_by": matched_by,
                "routes": [self._route_entry(r) for r in routes],
            }
        return {"generation": self.store.generation, "models": models}

    def _why(self, ctx: RequestRecord) -> str:
        parts: list[str] = []
        candidates = ctx.candidates
        decision: Any = getattr(ctx, "decision", None)
        if len(candidates) == 1:
            parts.append("the only ready pod")
        elif decision is not None:
            parts.append(f"ranked {len(candidates)} ready pods, best {decision.why()}")
        else:
            parts.append(f"{len(candidates)} ready pods in the scheduler's order")
        failures = ctx.failed_attempts or []
        for i, (pod, error) in enumerate(failures):
            if i + 1 < ctx.attempts:
                parts.append(f"attempt {i + 2} after {pod} failed: {error}")
            else:
                parts.append(f"gave up after attempt {i + 1} on {pod}: {error}")
        if ctx.finished is None:
            parts.append("in flight")
        return "; ".join(parts)

    def decision_view(self, ctx: RequestRecord) -> dict[str, object]:
        """One request's decision; C{route} is its ModelRoute or HTTPRoute, C{http_route},
        C{inference_pool}, C{gateway} and C{rewritten_model} are set for a request an
        HTTPRoute sent to a pool (C{model_server} then C{None}: a pool is not one)."""
        match = ctx.match
        finished = ctx.finished
        via = match.via if match is not None else None
        return {
            "request_id": ctx.request_id,
            "model": ctx.model,
            "path": ctx.path,
            "stream": ctx.stream,
            "route": match.route.meta.key if match is not None else None,
            "rule": match.rule.name if match is not None else None,
            "model_server": match.model_server if match is not None else None,
            "http_route": match.http_route if match is not None else None,
            "inference_pool": match.inference_pool if match is not None else None,
            "gateway": via.key if via is not None else None,
            "rewritten_model": match.rewritten if match is not None else None,
            "candidates": [p.name for p in ctx.candidates],
            "chosen": ctx.pod.name if ctx.pod is not None else None,
            "attempts": ctx.attempts,
            "failed_attempts": [
                {"pod": pod, "error": error} for pod, error in ctx.failed_attempts or []
            ],
            "in_flight": finished is None,
            "status": ctx.status or None,
            "error_type": None if finished is None else ctx.error_type.value,
            "error": ctx.error_message,
            "started_at": _epoch_text(ctx.started),
            "duration_ms": None if finished is None else round((finished - ctx.started) * 1e3, 3),
            "scores": _scores(getattr(ctx, "decision", None)),
            "why": self._why(ctx),
            "prefill": _prefill_rankings(ctx),
        }

    def decisions(self, limit: int | None = None, model: str | None = None) -> dict[str, object]:
        views: list[dict[str, object]] = []
        for ctx in reversed(self.ring):
            if limit is not None and len(views) >= limit:
                break
            if model is not None and ctx.model != model:
                continue
            views.append(self.decision_view(ctx))
        return {"kept": DECISIONS_KEPT, "decisions": views}

    def backends(self) -> dict[str, object]:
        views = []
        for pod in self._resources.pods:
            view = self._pod_live(pod)
            endpoint = self._endpoint(pod)
            view["idle_connections"] = (
                self.plane.upstream.idle_connections(endpoint) if endpoint is not None else 0
            )
            view["metrics"] = _scraped(endpoint)
            views.append(view)
        return {"backends": views}
