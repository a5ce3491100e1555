"""
The rate limits as a part of the router's tree: the limiter (also the observer that
settles every request), the local buckets and one connection per Redis the routes name
(children, so they start, reconnect and close with the tree), and a sweep that keeps the
local buckets bounded.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

from twisted.application.service import IService, MultiService
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.interfaces import IReactorThreads, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from zope.interface import implementer

from kthena.config.router import RouterConfig
from kthena.interfaces import IBucketBackend, IReconfigurable
from kthena.ratelimit.buckets import LocalBuckets
from kthena.ratelimit.estimate import CharsEstimator
from kthena.ratelimit.limiter import RateLimiter, RouteLimits
from kthena.ratelimit.outages import Outages
from kthena.ratelimit.tokenizer import InThread, Tokenizers

SWEEP_INTERVAL = 60.0
"""Seconds between sweeps of the local buckets that are full again."""


@implementer(IReconfigurable)
class RateLimits(MultiService):
    """
    @param counted: told of failed backend calls, C{(backend, operation, how many)}.
    """

    name = "rate limits"

    def __init__(
        self,
        reactor: IReactorTime,
        config: RouterConfig,
        counted: Callable[[str, str, int], None] = lambda backend, operation, count: None,
        in_thread: InThread | None = None,
    ) -> None:
        """@param in_thread: runs tokenizer work in a thread (the reactor's pool when
        omitted)."""
        super().__init__()
        self.reactor = reactor
        self.tokenizers = Tokenizers(
            config,
            in_thread or _reactor_pool(reactor),
            CharsEstimator(),
        )
        self.tokenizers.setServiceParent(self)
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
        self.tokenizers.reconfigure(config)
        self.limiter.update(config.resources.routes, config.rate_limits)
        used = {id(r.backend) for r in self.limiter.routes.values()}
        for key, backend in list(self._redis.items()):
            if id(backend) not in used:
                del self._redis[key]
                self.outages.forget(backend)
                IService(backend).disownServiceParent()
            else:
                backend.timeout = config.rate_limits.redis_timeout  # type: ignore[attr-defined]

    def state(self) -> Deferred[dict[str, object]]:
        """Each limited route's buckets (capacity, level, debt) and each backend, for
        C{/debug/router/state}; no password or secret. A backend that cannot answer
        leaves its routes' levels out (and says why), not the rest of the view: an outage
        is when an operator reads it."""
        routes = sorted(self.limiter.routes.values(), key=lambda r: r.route)

        def levels(route: RouteLimits) -> Deferred[list[float | None] | str]:
            d: Deferred[Any] = route.backend.levels([b.spec for b in route.buckets(None)])
            return d.addErrback(lambda f: f"a backend cannot answer: {f.getErrorMessage()}")

        d: Deferred[Any] = gatherResults([levels(r) for r in routes])

        def view(results: list[list[float | None] | str]) -> dict[str, object]:
            state: dict[str, object] = {
                "fail_open": self.limiter.settings.fail_open,
                "redis_timeout_seconds": self.limiter.settings.redis_timeout,
                "backends": [self._backend_view(b) for b in (self.local, *self._redis.values())],
                "routes": [
                    _route_view(r, None if isinstance(lv, str) else lv)
                    | ({"error": lv} if isinstance(lv, str) else {})
                    for r, lv in zip(routes, results, strict=True)
                ],
            }
            errors = [lv for lv in results if isinstance(lv, str)]
            if errors:
                state["error"] = errors[0]
            return state

        return d.addCallback(view)

    def _backend_view(self, backend: IBucketBackend) -> dict[str, object]:
        if isinstance(backend, LocalBuckets):
            return {"backend": "local", "buckets": len(self.local)}
        return {
            "backend": backend.name,
            "address": getattr(backend, "display", None),
            "healthy": getattr(backend, "healthy", None),
            "last_error": getattr(backend, "last_error", None),
            "down": self.outages.down(backend),
        }

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
            self.outages.listed(backend)
            IService(backend).setServiceParent(self)
        return backend


def _route_view(limits: RouteLimits, levels: list[float | None] | None) -> dict[str, object]:
    limit = limits.limit
    buckets = limits.buckets(None)
    per_user = limit.per_user
    return {
        "route": limits.route,
        "model": limits.model,
        "unit": limit.unit,
        "backend": limits.backend.name,
        "buckets": [
            _bucket_view(b.kind, b.spec.key, b.spec.capacity, b.spec.per_second,
                         levels[i] if levels is not None else None, levels is not None)
            for i, b in enumerate(buckets)
        ],
        "per_user": None
        if per_user is None
        else {
            "unit": per_user.unit,
            "input_tokens_per_unit": per_user.input_tokens_per_unit,
            "output_tokens_per_unit": per_user.output_tokens_per_unit,
            "requests_per_unit": per_user.requests_per_unit,
        },
    }  # fmt: skip


def _bucket_view(
    kind: str, key: str, capacity: float, per_second: float, level: float | None, known: bool
) -> dict[str, object]:
    """A bucket never used (or forgotten: full again) shows as full; one whose backend
    cannot answer shows no level."""
    now = (capacity if level is None else level) if known else None
    return {
        "kind": kind,
        "key": key,
        "capacity": capacity,
        "refill_per_second": round(per_second, 6),
        "level": None if now is None else round(now, 3),
        "debt": None if now is None else round(max(0.0, -now), 3),
    }


def _reactor_pool(reactor: object) -> InThread:
    """Runs work in the reactor's thread pool (asked for only when there is work: test
    reactors have none)."""

    def run(f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        threads = cast(IReactorThreads, reactor)
        return deferToThreadPool(reactor, threads.getThreadPool(), f, *args)  # type: ignore[arg-type]

    return run
