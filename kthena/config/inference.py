"""
The Gateway API Inference Extension's documents, as the router routes by them: an
C{HTTPRoute} (C{gateway.networking.k8s.io/v1}) whose rules send requests to an
C{InferencePool} (C{inference.networking.k8s.io/v1}), whose endpoints the router picks
itself with its own scheduler (a pool's C{endpointPickerRef} is not called), and the
C{InferenceModelRewrite} (C{inference.networking.x-k8s.io/v1alpha2}) that renames the
request's model inside a pool.

The parsing is L{kthena.config.inference_documents}'s; the matching
L{kthena.inference_routing}'s.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from kthena.config.resources import GatewayListener, Metadata, ModelServer, ParentRef, Pod

GATEWAY_API = "gateway.networking.k8s.io/v1"
INFERENCE_GROUP = "inference.networking.k8s.io"
INFERENCE_API = f"{INFERENCE_GROUP}/v1"
REWRITE_API = "inference.networking.x-k8s.io/v1alpha2"
ENGINE_ANNOTATION = "kthena.io/inference-engine"
"""An InferencePool annotation naming its pods' engine (C{vLLM}, the default, or
C{SGLang}): the pool's API has no such field, and the scrape must know the metric names."""


@dataclass(frozen=True, slots=True)
class PoolServer(ModelServer):
    """
    An InferencePool seen as the backend the pipeline schedules over and dispatches to:
    its selector and target ports (C{port}: the first), no model rename, no traffic
    policy (the dispatcher's defaults), no prefill/decode group.

    @ivar ports: every target port: with several, each pod and port is an endpoint.
    """

    ports: tuple[int, ...] = ()

    kind = "InferencePool"
    backend_type = "inference_pool"


@dataclass(frozen=True, slots=True)
class InferencePool:
    """
    @ivar target_ports: C{spec.targetPorts}: each pod and port is an endpoint (the
        Extension's rule; Kthena uses the first only).
    @ivar server: the pool as a backend (L{PoolServer}).
    """

    meta: Metadata
    match_labels: Mapping[str, str]
    target_ports: tuple[int, ...]
    server: PoolServer
    spec: Mapping[str, Any] = field(repr=False)

    kind = "InferencePool"

    def selects(self, pod: Pod) -> bool:
        return self.server.selects(pod)


PATH_EXACT, PATH_PREFIX, PATH_REGEX = "Exact", "PathPrefix", "RegularExpression"


@dataclass(frozen=True, slots=True)
class HeaderMatch:
    """An C{HTTPHeaderMatch}: C{Exact}, or C{RegularExpression} found anywhere in the
    value (as paths are matched: anchor it with C{^...$})."""

    name: str
    value: str
    pattern: re.Pattern[str] | None = None

    def matches(self, text: str | None) -> bool:
        if text is None:
            return False
        if self.pattern is not None:
            return self.pattern.search(text) is not None
        return text == self.value


@dataclass(frozen=True, slots=True)
class RouteMatchRule:
    """
    One of a rule's C{matches}: the path (C{Exact}, C{PathPrefix} on whole segments with
    a trailing slash ignored, or C{RegularExpression}), and the method and headers,
    ANDed. C{queryParams} are not evaluated: a match with them never matches (Kthena's
    choice: ignoring them would turn a narrow match into a wide one).

    @ivar value: the path; for C{PathPrefix}, without its trailing slashes ("" for "/").
    """

    path_type: str
    value: str
    pattern: re.Pattern[str] | None = None
    method: str | None = None
    headers: tuple[HeaderMatch, ...] = ()
    evaluable: bool = True


@dataclass(frozen=True, slots=True)
class PoolBackend:
    """One of a rule's C{backendRefs} naming an InferencePool, with traffic (weight > 0)."""

    namespace: str
    name: str
    weight: int

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True, slots=True)
class HTTPRouteRule:
    """
    @ivar matches: C{()}: the Gateway API's default, C{PathPrefix /}.
    @ivar backends: its InferencePool backends with traffic; other kinds of backend are
        not the router's (as Kthena): a rule with none answers 500.
    """

    index: int
    name: str
    matches: tuple[RouteMatchRule, ...]
    backends: tuple[PoolBackend, ...]


@dataclass(frozen=True, slots=True)
class HTTPRoute:
    """
    An HTTPRoute: it serves requests through the Gateway listeners its C{parentRefs}
    name (never a request through no Gateway), for its C{hostnames} (none: any host).

    Its class attributes stand in for a ModelRoute's where the pipeline reads them: no
    rate limit, no prefill/decode policy.
    """

    meta: Metadata
    parent_refs: tuple[ParentRef, ...]
    hostnames: tuple[str, ...]
    rules: tuple[HTTPRouteRule, ...]
    spec: Mapping[str, Any] = field(repr=False)

    kind = "HTTPRoute"
    rate_limit = None
    pd_policy = None

    def attaches(self, via: GatewayListener | None) -> bool:
        """A ref names C{via}, and C{via} takes routes of this one's namespace (a
        Gateway's C{allowedRoutes}, as Kthena checks them)."""
        return (
            via is not None
            and any(ref.admits(via) for ref in self.parent_refs)
            and via.takes_routes_of(self.meta.namespace)
        )


@dataclass(frozen=True, slots=True)
class RewriteTarget:
    model: str
    weight: int


@dataclass(frozen=True, slots=True)
class RewriteRule:
    """
    @ivar models: the model names it matches exactly (any of them); C{()}: every model
        (a generic rule, which an exact rule of any rewrite of the pool outranks).
    """

    models: tuple[str, ...]
    targets: tuple[RewriteTarget, ...]


@dataclass(frozen=True, slots=True)
class ModelRewrite:
    """An C{InferenceModelRewrite}: model renames for the requests of one pool."""

    meta: Metadata
    pool: str
    """The pool's C{namespace/name} (C{poolRef} is in the rewrite's namespace)."""
    rules: tuple[RewriteRule, ...]
    spec: Mapping[str, Any] = field(repr=False)

    kind = "InferenceModelRewrite"
