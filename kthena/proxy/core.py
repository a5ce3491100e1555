"""
The router's shared state for the data plane: datastore, scheduler, upstream client,
settings, the calls in flight, and the hooks that observe each request's end.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.task import deferLater
from twisted.logger import Logger

from kthena.config.resources import ModelServer
from kthena.config.router import RouterConfig
from kthena.interfaces import IScheduler, IServerReactor, ITokenEstimator
from kthena.observability.metrics import PodsView, RouterMetrics
from kthena.proxy.context import ProxyContext
from kthena.proxy.upstream import Upstream
from kthena.ratelimit.estimate import CharsEstimator
from kthena.scheduler.build import build_scheduler
from kthena.store import Datastore, PodEndpoint

if TYPE_CHECKING:
    from kthena.proxy.call import ProxyCall

log = Logger()

RequestHook = Callable[[ProxyContext], None]

DECISIONS_KEPT = 256
"""Routing decisions kept for C{/debug/routing/decisions}."""


def _names(config: RouterConfig) -> tuple[set[str], set[tuple[str, str]]]:
    """The model names and (route, server) pairs a config routes to, for metric labels."""
    models: set[str] = set()
    destinations: set[tuple[str, str]] = set()
    for route in config.resources.routes:
        models.update((route.model_name, *route.lora_adapters))
        for rule in route.rules:
            for target in rule.targets:
                server = f"{route.meta.namespace}/{target.model_server_name}"
                destinations.add((route.meta.key, server))
    models.discard("")
    return models, destinations


class RouterCore:
    """
    @ivar draining: set on shutdown; new requests are refused with 503.
    @ivar ready: the router has a configuration to route by (and, when pods are scraped,
        the first scrape round is done).
    @ivar pod_health: pods are scraped, so their health decides whether they take traffic.
    @ivar calls: proxied requests in flight.
    """

    def __init__(
        self,
        reactor: IServerReactor,
        config: RouterConfig,
        scheduler: IScheduler | None = None,
        store: Datastore | None = None,
        registry: CollectorRegistry | None = None,
        estimator: ITokenEstimator | None = None,
    ) -> None:
        self.reactor = reactor
        self.config = config
        self._fixed_scheduler = scheduler is not None
        self.store = store or Datastore()
        self.store.replace(config.resources)
        self.upstream = Upstream(reactor, config.upstream)
        self.started = int(time.time())
        self.draining = False
        self.ready = True
        self.calls: set[ProxyCall] = set()
        self.estimator: ITokenEstimator = estimator or CharsEstimator()
        self.registry = registry if registry is not None else CollectorRegistry()
        self.metrics = RouterMetrics(self.registry, reactor)
        self.scheduler: IScheduler = scheduler or build_scheduler(
            config.scheduler, self.metrics.plugin_timer
        )
        self.decisions: deque[ProxyContext] = deque(maxlen=DECISIONS_KEPT)
        self.request_hooks: list[RequestHook] = [self.metrics.request_done]
        self._idle_waiters: list[Deferred[None]] = []
        self._degraded: set[str] = set()
        self.pod_health = False

    def apply(self, config: RouterConfig) -> None:
        """Switch to a new config generation (the data plane part of a reload)."""
        old_models, old_destinations = _names(self.config)
        old_pods = set(self.store.pods)
        self.store.replace(config.resources)
        if config.scheduler != self.config.scheduler and not self._fixed_scheduler:
            self.scheduler = build_scheduler(config.scheduler, self.metrics.plugin_timer)
        else:
            self.scheduler.forget_pods(old_pods - set(self.store.pods))
        self.config = config
        new_models, new_destinations = _names(config)
        self.metrics.forget(old_models - new_models, old_destinations - new_destinations)

    def schedulable(self, server: ModelServer) -> list[PodEndpoint]:
        """
        The server's pods that may take a request now: Running and Ready, and healthy by
        their scrapes. When none is healthy, all of them (better a slow answer than none);
        that is logged once and counted on every request.
        """
        pods = self.store.server_pods(server)
        if not pods or not self.pod_health:
            return pods
        healthy = self.healthy(pods)
        key = server.meta.key
        if healthy:
            self._degraded.discard(key)
            return healthy
        if key not in self._degraded:
            self._degraded.add(key)
            log.warn(
                "no healthy pod serves {server}: scheduling among all {count} of them",
                server=key,
                count=len(pods),
            )
        self.metrics.unhealthy_fallback(key)
        return pods

    def healthy(self, pods: Sequence[PodEndpoint]) -> list[PodEndpoint]:
        """Those of C{pods} that are healthy by their scrapes (C{podMetrics} settings)."""
        health = self.config.pod_metrics
        now = self.reactor.seconds()
        return [p for p in pods if p.state.healthy(now, health.unhealthy_after, health.stale_after)]

    def pods_observed(self) -> None:
        """After a scrape round: refresh the model-server and load-balancing gauges."""
        servers = []
        for server in self.config.resources.servers:
            pods = self.store.server_pods(server)
            servers.append((server, pods, self.healthy(pods)))
        pools = {key: self.upstream.idle_connections(p) for key, p in self.store.pods.items()}
        self.metrics.pods_observed(PodsView(servers, pools))

    def request_done(self, ctx: ProxyContext) -> None:
        """Every request ends here exactly once, whatever its outcome."""
        for hook in self.request_hooks:
            hook(ctx)

    def call_started(self, call: ProxyCall) -> None:
        self.calls.add(call)
        self.decisions.append(call.ctx)

    def call_ended(self, call: ProxyCall) -> None:
        self.calls.discard(call)
        if not self.calls:
            waiters, self._idle_waiters = self._idle_waiters, []
            for waiter in waiters:
                waiter.callback(None)

    async def drain(self, timeout: float) -> int:
        """
        Refuse new requests and wait for those in flight, up to C{timeout} seconds;
        then cut what is left.

        @return: how many calls had to be cut.
        """
        self.draining = True
        if self.calls:
            idle: Deferred[None] = Deferred()
            self._idle_waiters.append(idle)
            timer = deferLater(self.reactor, timeout, lambda: None)
            await DeferredList([idle, timer], fireOnOneCallback=True, consumeErrors=True)
            if not timer.called:
                timer.cancel()
            if idle in self._idle_waiters:
                self._idle_waiters.remove(idle)
        cut = len(self.calls)
        for call in list(self.calls):
            call.cancel()
        await self.upstream.close()
        return cut
