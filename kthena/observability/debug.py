"""
The debug endpoints, C{/debug/*} on the admin listener: read-only JSON views of what the
router holds (its resources as Kthena writes them, the routing table, recent routing
decisions, pods, model servers, listeners and connection pools).

C{/debug/config_dump/*} keeps Kthena's shapes and camelCase keys, so Kthena's tooling
reads them; the router's own views (C{router/state}, C{routing/*}, C{model-servers})
use snake_case, like the access log.

Access: only GET and HEAD (anything else is 405); a client must come from an address in
C{observability.debug.allow} (loopback by default; an empty list means any address and
needs a token) and, when C{observability.debug.token} is set, send C{Authorization:
Bearer <token>}; anything else is refused with 403 before any route is looked at. The
peer address is the TCP peer: C{X-Forwarded-For} is not trusted.

Secrets are never shown: values under keys that name credentials (password, secret,
token, API key, authorization, cookie, ...), header-match values for such headers, and
the password of any URL (a Redis address such as C{redis://user:pw@host:6379}) are
replaced by C{<redacted>}.

Klein installs the global reactor when imported: it is imported inside
L{make_debug_resource} only.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import math
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any

from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.logger import Logger
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource, Resource

from kthena.config.resources import (
    ModelMatch,
    ModelRoute,
    ModelServer,
    Pod,
    ResourceSet,
    Rule,
)
from kthena.config.router import DebugConfig, Network
from kthena.pods import PodEndpoint
from kthena.proxy.core import DECISIONS_KEPT, RouterCore
from kthena.record import RequestRecord
from kthena.redact import REDACTED, is_secret_name, redact, redact_url

log = Logger()

JSON_CONTENT_TYPE = b"application/json"
READ_METHODS = (b"GET", b"HEAD")

ENDPOINTS = (
    "/debug/config_dump/modelroutes",
    "/debug/config_dump/modelservers",
    "/debug/config_dump/pods",
    "/debug/config_dump/namespaces/{namespace}/modelroutes/{name}",
    "/debug/config_dump/namespaces/{namespace}/modelservers/{name}",
    "/debug/config_dump/namespaces/{namespace}/pods/{name}",
    "/debug/router/state",
    "/debug/routing/table",
    "/debug/routing/decisions?limit=N&model=M",
    "/debug/routing/backends",
    "/debug/model-servers",
    "/debug/model-servers/{name}/status?namespace=NS",
    "/debug/model-servers/{name}/metrics?namespace=NS",
)

NOT_YET = (
    "/inference-extension/pools",
    "/inference-extension/pools/<pool>/endpoints",
    "/inference-extension/decisions",
    "/pd-groups",
    "/pd-groups/<group_key>/status",
    "/kv-cache/connectors",
)
"""Endpoints the specification lists that arrive with later issues: 501 until then."""


def _leaf(value: object) -> object:
    """A leaf of a resource's raw mapping, ready for JSON."""
    if isinstance(value, datetime | date):
        return _timestamp(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, bool | int | float):
        return value
    return str(value)


def _timestamp(value: object) -> str:
    """RFC 3339, C{Z} for UTC, as Kubernetes writes times."""
    if isinstance(value, datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    if isinstance(value, date):
        return value.isoformat()
    return str(value)


def _epoch_text(seconds: float) -> str:
    moment = datetime.fromtimestamp(seconds, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


# -- access


def _peer_ip(address: object) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    if isinstance(address, UNIXAddress):
        # A local socket (systemd activation): the peer is on this host.
        return ipaddress.IPv4Address("127.0.0.1")
    if not isinstance(address, IPv4Address | IPv6Address):
        return None
    try:
        ip = ipaddress.ip_address(address.host.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


class DebugAccess:
    """Who may read the debug endpoints (see the module docstring)."""

    def __init__(self, config: DebugConfig) -> None:
        self.allow: tuple[Network, ...] = config.allow
        self._token = None if config.token is None else config.token.encode("ascii")

    @property
    def token_set(self) -> bool:
        return self._token is not None

    def refusal(self, request: IRequest) -> str | None:
        """Why C{request} is refused, or C{None} when it may be answered."""
        if self.allow:
            peer = request.getClientAddress()
            ip = _peer_ip(peer)
            if ip is None or not any(ip in network for network in self.allow):
                shown = ip if ip is not None else type(peer).__name__
                return (
                    f"the debug endpoints answer only clients in observability.debug.allow; "
                    f"{shown} is not one"
                )
        if self._token is not None:
            header = request.getHeader(b"authorization") or b""
            scheme, _, given = header.strip().partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(given.strip(), self._token):
                return "the debug endpoints need Authorization: Bearer <observability.debug.token>"
        return None


# -- the views


class DebugError(Exception):
    """A view's answer other than 200: a status and an C{{"error": ...}} body."""

    def __init__(self, status: int, message: str, **extra: object) -> None:
        super().__init__(message)
        self.status = status
        self.body: dict[str, object] = {"error": message, **extra}


@dataclass(frozen=True, slots=True)
class ListenerInfo:
    """One of the router's listeners, as C{/debug/router/state} shows it."""

    name: str
    endpoint: str
    serves: tuple[str, ...]
    host: str | None = None
    port: int | None = None

    def view(self) -> dict[str, object]:
        return {
            "name": self.name,
            "endpoint": self.endpoint,
            "listening": self.port is not None,
            "host": self.host,
            "port": self.port,
            "serves": list(self.serves),
        }


def _unique(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(i for i in items if i))


def _match_view(match: ModelMatch | None) -> dict[str, object] | None:
    """A rule's conditions, as written (C{None}: the rule takes every request)."""
    if match is None:
        return None
    view: dict[str, object] = {}
    if match.headers:
        view["headers"] = {
            name: {} if m.kind == "any" else {m.kind: REDACTED if is_secret_name(name) else m.value}
            for name, m in match.headers
        }
    if match.uri is not None:
        view["uri"] = {} if match.uri.kind == "any" else {match.uri.kind: match.uri.value}
    if match.body_model is not None:
        view["body"] = {"model": match.body_model}
    return view


def _int_arg(request: IRequest, name: bytes, default: int) -> int:
    values = (request.args or {}).get(name)
    if not values:
        return default
    try:
        value = int(values[0])
    except ValueError:
        raise DebugError(400, f"{name.decode()} must be a whole number") from None
    if value < 0:
        raise DebugError(400, f"{name.decode()} must not be negative")
    return value


def _text_arg(request: IRequest, name: bytes) -> str | None:
    values = (request.args or {}).get(name)
    if not values:
        return None
    return bytes(values[0]).decode("utf-8", "replace")


def _scraped(endpoint: PodEndpoint | None) -> dict[str, object]:
    """The last scrape of a pod's own metrics ({} for a pod that is not scraped)."""
    if endpoint is None:
        return {}
    state = endpoint.state
    return {
        "scraped_at": None if state.scraped_at is None else _epoch_text(state.scraped_at),
        "scrapes": state.scrapes,
        "consecutive_failures": state.consecutive_failures,
        "last_scrape_error": state.last_error,
        "waiting": state.waiting,
        "running": state.running,
        "kv_cache_usage": state.kv_usage,
        "ttft_seconds": state.ttft,
        "tpot_seconds": state.tpot,
        "prefix_hit_rate": state.prefix_hit_rate,
        "gpu_utilization": dict(state.gpu_utilization),
        "models": sorted(state.models),
        "loras": sorted(state.loras),
    }


def _outlier(endpoint: PodEndpoint | None, now: float) -> dict[str, object] | None:
    """Passive outlier detection's view of a pod (C{None}: it does not serve)."""
    if endpoint is None:
        return None
    state = endpoint.outlier
    until = state.ejected_until
    return {
        "ejected": until is not None and until > now,
        "ejected_until": None if until is None else _epoch_text(until),
        "ejections": state.ejections,
        "consecutive_failures": state.consecutive_failures,
        "last_failure": state.reason,
    }


def _scores(decision: Any) -> dict[str, object] | None:
    """Each candidate's total and per-plugin scores, when the scheduler recorded them."""
    if decision is None:
        return None
    scores: Mapping[str, Mapping[str, float]] = getattr(decision, "scores", None) or {}
    totals: Mapping[str, float] = getattr(decision, "totals", None) or {}
    filtered: Mapping[str, list[str]] = getattr(decision, "filtered", None) or {}
    return {
        "pods": {
            key: {"total": totals.get(key), "plugins": dict(per_plugin)}
            for key, per_plugin in scores.items()
        },
        "filtered": {name: list(pods) for name, pods in filtered.items() if pods},
    }


class DebugView:
    """
    Builds every debug answer from the router's live state. Each method returns a
    JSON-ready value or raises L{DebugError}; nothing here writes to the router.

    @param listeners: the router's listeners right now (for C{router/state}).
    @param access: the access rules in force (shown in C{router/state}).
    @param clock: wall-clock seconds (for uptime).
    """

    def __init__(
        self,
        core: RouterCore,
        listeners: Callable[[], Sequence[ListenerInfo]] = tuple,
        access: DebugAccess | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.core = core
        self.listeners = listeners
        self.access = access or DebugAccess(core.config.observability.debug)
        self.clock = clock

    # -- helpers

    @property
    def _resources(self) -> ResourceSet:
        return self.core.store.resources

    def _servers(self) -> dict[str, ModelServer]:
        return {s.meta.key: s for s in self._resources.servers}

    def _endpoint(self, pod: Pod) -> PodEndpoint | None:
        endpoint = self.core.store.pods.get(pod.meta.key)
        return endpoint if endpoint is not None and endpoint.pod is pod else None

    # -- config_dump (Kthena's shapes)

    def route_view(self, route: ModelRoute) -> dict[str, object]:
        return {
            "name": route.meta.name,
            "namespace": route.meta.namespace,
            "spec": redact(route.spec, leaf=_leaf),
        }

    def server_view(self, server: ModelServer) -> dict[str, object]:
        members = self.core.store.server_pods(server)
        names = [p.key for p in members]
        roles = [(p.key, server.pd_role(p.pod)) for p in members]
        return {
            "name": server.meta.name,
            "namespace": server.meta.namespace,
            "spec": redact(server.spec, leaf=_leaf),
            "pods": names,
            "associatedPods": names,
            "prefillPods": [key for key, role in roles if role == "prefill"],
            "decodePods": [key for key, role in roles if role == "decode"],
        }

    def pod_view(self, pod: Pod, servers: Mapping[str, ModelServer]) -> dict[str, object]:
        endpoint = self._endpoint(pod)
        member_of = list(endpoint.servers) if endpoint is not None else []
        engine = servers[member_of[0]].engine if member_of else None
        state = endpoint.state if endpoint is not None else None
        status = pod.status
        start = status.get("startTime")
        return {
            "name": pod.meta.name,
            "namespace": pod.meta.namespace,
            "podInfo": {
                "podIP": pod.ip or "",
                "nodeName": str(pod.spec.get("nodeName") or ""),
                "phase": pod.phase,
                "startTime": None if start is None else _timestamp(start),
                "labels": dict(pod.meta.labels),
            },
            "engine": engine,
            # The last scrape's figures; zeros before the first one (and for pods that do
            # not serve), as Kthena shows them.
            "metrics": {
                "gpuCacheUsage": state.kv_usage if state is not None else 0.0,
                "requestWaitingNum": state.waiting if state is not None else 0,
                "requestRunningNum": state.running if state is not None else 0,
                "tpot": state.tpot if state is not None else 0.0,
                "ttft": state.ttft if state is not None else 0.0,
            },
            "models": self._models_of(endpoint, member_of, servers),
            "modelServers": member_of,
        }

    def _models_of(
        self,
        endpoint: PodEndpoint | None,
        member_of: Sequence[str],
        servers: Mapping[str, ModelServer],
    ) -> list[str]:
        """
        What a pod serves: what its own C{/v1/models} said at the last scrape (base
        models, then adapters); before that, what the config tells: its servers' models,
        the route model names sent as they are (servers without C{model}) and the routes'
        LoRA adapters.
        """
        if endpoint is None or not member_of:
            return []
        state = endpoint.state
        if state.models or state.loras:
            return _unique([*sorted(state.models - state.loras), *sorted(state.loras)])
        mine = set(member_of)
        models: list[str] = [m for key in member_of if (m := servers[key].model)]
        for route in self._resources.routes:
            for rule in route.rules:
                for target in rule.targets:
                    key = f"{route.meta.namespace}/{target.model_server_name}"
                    if key not in mine:
                        continue
                    if servers[key].model is None:
                        models.append(route.model_name)
                    models.extend(route.lora_adapters)
        return _unique(models)

    def modelroutes(self) -> dict[str, object]:
        return {"modelroutes": [self.route_view(r) for r in self._resources.routes]}

    def modelservers(self) -> dict[str, object]:
        return {"modelservers": [self.server_view(s) for s in self._resources.servers]}

    def pods(self) -> dict[str, object]:
        servers = self._servers()
        return {"pods": [self.pod_view(p, servers) for p in self._resources.pods]}

    def config_object(self, namespace: str, kind: str, name: str) -> dict[str, object]:
        resources = self._resources
        if kind == "modelroutes":
            for route in resources.routes:
                if (route.meta.namespace, route.meta.name) == (namespace, name):
                    return self.route_view(route)
            raise DebugError(404, f"ModelRoute {namespace}/{name} not found")
        if kind == "modelservers":
            for server in resources.servers:
                if (server.meta.namespace, server.meta.name) == (namespace, name):
                    return self.server_view(server)
            raise DebugError(404, f"ModelServer {namespace}/{name} not found")
        if kind == "pods":
            for pod in resources.pods:
                if (pod.meta.namespace, pod.meta.name) == (namespace, name):
                    return self.pod_view(pod, self._servers())
            raise DebugError(404, f"Pod {namespace}/{name} not found")
        raise DebugError(
            404, f"unknown kind {kind!r}; known kinds: modelroutes, modelservers, pods"
        )

    # -- the router

    def router_state(self) -> dict[str, object]:
        core = self.core
        config = core.config
        store = core.store
        by_model: Counter[str] = Counter(call.ctx.model or "unknown" for call in core.calls)
        pools = [
            {
                "pod": endpoint.key,
                "address": endpoint.authority,
                "idle_connections": core.upstream.idle_connections(endpoint),
                "in_flight": endpoint.in_flight,
            }
            for endpoint in sorted(store.pods.values(), key=lambda e: e.key)
        ]
        now = self.clock()
        return {
            "started_at": _epoch_text(core.started),
            "uptime_seconds": round(max(0.0, now - core.started), 3),
            "ready": core.readiness()[0],
            "draining": core.draining,
            "config": {
                "generation": store.generation,
                "source": config.source,
                "files": list(config.files),
                "resources": {
                    "modelroutes": len(store.resources.routes),
                    "modelservers": len(store.resources.servers),
                    "pods": len(store.resources.pods),
                },
                "debug_access": {
                    "allow": [str(n) for n in self.access.allow] or ["any address"],
                    "token": "set" if self.access.token_set else None,
                },
            },
            "active_requests": {
                "total": len(core.calls),
                "by_model": dict(sorted(by_model.items())),
            },
            "listeners": [listener.view() for listener in self.listeners()],
            "upstream": {
                "max_connections_per_pod": config.upstream.max_connections_per_pod,
                "pool_idle_timeout_seconds": config.upstream.pool_idle_timeout,
                "connect_timeout_seconds": config.upstream.connect_timeout,
                "pools": pools,
            },
        }

    def _target_views(self, route: ModelRoute, rule: Rule) -> list[dict[str, object]]:
        servers = self._servers()
        total = sum(rule.weights)
        views: list[dict[str, object]] = []
        for target, weight in zip(rule.targets, rule.weights, strict=True):
            key = f"{route.meta.namespace}/{target.model_server_name}"
            server = servers.get(key)
            members = self.core.store.server_pods(server) if server is not None else []
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
        for name, matched_by, routes in self.core.store.route_table():
            entry = models.get(name)
            if entry is not None:
                # The name is a modelName too: these adapter routes are never consulted.
                entry["shadowed_lora_routes"] = [r.meta.key for r in routes]
                continue
            models[name] = {
                "matched_by": matched_by,
                "routes": [self._route_entry(r) for r in routes],
            }
        return {"generation": self.core.store.generation, "models": models}

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
        match = ctx.match
        finished = ctx.finished
        return {
            "request_id": ctx.request_id,
            "model": ctx.model,
            "path": ctx.path,
            "stream": ctx.stream,
            "route": match.route.meta.key if match is not None else None,
            "rule": match.rule.name if match is not None else None,
            "model_server": match.server.meta.key if match is not None else None,
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
        }

    def decisions(self, limit: int | None = None, model: str | None = None) -> dict[str, object]:
        views: list[dict[str, object]] = []
        for ctx in reversed(self.core.decisions):
            if limit is not None and len(views) >= limit:
                break
            if model is not None and ctx.model != model:
                continue
            views.append(self.decision_view(ctx))
        return {"kept": DECISIONS_KEPT, "decisions": views}

    def _healthy(self, endpoint: PodEndpoint | None) -> bool:
        """May take traffic (L{kthena.proxy.health}: serves, scrapes, not ejected)."""
        return endpoint is not None and self.core.health.pod(endpoint)

    def _pod_live(self, pod: Pod) -> dict[str, object]:
        endpoint = self._endpoint(pod)
        return {
            "pod": pod.meta.key,
            "name": pod.meta.name,
            "namespace": pod.meta.namespace,
            "address": endpoint.authority if endpoint is not None else pod.ip,
            "phase": pod.phase,
            "ready": pod.ready,
            "serving": endpoint is not None,
            "healthy": self._healthy(endpoint),
            "in_flight": endpoint.in_flight if endpoint is not None else 0,
            "failures": endpoint.failures if endpoint is not None else 0,
            "last_error": endpoint.last_error if endpoint is not None else None,
            "outlier": _outlier(endpoint, self.core.reactor.seconds()),
            "servers": list(endpoint.servers) if endpoint is not None else [],
        }

    def backends(self) -> dict[str, object]:
        views = []
        for pod in self._resources.pods:
            view = self._pod_live(pod)
            endpoint = self._endpoint(pod)
            view["idle_connections"] = (
                self.core.upstream.idle_connections(endpoint) if endpoint is not None else 0
            )
            view["metrics"] = _scraped(endpoint)
            views.append(view)
        return {"backends": views}

    # -- model servers

    def _server_pods(self, server: ModelServer) -> list[tuple[Pod, str | None]]:
        """Every pod the server selects by labels, serving or not, with its PD role."""
        return [(p, server.pd_role(p)) for p in self._resources.pods if server.selects(p)]

    def _server_summary(self, server: ModelServer) -> dict[str, object]:
        health = self.core.health.server(server)
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
        found = [
            s
            for s in self._resources.servers
            if s.meta.name == name and (namespace is None or s.meta.namespace == namespace)
        ]
        if not found:
            where = f"{namespace}/{name}" if namespace is not None else name
            raise DebugError(404, f"ModelServer {where} not found")
        if len(found) > 1:
            raise DebugError(
                409,
                f"ModelServer {name} exists in several namespaces; add ?namespace=",
                namespaces=sorted(s.meta.namespace for s in found),
            )
        return found[0]

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
        members = self.core.store.server_pods(server)
        recent = [
            ctx
            for ctx in self.core.decisions
            if ctx.match is not None and ctx.match.server.meta.key == key
        ]
        by_status = Counter(
            "in_flight" if ctx.finished is None else str(ctx.status) for ctx in recent
        )
        metrics = self.core.metrics
        families = (
            metrics.active_upstream,
            metrics.server_health,
            metrics.server_queue_depth,
            metrics.server_gpu_utilization,
            metrics.server_memory,
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
                "window": len(self.core.decisions),
                "total": len(recent),
                "by_status": dict(sorted(by_status.items())),
                "retried": sum(1 for ctx in recent if ctx.attempts > 1),
            },
            "prometheus": samples,
        }


# -- HTTP


def json_body(request: IRequest, status: int, value: object) -> bytes:
    """Set the status and JSON headers; return the (indented, for people) body."""
    request.setResponseCode(status)
    request.setHeader(b"content-type", JSON_CONTENT_TYPE)
    request.setHeader(b"cache-control", b"no-store")
    request.setHeader(b"x-content-type-options", b"nosniff")
    return json.dumps(value, indent=2, ensure_ascii=False, default=str).encode() + b"\n"


def method_not_allowed(request: IRequest) -> bytes:
    request.setHeader(b"allow", b"GET, HEAD")
    method = request.method.decode("latin-1")
    return json_body(request, 405, {"error": f"{method} is not allowed: the endpoint is read-only"})


class DebugGate(Resource):
    """
    In front of the Klein app: refuses (403) clients L{DebugAccess} does not let in,
    and (405) any method but GET and HEAD, before any route is looked at.
    """

    isLeaf = True

    def __init__(self, app: IResource, access: DebugAccess) -> None:
        super().__init__()
        self.app = app
        self.access = access

    def render(self, request: IRequest) -> bytes | int:
        refusal = self.access.refusal(request)
        if refusal is not None:
            return json_body(request, 403, {"error": refusal})
        if request.method not in READ_METHODS:
            return method_not_allowed(request)
        try:
            b"/".join(request.postpath or ()).decode("utf-8")
        except UnicodeDecodeError:
            return json_body(request, 400, {"error": "the URL is not UTF-8"})
        result: bytes | int = self.app.render(request)
        return result


def _answer(request: IRequest, build: Callable[[], object]) -> bytes:
    try:
        value = build()
    except DebugError as e:
        return json_body(request, e.status, e.body)
    return json_body(request, 200, value)


def make_debug_resource(view: DebugView, access: DebugAccess) -> IResource:
    """
    The C{/debug} resource: L{DebugGate} in front of a Klein app over C{view}.
    """
    from klein import Klein
    from werkzeug.exceptions import HTTPException

    app = Klein()

    def get(path: str, endpoint: str, build: Callable[..., object]) -> None:
        def handler(request: IRequest, **params: str) -> bytes:
            return _answer(request, lambda: build(request, **params))

        app.route(path, endpoint=endpoint, strict_slashes=False)(handler)

    get("/", "index", lambda r: {"endpoints": list(ENDPOINTS)})
    get("/config_dump/modelroutes", "modelroutes", lambda r: view.modelroutes())
    get("/config_dump/modelservers", "modelservers", lambda r: view.modelservers())
    get("/config_dump/pods", "pods", lambda r: view.pods())
    get(
        "/config_dump/namespaces/<namespace>/<kind>/<name>",
        "config_object",
        lambda r, namespace, kind, name: view.config_object(namespace, kind, name),
    )
    get("/router/state", "router_state", lambda r: view.router_state())
    get("/routing/table", "routing_table", lambda r: view.routing_table())
    get(
        "/routing/decisions",
        "decisions",
        lambda r: view.decisions(_int_arg(r, b"limit", DECISIONS_KEPT), _text_arg(r, b"model")),
    )
    get("/routing/backends", "backends", lambda r: view.backends())
    get("/model-servers", "model_servers", lambda r: view.model_servers())
    get(
        "/model-servers/<name>/status",
        "server_status",
        lambda r, name: view.server_status(view.find_server(name, _text_arg(r, b"namespace"))),
    )
    get(
        "/model-servers/<name>/metrics",
        "server_metrics",
        lambda r, name: view.server_metrics(view.find_server(name, _text_arg(r, b"namespace"))),
    )

    def not_yet(request: IRequest, **params: str) -> bytes:
        return json_body(
            request, 501, {"error": "not implemented yet: arrives with the PD and Gateway issues"}
        )

    for i, path in enumerate(NOT_YET):
        app.route(path, endpoint=f"not_yet_{i}", strict_slashes=False)(not_yet)

    @app.handle_errors(HTTPException)
    def http_error(request: IRequest, failure: Any) -> bytes:
        code = int(getattr(failure.value, "code", None) or 404)
        if code == 405:
            return method_not_allowed(request)
        if code != 404:
            # A redirect or anything else werkzeug would answer: one clear 404 instead.
            code = 404
        return json_body(request, code, {"error": f"no debug endpoint at {request.path.decode()}"})

    @app.handle_errors(Exception)
    def crashed(request: IRequest, failure: Any) -> bytes:
        log.failure("debug endpoint {path} failed", failure, path=request.path)
        return json_body(request, 500, {"error": "internal error; see the router's log"})

    return DebugGate(app.resource(), access)
