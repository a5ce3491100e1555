"""
Where an HTTPRoute sends a request, as Kthena's router and the Gateway API rank routes:
among the HTTPRoutes attached to the request's Gateway listener, those whose
C{hostnames} take the request's host (exact over wildcard over none, longer over
shorter); in each, its most specific matching rule (C{Exact} over C{PathPrefix}, longer
over shorter, over C{RegularExpression}; then a method match, then more header matches;
then rule and match order); across routes, the host first, then the path (method,
headers), then the oldest route, then by namespace and name. Then an
InferencePool by the rule's weights, and the model name the pool's
C{InferenceModelRewrite}s give the request (an exact model match of any rewrite over a
generic rule; then the oldest rewrite; then rule order; then a target by weight).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from kthena.config.gateway import host_rank
from kthena.config.inference import (
    PATH_EXACT,
    PATH_PREFIX,
    HTTPRoute,
    HTTPRouteRule,
    ModelRewrite,
    PoolBackend,
    RouteMatchRule,
)

HeaderLookup = Callable[[str], "str | None"]

_PATH_RANK = {PATH_EXACT: 3, PATH_PREFIX: 2}  # RegularExpression: 1


@dataclass(frozen=True, slots=True)
class HTTPRouteChoice:
    """The route and rule that take a request."""

    route: HTTPRoute
    rule: HTTPRouteRule


def route_order(route: HTTPRoute) -> tuple[float, str, str, int]:
    """The Gateway API's tie-break between routes: oldest, then namespace and name."""
    meta = route.meta
    created, order = meta.age_order
    return (created, meta.namespace, meta.name, order)


def path_rank(match: RouteMatchRule, path: str) -> tuple[int, int] | None:
    """How specifically C{match}'s path takes C{path}; C{None}: it does not."""
    kind = match.path_type
    value = match.value
    if kind == PATH_EXACT:
        return (3, len(value)) if path == value else None
    if kind == PATH_PREFIX:
        if not value:
            return (2, 1) if path.startswith("/") else None
        if path == value or path.startswith(value + "/"):
            return (2, len(value))
        return None
    assert match.pattern is not None
    return (1, 0) if match.pattern.search(path) is not None else None


def _takes(match: RouteMatchRule, method: str, header: HeaderLookup) -> bool:
    if not match.evaluable:
        return False
    if match.method is not None and match.method != method:
        return False
    return all(h.matches(header(h.name)) for h in match.headers)


def best_rule(
    route: HTTPRoute, method: str, path: str, header: HeaderLookup
) -> tuple[tuple[int, ...], HTTPRouteRule] | None:
    """
    The route's rule that takes the request, with its rank: the path's, then a method
    match, then the number of header matches (the Gateway API's order); equal ranks go
    to the first rule.
    """
    best: tuple[tuple[int, ...], HTTPRouteRule] | None = None
    for rule in route.rules:
        ranks = [(2, 1, 0, 0)] if not rule.matches else [
            (*on_path, match.method is not None, len(match.headers))
            for match in rule.matches
            if _takes(match, method, header) and (on_path := path_rank(match, path)) is not None
        ]  # fmt: skip
        for rank in ranks:
            if best is None or rank > best[0]:
                best = (rank, rule)
    return best


def choose_route(
    routes: Sequence[HTTPRoute], host: str, method: str, path: str, header: HeaderLookup
) -> HTTPRouteChoice | None:
    """
    @param routes: the HTTPRoutes attached to the request's listener, in L{route_order}.
    @param host: the request's host, normalized (L{normalize_host}).
    """
    best: tuple[tuple[int, ...], HTTPRouteChoice] | None = None
    for route in routes:
        hosts = host_rank(route.hostnames, host)
        if hosts is None:
            continue
        found = best_rule(route, method, path, header)
        if found is None:
            continue
        rank = (*hosts, *found[0])
        if best is None or rank > best[0]:
            best = (rank, HTTPRouteChoice(route, found[1]))
    return best[1] if best is not None else None


def choose_backend(rule: HTTPRouteRule, rng: random.Random) -> PoolBackend | None:
    """A pool of the rule's by weight; C{None}: it has none with traffic."""
    backends = rule.backends
    if not backends:
        return None
    if len(backends) == 1:
        return backends[0]
    return rng.choices(backends, weights=[b.weight for b in backends])[0]


def rewrite_model(
    rewrites: Sequence[ModelRewrite], model: str, rng: random.Random
) -> tuple[str, bool] | None:
    """
    The model name C{rewrites} (one pool's, oldest first) give C{model}, and whether a
    rule named C{model} (rather than took every model); C{None}: none applies.
    """
    exact = generic = None
    for rewrite in rewrites:
        for rule in rewrite.rules:
            if not rule.models:
                if generic is None:
                    generic = rule
            elif model in rule.models:
                exact = rule
                break
        if exact is not None:
            break
    chosen = exact if exact is not None else generic
    if chosen is None:
        return None
    targets = chosen.targets
    if len(targets) == 1:
        return targets[0].model, exact is not None
    return rng.choices(targets, weights=[t.weight for t in targets])[0].model, exact is not None
