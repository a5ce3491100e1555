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

from kthena.config.router import RouterConfig
from kthena.interfaces import IScheduler, IServerReactor, ITokenEstimator
from kthena.observability.metrics import RouterMetrics
from kthena.proxy.context import ProxyContext
from kthena.proxy.upstream import Upstream
from kthena.ratelimit.estimate import CharsEstimator
from kthena.store import Datastore

if TYPE_CHECKING:
    from kthena.proxy.call import ProxyCall

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
    @ivar ready: the router has a configuration to route by.
    @ivar calls: proxied requests in flight.
    """

    def __init__(
        self,
        reactor: IServerReactor,
        config: RouterConfig,
        scheduler: IScheduler,
        store: Datastore | None = None,
        registry: CollectorRegistry | None = None,
        estimator: ITokenEstimator | None = None,
    ) -> None:
        self.reactor = reactor
        self.config = config
        self.scheduler = scheduler
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
        self.decisions: deque[ProxyContext] = deque(maxlen=DECISIONS_KEPT)
        self.request_hooks: list[RequestHook] = [self.metrics.request_done]
        self._idle_waiters: list[Deferred[None]] = []

    def apply(self, config: RouterConfig) -> None:
        """Switch to a new config generation (the data plane part of a reload)."""
        old_models, old_destinations = _names(self.config)
        self.store.replace(config.resources)
        self.config = config
        new_models, new_destinations = _names(config)
        self.metrics.forget(old_models - new_models, old_destinations - new_destinations)

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
