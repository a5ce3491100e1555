"""
A complete, cross-checked set of resources, sorted by kind: what one config generation
routes by (L{kthena.store.Datastore.replace}).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from kthena.config.gateway import Gateway
from kthena.config.inference import HTTPRoute, InferencePool, ModelRewrite
from kthena.config.resources import ModelRoute, ModelServer, Pod

Resource = ModelRoute | ModelServer | Pod | InferencePool | HTTPRoute | ModelRewrite | Gateway


@dataclass(frozen=True, slots=True)
class ResourceSet:
    """A complete, cross-checked set of resources (what one config generation routes by)."""

    routes: tuple[ModelRoute, ...] = ()
    servers: tuple[ModelServer, ...] = ()
    pods: tuple[Pod, ...] = ()
    pools: tuple[InferencePool, ...] = ()
    httproutes: tuple[HTTPRoute, ...] = ()
    rewrites: tuple[ModelRewrite, ...] = ()
    gateways: tuple[Gateway, ...] = ()

    def members(self) -> list[Resource]:
        """Every resource, kind by kind."""
        return [r for field in _SET_FIELDS.values() for r in getattr(self, field)]


def resource_set(resources: Iterable[Resource]) -> ResourceSet:
    """The resources sorted by kind, in the order given."""
    kinds: dict[type, list[Any]] = {kind: [] for kind in _SET_FIELDS}
    for resource in resources:
        kinds[type(resource)].append(resource)
    return ResourceSet(**{field: tuple(kinds[kind]) for kind, field in _SET_FIELDS.items()})


_SET_FIELDS: dict[type, str] = {
    ModelRoute: "routes",
    ModelServer: "servers",
    Pod: "pods",
    InferencePool: "pools",
    HTTPRoute: "httproutes",
    ModelRewrite: "rewrites",
    Gateway: "gateways",
}
