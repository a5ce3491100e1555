"""
The rate limits as a part of the router's tree: the limiter (also the observer that
settles every request), the local buckets and one connection per Redis the routes name
(children, so they start, reconnect and close with the tree), and a sweep that keeps the
local buckets bounded.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.application.service import IService, MultiService
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from zope.interface import implementer

from kthena.config.router import RouterConfig
from kthena.interfaces import IBucketBackend, IReconfigurable
from kthena.ratelimit.buckets import LocalBuckets
from kthena.ratelimit.limiter import RateLimiter
from kthena.ratelimit.outages import Outages

SWEEP_INTERVAL = 60.0
"""Seconds between sweeps of the local buckets that are full again."""


@implementer(IReconfigurable)
class RateLimits(MultiService):
    """
    @param counted: told of each failed backend call, C{(backend, operation)}.
    """

    name = "rate limits"

    def __init__(
        self,
        reactor: IReactorTime,
        config: RouterConfig,
        counted: Callable[[str, str], None] = lambda backend, operation: None,
    ) -> None:
        super().__init__()
        self.reactor = reactor
        self.local = LocalBuckets(reactor)
        self.outages = Outages(counted, lambda: self.limiter.settings.fail_open)
        self._redis: dict[tuple[str, str | None], IBucketBackend] = {}
        self.limiter = RateLimiter(self.local, config.rate_limits, self._backend, self.outages)
        self.limiter.update(config.resources.routes, config.rate_limits)
        self._sweep = LoopingCall(self.local.sweep)
        self._sweep.clock = reactor

    def startService(self) -> None:
        super().startService()
        self._sweep.start(SWEEP_INTERVAL, now=False)

    def stopService(self) -> Deferred[Any]:
        if self._sweep.running:
            self._sweep.stop()
        d: Deferred[Any] = super().stopService()
        return d

    def reconfigure(self, config: RouterConfig) -> None:
        self.limiter.update(config.resources.routes, config.rate_limits)
        used = {id(r.backend) for r in self.limiter.routes.values()}
        for key, backend in list(self._redis.items()):
            if id(backend) not in used:
                del self._redis[key]
                self.outages.forget(backend)
                IService(backend).disownServiceParent()
            else:
                backend.timeout = config.rate_limits.redis_timeout  # type: ignore[attr-defined]

    def _backend(self, address: str, password: str | None) -> IBucketBackend:
        """The one connection to the Redis at C{address} (made on first use)."""
        key = (address, password)
        backend = self._redis.get(key)
        if backend is None:
            from kthena.ratelimit.redis import RedisBuckets  # txredisapi installs a reactor

            backend = RedisBuckets(
                self.reactor, address, password, self.limiter.settings.redis_timeout
            )
            self._redis[key] = backend
            IService(backend).setServiceParent(self)
        return backend
