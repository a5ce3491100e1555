"""
What the debug views share: where they read from (L{DebugSources}), the JSON shapes of
pods, scrapes, outliers and scores, time stamps, query arguments, and L{DebugError}.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Any, Protocol, TypeVar

from twisted.web.iweb import IRequest

from kthena.config.resources import Metadata, ModelMatch, ModelServer, Pod
from kthena.config.resourceset import ResourceSet
from kthena.observability.debug.access import DebugAccess
from kthena.observability.decisions import DecisionRing
from kthena.observability.metrics import RouterMetrics
from kthena.pipeline.plane import DataPlane
from kthena.pods import PodEndpoint
from kthena.redact import REDACTED, is_secret_name
from kthena.store import Datastore


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
    error: str | None = None
    """Why it is not listening, when it tried and could not (a Gateway's port)."""

    def view(self) -> dict[str, object]:
        view: dict[str, object] = {
            "name": self.name,
            "endpoint": self.endpoint,
            "listening": self.port is not None,
            "host": self.host,
            "port": self.port,
            "serves": list(self.serves),
        }
        if self.error is not None:
            view["error"] = self.error
        return view


@dataclass(frozen=True)
class DebugSources:
    """
    What every view reads, and nothing it could write to.

    @ivar listeners: the router's listeners right now (for C{router/state}).
    @ivar access: the access rules in force (shown in C{router/state}).
    @ivar clock: wall-clock seconds (for uptime).
    """

    plane: DataPlane
    decisions: DecisionRing
    metrics: RouterMetrics
    access: DebugAccess
    listeners: Callable[[], Sequence[ListenerInfo]] = tuple
    clock: Callable[[], float] = field(default=time.time)


class _Named(Protocol):
    @property
    def meta(self) -> Metadata: ...


NamedT = TypeVar("NamedT", bound=_Named)


def _find_named(kind: str, items: Iterable[NamedT], name: str, namespace: str | None) -> NamedT:
    """
    The one of C{items} (resources of C{kind}) a path names: by name, in C{namespace}
    when the query gives one. Names are unique only within a namespace, so a name found
    in several without C{?namespace=} is a 409 that lists them, never a guess.

    @raise DebugError: 404 when none is found, 409 when the name is ambiguous.
    """
    found = [
        item
        for item in items
        if item.meta.name == name and (namespace is None or item.meta.namespace == namespace)
    ]
    if not found:
        where = f"{namespace}/{name}" if namespace is not None else name
        raise DebugError(404, f"{kind} {where} not found")
    if len(found) > 1:
        raise DebugError(
            409,
            f"{kind} {name} exists in several namespaces; add ?namespace=",
            namespaces=sorted(item.meta.namespace for item in found),
        )
    return found[0]


class Views:
    """The base of each view family: its sources, and the pod views they share."""

    def __init__(self, sources: DebugSources) -> None:
        self.sources = sources
        self.plane = sources.plane
        self.store: Datastore = sources.plane.store
        self.ring = sources.decisions
        self.metrics = sources.metrics

    @property
    def _resources(self) -> ResourceSet:
        return self.store.resources

    def _servers(self) -> dict[str, ModelServer]:
        return {s.meta.key: s for s in self._resources.servers}

    def _endpoint(self, pod: Pod) -> PodEndpoint | None:
        endpoint = self.store.pods.get(pod.meta.key)
        return endpoint if endpoint is not None and endpoint.pod is pod else None

    def _healthy(self, endpoint: PodEndpoint | None) -> bool:
        """May take traffic (L{kthena.pipeline.health}: serves, scrapes, not ejected)."""
        return endpoint is not None and self.plane.health.pod(endpoint)

    def _pod_live(self, pod: Pod) -> dict[str, object]:
        return self._endpoint_live(pod, self._endpoint(pod))

    def _endpoint_live(self, pod: Pod, endpoint: PodEndpoint | None) -> dict[str, object]:
        """C{pod} through one of its endpoints (C{None}: it serves none)."""
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
            "outlier": _outlier(endpoint, self.plane.reactor.seconds()),
            "servers": list(endpoint.servers) if endpoint is not None else [],
        }


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
