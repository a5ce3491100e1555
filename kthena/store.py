"""
The datastore: the resources of the current config generation, indexed for routing, and
the live state of each pod that outlives reloads.

Route matching follows Kthena: routes by C{modelName} first, then by LoRA adapter name;
routes sharing a name are tried oldest first; in a route, the first rule whose conditions
(headers, uri, body.model, ANDed) all hold wins, then a target by weight. A route whose
rules do not match lets the next route try.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

from kthena.config.gateway import normalize_host
from kthena.config.inference import (
    HTTPRoute,
    HTTPRouteRule,
    InferencePool,
    ModelRewrite,
    PoolServer,
)
from kthena.config.resources import (
    GatewayListener,
    ModelRoute,
    ModelServer,
    Pod,
    Rule,
)
from kthena.config.resourceset import ResourceSet
from kthena.inference_routing import (
    HTTPRouteChoice,
    choose_backend,
    choose_route,
    rewrite_model,
    route_order,
)
from kthena.pods import PodEndpoint

HeaderLookup = Callable[[str], str]
UNKNOWN_MODEL = "unknown"
"""The model label of a request whose model name the resources do not give."""


@dataclass(frozen=True, slots=True)
class RouteMatch:
    """
    The outcome of matching a request: where it goes, and whether it names an adapter.

    @ivar route: its ModelRoute or, for a request an HTTPRoute sends to an InferencePool,
        that HTTPRoute (C{server} is then the pool's L{PoolServer
        <kthena.config.inference.PoolServer>}).
    @ivar rewritten: the model name the pool's InferenceModelRewrites gave it.
    @ivar via: the Gateway listener it came through.
    @ivar declared: the requested model is a name the resources give (a route's, or one
        a rewrite matches exactly): an InferencePool takes any name, which the metrics
        must not turn into a series each (L{kthena.observability.metrics}).
    """

    route: ModelRoute | HTTPRoute
    rule: Rule | HTTPRouteRule
    server: ModelServer
    is_lora: bool
    rewritten: str | None = None
    via: GatewayListener | None = None
    declared: bool = True

    def upstream_model(self, requested: str) -> str:
        """The model name sent to the pod: the server's model, except for LoRA requests;
        a pool's rewrite, if any."""
        if self.rewritten is not None:
            return self.rewritten
        if self.is_lora or self.server.model is None:
            return requested
        return self.server.model

    def model_label(self, requested: str) -> str:
        """The requested model as a metric label: bounded (L{declared})."""
        return requested if self.declared and requested else UNKNOWN_MODEL

    @property
    def model_route(self) -> str | None:
        return self.route.meta.key if self.route.kind == "ModelRoute" else None

    @property
    def http_route(self) -> str | None:
        return self.route.meta.key if self.route.kind == "HTTPRoute" else None

    @property
    def model_server(self) -> str | None:
        return self.server.meta.key if self.server.kind == "ModelServer" else None

    @property
    def inference_pool(self) -> str | None:
        return self.server.meta.key if self.server.kind == "InferencePool" else None


def _ports(server: ModelServer, pod: Pod) -> tuple[int, ...]:
    """
    The ports C{server} reaches C{pod} on: its port, or the pod's own
    (C{kthena.io/workload-port}); every one of a pool's C{targetPorts} when it has
    several (the Inference Extension: each pod and port is an endpoint).
    """
    if isinstance(server, PoolServer) and len(server.ports) > 1:
        return server.ports
    return (pod.port or server.port,)


def _age(resource: ModelRoute | ModelRewrite) -> tuple[float, int]:
    return resource.meta.age_order


@dataclass(slots=True)
class _Index:
    by_model: dict[str, list[ModelRoute]] = field(default_factory=dict)
    by_lora: dict[str, list[ModelRoute]] = field(default_factory=dict)
    servers: dict[str, ModelServer] = field(default_factory=dict)
    server_pods: dict[tuple[str, str], list[PodEndpoint]] = field(default_factory=dict)
    """Each server's and pool's pods, by kind and key."""
    rule_servers: dict[int, list[ModelServer]] = field(default_factory=dict)
    """Each rule's target servers (by the rule's id), in target order."""
    pools: dict[str, InferencePool] = field(default_factory=dict)
    httproutes: list[HTTPRoute] = field(default_factory=list)
    """In the order the Gateway API breaks ties in (L{route_order})."""
    rewrites: dict[str, list[ModelRewrite]] = field(default_factory=dict)
    """Each pool's InferenceModelRewrites, oldest first."""


class Datastore:
    """
    The routing state; L{replace} swaps in a whole config generation at once.

    @ivar generation: how many resource sets have been applied.
    """

    def __init__(self, rng: random.Random | None = None) -> None:
        self.resources = ResourceSet()
        self.generation = 0
        self.pods: dict[str, PodEndpoint] = {}
        self._index = _Index()
        self._random = rng or random.Random()

    def replace(self, resources: ResourceSet) -> None:
        """Apply a new resource set; pods that stay keep their live state."""
        index = _Index()
        for route in sorted(resources.routes, key=_age):
            if route.model_name:
                index.by_model.setdefault(route.model_name, []).append(route)
            for lora in route.lora_adapters:
                index.by_lora.setdefault(lora, []).append(route)
        pods: dict[str, PodEndpoint] = {}
        for server in resources.servers:
            index.servers[server.meta.key] = server
        for pool in resources.pools:
            index.pools[pool.meta.key] = pool
        for server in (*resources.servers, *(p.server for p in resources.pools)):
            index.server_pods[(server.kind, server.meta.key)] = self._members(
                server, resources.pods, pods
            )
        index.httproutes = sorted(resources.httproutes, key=route_order)
        for rewrite in sorted(resources.rewrites, key=_age):
            index.rewrites.setdefault(rewrite.pool, []).append(rewrite)
        for route in resources.routes:
            for rule in route.rules:
                index.rule_servers[id(rule)] = [
                    index.servers[f"{route.meta.namespace}/{t.model_server_name}"]
                    for t in rule.targets
                ]
        self.pods = pods
        self._index = index
        self.resources = resources
        self.generation += 1

    def _members(
        self, server: ModelServer, candidates: tuple[Pod, ...], pods: dict[str, PodEndpoint]
    ) -> list[PodEndpoint]:
        """C{server}'s endpoints: its serving pods on each of its ports (L{_ports})."""
        members: list[PodEndpoint] = []
        for pod in candidates:
            if not (pod.serving and server.selects(pod)):
                continue
            for port in _ports(server, pod):
                endpoint = self._endpoint(pod, server, pods, port)
                if server.kind == "ModelServer":
                    endpoint.servers = (*endpoint.servers, server.meta.key)
                members.append(endpoint)
        return members

    def _endpoint(
        self, pod: Pod, server: ModelServer, pods: dict[str, PodEndpoint], port: int
    ) -> PodEndpoint:
        """
        The pod's endpoint on C{port}: one per pod and port. Servers (or pools)
        selecting the same pod on another port get an endpoint of their own, keyed
        C{namespace/name:port}.
        """
        assert pod.ip is not None
        key = pod.meta.key
        endpoint = pods.get(key)
        if endpoint is not None and endpoint.port != port:
            key = f"{key}:{port}"
            endpoint = pods.get(key)
        if endpoint is not None:
            return endpoint
        old = self.pods.get(key)
        if old is not None and old.host == pod.ip and old.port == port:
            old.pod = pod
            old.servers = ()
            endpoint = old
        else:
            endpoint = PodEndpoint(key=key, pod=pod, host=pod.ip, port=port, engine=server.engine)
        pods[key] = endpoint
        return endpoint

    # -- queries

    def match(
        self, model: str, header: HeaderLookup, path: str, via: GatewayListener | None = None
    ) -> RouteMatch | None:
        """
        Find the route, rule and target server for a request.

        @param header: the request's header value by lower-case name ("" when absent).
        @param via: the Gateway listener the request came through (None: no Gateway); a
            route serves it only if it attaches there (L{ModelRoute.attaches}).
        """
        index = self._index
        routes = index.by_model.get(model)
        is_lora = False
        if routes is None:
            routes = index.by_lora.get(model)
            is_lora = True
            if routes is None:
                return None
        for route in routes:
            if (via is not None or route.parent_refs) and not route.attaches(via):
                continue
            rule = _select_rule(route.rules, model, header, path)
            if rule is None:
                continue
            servers = index.rule_servers[id(rule)]
            if len(servers) == 1:
                server = servers[0]
            else:
                server = self._random.choices(servers, weights=rule.weights)[0]
            return RouteMatch(route, rule, server, is_lora, via=via)
        return None

    def match_http_route(
        self,
        model: str,
        host: str,
        method: str,
        path: str,
        header: Callable[[str], str | None],
        via: GatewayListener | None,
    ) -> tuple[HTTPRouteChoice, RouteMatch | None] | None:
        """
        The HTTPRoute and rule that take a request through C{via}
        (L{kthena.inference_routing}), and where they send it: C{None} in place of the
        match when the rule has no InferencePool with traffic; C{None} when no route
        takes it.
        """
        if not self._index.httproutes or via is None:
            return None
        routes = [r for r in self._index.httproutes if r.attaches(via)]
        choice = choose_route(routes, normalize_host(host), method, path, header)
        if choice is None:
            return None
        backend = choose_backend(choice.rule, self._random)
        if backend is None:
            return choice, None
        pool = self._index.pools[backend.key]
        found = rewrite_model(self._index.rewrites.get(pool.meta.key, ()), model, self._random)
        rewritten, declared = found if found is not None else (None, False)
        match = RouteMatch(choice.route, choice.rule, pool.server, False, rewritten, via, declared)
        return choice, match

    def pool_rewrites(self, pool: InferencePool) -> list[ModelRewrite]:
        """C{pool}'s InferenceModelRewrites, oldest first."""
        return self._index.rewrites.get(pool.meta.key, [])

    def server_pods(self, server: ModelServer) -> list[PodEndpoint]:
        """Pods of C{server} (or of a pool: its C{server}) that may take traffic
        (Running, Ready, not deleting)."""
        return self._index.server_pods.get((server.kind, server.meta.key), [])

    def route_servers(self, route: ModelRoute) -> list[ModelServer]:
        """The model servers C{route}'s rules may send to, each once."""
        servers: dict[str, ModelServer] = {}
        for rule in route.rules:
            for server in self._index.rule_servers[id(rule)]:
                servers.setdefault(server.meta.key, server)
        return list(servers.values())

    def route_table(self) -> list[tuple[str, str, list[ModelRoute]]]:
        """
        For the debug views: every name a request may ask for, how it is matched
        (C{modelName} or C{loraAdapters}) and its routes in the order they are tried.
        A name found under C{modelName} is never looked up among adapters.
        """
        table = [(name, "modelName", routes) for name, routes in self._index.by_model.items()]
        table += [(name, "loraAdapters", routes) for name, routes in self._index.by_lora.items()]
        return sorted(table, key=lambda entry: (entry[0], entry[1] != "modelName"))

    def model_names(self, via: GatewayListener | None = None) -> list[tuple[str, ModelRoute]]:
        """
        Every base model and LoRA adapter name a route serves through C{via} (the Gateway
        listener requests come through; L{match}), with the first such route.
        """
        names: dict[str, ModelRoute] = {}
        for table in (self._index.by_model, self._index.by_lora):
            for name, routes in table.items():
                for route in routes:
                    if route.attaches(via):
                        names.setdefault(name, route)
                        break
        return sorted(names.items())


def _select_rule(
    rules: tuple[Rule, ...], model: str, header: HeaderLookup, path: str
) -> Rule | None:
    for rule in rules:
        match = rule.match
        if match is None:
            return rule
        if match.body_model is not None and match.body_model != model:
            continue
        if not all(m.matches(header(name)) for name, m in match.headers):
            continue
        if match.uri is not None and not match.uri.matches(path):
            continue
        return rule
    return None
