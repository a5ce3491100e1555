"""
The resource documents the router routes by, in Kthena's own format so that Kthena users
bring their YAML unchanged: C{ModelRoute} and C{ModelServer}
(C{networking.serving.volcano.sh/v1alpha1}) and core C{v1} C{Pod} documents for bare metal.

The parsing is L{kthena.config.documents}'s.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

KTHENA_API = "networking.serving.volcano.sh/v1alpha1"
PORT_ANNOTATION = "kthena.io/workload-port"
"""A Pod annotation giving that pod its own port, when several servers share one host."""

ENGINES = ("vLLM", "SGLang")
DEFAULT_ENGINE_PORTS = {"vLLM": 8000, "SGLang": 30000}
RATE_UNITS = {"second": 1.0, "minute": 60.0, "hour": 3600.0, "day": 86400.0, "month": 2592000.0}
KV_CONNECTORS = ("http", "lmcache", "nixl", "mooncake", "sglang")


@dataclass(frozen=True, slots=True)
class Metadata:
    """
    @ivar created: C{creationTimestamp} as RFC 3339 text in UTC (C{...Z}).
    @ivar created_at: the same in epoch seconds, which is what orders routes (text does
        not: offsets, fractions).
    @ivar order: where it came (file order, then the cluster's), after the time.
    """

    name: str
    namespace: str
    labels: Mapping[str, str]
    annotations: Mapping[str, str]
    created: str | None
    deleting: bool
    order: int
    created_at: float | None = None
    key: str = field(init=False)
    """C{namespace/name}, as Kthena names objects in logs and metrics (made once: it is
    read on every request)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "key", f"{self.namespace}/{self.name}")

    @property
    def age_order(self) -> tuple[float, int]:
        """Oldest first; those without a time after them, in the order they came."""
        created = self.created_at
        return (created if created is not None else math.inf, self.order)


@dataclass(frozen=True, slots=True)
class StringMatch:
    """One of exact, prefix or regex, as Kthena's C{StringMatch}; C{any} when none is set
    (it matches everything, an absent header included)."""

    kind: str
    value: str
    pattern: re.Pattern[str] | None = None

    def matches(self, text: str) -> bool:
        if self.kind == "any":
            return True
        if self.kind == "exact":
            return text == self.value
        if self.kind == "prefix":
            return text.startswith(self.value)
        assert self.pattern is not None
        # Go's regexp.MatchString finds a match anywhere in the text.
        return self.pattern.search(text) is not None


@dataclass(frozen=True, slots=True)
class ModelMatch:
    """Conditions ANDed together; header names are kept lower-case."""

    headers: tuple[tuple[str, StringMatch], ...] = ()
    uri: StringMatch | None = None
    body_model: str | None = None


@dataclass(frozen=True, slots=True)
class TargetModel:
    model_server_name: str
    weight: int | None


@dataclass(frozen=True, slots=True)
class Rule:
    name: str
    match: ModelMatch | None
    targets: tuple[TargetModel, ...]

    @property
    def weights(self) -> tuple[int, ...]:
        """Relative weights; unweighted targets share equally."""
        return tuple(1 if t.weight is None else t.weight for t in self.targets)


@dataclass(frozen=True, slots=True)
class Limits:
    """Limits per unit: Kthena's input and output tokens, and our requests."""

    input_tokens_per_unit: int | None
    output_tokens_per_unit: int | None
    requests_per_unit: int | None
    unit: str

    @property
    def unit_seconds(self) -> float:
        return RATE_UNITS[self.unit]


@dataclass(frozen=True, slots=True)
class RateLimit(Limits):
    """
    A ModelRoute's C{rateLimit}: limits for the route as a whole and, under C{perUser},
    the same limits for each caller separately; in Redis (C{global.redis}) when shared
    by several routers, else in the router.
    """

    redis_address: str | None = None
    redis_password: str | None = field(default=None, repr=False)
    per_user: Limits | None = None


@dataclass(frozen=True, slots=True)
class PDPolicy:
    """
    Ours (a route's C{pdPolicy}): when a request to a prefill/decode server goes straight
    to a decode pod, with no prefill leg.

    @ivar below_tokens: C{decodeOnlyBelowTokens}: its prompt is estimated under this many
        tokens (C{None}: not by length).
    @ivar prefix_hit: C{decodeOnlyPrefixHit}: the best decode pod already holds at least
        this share (0-1) of its prompt's prefix, by the scheduler's C{prefix-cache} score
        (C{None}: not by prefix).
    """

    below_tokens: int | None = None
    prefix_hit: float | None = None


GATEWAY_GROUP = "gateway.networking.k8s.io"


@dataclass(frozen=True, slots=True)
class GatewayListener:
    """
    The Gateway listener requests come through (C{gateway} in the router's config, or
    one of a Gateway's that the router serves).

    @ivar port: the listener's port, for C{parentRefs} that name one.
    @ivar routes_from: the namespaces whose HTTPRoutes it takes (a Gateway's
        C{allowedRoutes}: C{Same}, C{All}, C{None}); the config's listener takes any.
    """

    namespace: str
    name: str
    listener: str | None = None
    port: int | None = None
    routes_from: str = "All"

    def takes_routes_of(self, namespace: str) -> bool:
        routes_from = self.routes_from
        return routes_from == "All" or (routes_from == "Same" and namespace == self.namespace)

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True, slots=True)
class ParentRef:
    """
    One of a route's C{parentRefs}.

    @ivar gateway: it names a Gateway (C{group} and C{kind} absent or Gateway API's):
        only such refs attach a route anywhere.
    @ivar section_name: the Gateway listener's name, when the ref names one.
    @ivar port: the Gateway listener's port, when the ref names one.
    """

    namespace: str
    name: str
    section_name: str | None = None
    gateway: bool = True
    port: int | None = None

    def admits(self, via: GatewayListener) -> bool:
        """Whether requests through C{via} are this ref's: its Gateway and, when named,
        that listener and port (Kthena only checks that the Gateway has a listener of
        that name: not copied)."""
        return (
            self.gateway
            and self.namespace == via.namespace
            and self.name == via.name
            and (self.section_name is None or self.section_name == via.listener)
            and (self.port is None or self.port == via.port)
        )


@dataclass(frozen=True, slots=True)
class ModelRoute:
    """
    @ivar pd_policy: ours (C{pdPolicy}); C{None}: a PD request always has both legs.
    @ivar parent_refs: the Gateways (and listeners) it serves requests of (L{attaches}).
    """

    meta: Metadata
    model_name: str
    lora_adapters: tuple[str, ...]
    rules: tuple[Rule, ...]
    rate_limit: RateLimit | None
    spec: Mapping[str, Any] = field(repr=False)
    pd_policy: PDPolicy | None = None
    parent_refs: tuple[ParentRef, ...] = ()

    kind = "ModelRoute"

    def attaches(self, via: GatewayListener | None) -> bool:
        """
        Whether this route serves a request that came through C{via} (None: through no
        Gateway), as Kthena's store decides: a route with C{parentRefs} serves only
        requests through a Gateway one of them names (L{ParentRef.admits}); a route
        without serves requests through no Gateway, and through a Gateway of its own
        namespace.
        """
        if not self.parent_refs:
            return via is None or via.namespace == self.meta.namespace
        return via is not None and any(ref.admits(via) for ref in self.parent_refs)


@dataclass(frozen=True, slots=True)
class Retry:
    attempts: int
    interval: float


@dataclass(frozen=True, slots=True)
class PDGroup:
    group_key: str
    prefill_labels: Mapping[str, str]
    decode_labels: Mapping[str, str]


@dataclass(frozen=True, slots=True)
class ModelServer:
    meta: Metadata
    model: str | None
    engine: str
    match_labels: Mapping[str, str]
    pd_group: PDGroup | None
    port: int
    protocol: str
    timeout: float | None
    retry: Retry | None
    kv_connector: str | None
    spec: Mapping[str, Any] = field(repr=False)
    kv_block_size: int = 16
    kv_bytes_per_token: int | None = None

    kind = "ModelServer"
    backend_type = "model_server"
    """What the metrics' and access log's C{backend_type} call it."""

    def selects(self, pod: Pod) -> bool:
        """Whether C{pod} belongs to this server by namespace and labels."""
        if pod.meta.namespace != self.meta.namespace:
            return False
        pod_labels = pod.meta.labels
        return all(pod_labels.get(k) == v for k, v in self.match_labels.items())

    def pd_role(self, pod: Pod) -> str | None:
        """C{decode}, C{prefill} or C{None} (not a PD server), as Kthena decides: decode
        labels win."""
        group = self.pd_group
        if group is None:
            return None
        labels = pod.meta.labels
        if all(labels.get(k) == v for k, v in group.decode_labels.items()):
            return "decode"
        if all(labels.get(k) == v for k, v in group.prefill_labels.items()):
            return "prefill"
        return None


@dataclass(frozen=True, slots=True)
class Pod:
    meta: Metadata
    ip: str | None
    phase: str
    ready: bool
    port: int | None
    status: Mapping[str, Any] = field(repr=False)
    spec: Mapping[str, Any] = field(default_factory=dict, repr=False)

    kind = "Pod"

    @property
    def serving(self) -> bool:
        """Running, Ready, addressed and not being deleted: may take traffic."""
        return bool(self.ip) and self.phase == "Running" and self.ready and not self.meta.deleting
