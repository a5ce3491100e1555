"""
The router's shared state for the data plane: datastore, scheduler, upstream client,
settings, the calls in flight, and the hooks that observe each request's end.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.task import deferLater
from twisted.logger import Logger

from kthena.config.resources import ModelServer
from kthena.config.router import RouterConfig
from kthena.interfaces import IScheduler, IServerReactor, ITokenEstimator
from kthena.observability.metrics import PodsView, RouterMetrics
from kthena.pods import PodEndpoint
from kthena.proxy.headers import upstream_skip
from kthena.proxy.health import Health
from kthena.proxy.internal import InternalErrors
from kthena.proxy.outlier import OutlierDetector
from kthena.proxy.upstream import Upstream
from kthena.ratelimit.estimate import CharsEstimator
from kthena.record import RequestRecord
from kthena.scheduler.build import build_scheduler
from kthena.store import Datastore

if TYPE_CHECKING:
    from kthena.proxy.call import ProxyCall

log = Logger()

RequestHook = Callable[[RequestRecord], None]

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
    @ivar scraped: the first scrape round is done (or pods are not scraped).
    @ivar health: the one rule for which pods may take traffic (L{kthena.proxy.health}).
    @ivar calls: proxied requests in flight.
    @ivar inference_paths: the paths proxied to pods (C{inferencePaths}).
    @ivar drop_upstream: request headers never forwarded to pods.
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
        self.scraped = True
        self.calls: set[ProxyCall] = set()
        self.estimator: ITokenEstimator = estimator or CharsEstimator()
        self.registry = registry if registry is not None else CollectorRegistry()
        self.metrics = RouterMetrics(
            self.registry, reactor, config.observability.metrics.destination_labels
        )
        self.scheduler: IScheduler = scheduler or build_scheduler(
            config.scheduler, self.metrics.plugin_timer
        )
        self.decisions: deque[RequestRecord] = deque(maxlen=DECISIONS_KEPT)
        self.request_hooks: list[RequestHook] = [self.metrics.request_done]
        self.internal_errors = InternalErrors(reactor)
        self.outliers = OutlierDetector(config.upstream.outlier, reactor, self.metrics.ejected)
        self.health = Health(self.store, reactor, self.outliers, None)
        self.metrics.read_gauges(self._in_flight, self._prefix_entries)
        self._idle_waiters: list[Deferred[None]] = []
        self._degraded: set[str] = set()
        self._traffic(config)

    def _traffic(self, config: RouterConfig) -> None:
        self.inference_paths = frozenset(p.encode() for p in config.inference_paths)
        self.drop_upstream = upstream_skip(config.upstream.forward_authorization)
        self.metrics.known_paths(config.inference_paths)
        self.outliers.config = config.upstream.outlier
        if self.health.scrapes is not None:
            self.health.scrapes = config.pod_metrics

    def _in_flight(self) -> int:
        return len(self.calls)

    def _prefix_entries(self) -> int:
        return self.scheduler.prefix_entries()  # the scheduler of the current generation

    def scrape_pods(self) -> None:
        """Pods are scraped: their scrapes count in their health; not ready until the first
        round."""
        self.health.scrapes = self.config.pod_metrics
        self.scraped = False

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
        self._traffic(config)
        new_models, new_destinations = _names(config)
        self.metrics.forget(old_models - new_models, old_destinations - new_destinations)

    def schedulable(self, server: ModelServer) -> list[PodEndpoint]:
        """
        The server's pods that may take a request now: the healthy ones (serving, healthy
        by their scrapes, not ejected). When none is healthy, all that serve (better a
        slow answer than none); that is logged once and counted on every request.
        """
        pods = self.store.server_pods(server)
        if not pods:
            return pods
        healthy = self.health.healthy(pods)
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

    def pods_observed(self) -> None:
        """After a scrape round: refresh the model-server and load-balancing gauges."""
        servers = [(server, self.health.server(server)) for server in self.config.resources.servers]
        pools = {key: self.upstream.idle_connections(p) for key, p in self.store.pods.items()}
        self.metrics.pods_observed(PodsView(servers, pools))

    def readiness(self) -> tuple[bool, str, list[str]]:
        """
        Whether C{/readyz} says ready, why, and the models no healthy pod serves
        (L{kthena.proxy.health}; C{readiness} in the config).
        """
        if self.draining:
            return False, "draining", []
        if not self.scraped:
            return False, "not ready: the first scrape of the pods is not done", []
        without = self.health.models_without_healthy_pods()
        if without and (
            self.config.readiness == "allModels" or len(without) == len(self.store.model_names())
        ):
            shown = ", ".join(without[:10]) + (
                f" and {len(without) - 10} more" if len(without) > 10 else ""
            )
            return False, f"not ready: no healthy pod serves {shown}", without
        return True, "ready", without

    def request_done(self, ctx: RequestRecord) -> None:
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
