"""
The data plane as one service of the router's tree: the request pipeline and the parts
it is made of, built once from the first config and reconfigured in place by later ones.
Stopping it drains: new requests are refused (503), those in flight get C{drainTimeout}
to finish, then what is left is cut.

It knows no observability module: the observers (metrics, access log, decision ring), the
plugin timer and the ejection counter are handed in by whoever builds it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from zope.interface import implementer

from kthena.config.router import RouterConfig
from kthena.fairness.fairness import Fairness
from kthena.identity.identity import Identifier
from kthena.interfaces import (
    IReconfigurable,
    IRequestObserver,
    IScheduler,
    IServerReactor,
    ITokenEstimator,
    IUpstream,
)
from kthena.pipeline.admit import Admission
from kthena.pipeline.dispatch import Dispatcher
from kthena.pipeline.health import Health, Readiness
from kthena.pipeline.identify import Identification
from kthena.pipeline.inflight import InFlight
from kthena.pipeline.internal import InternalErrors
from kthena.pipeline.local import LocalAnswers
from kthena.pipeline.outlier import OutlierDetector
from kthena.pipeline.pipeline import Pipeline
from kthena.pipeline.route import Routing
from kthena.pipeline.schedule import Scheduling
from kthena.pipeline.settle import Observers, Settlement
from kthena.pods import PodEndpoint
from kthena.ratelimit.estimate import CharsEstimator
from kthena.ratelimit.service import RateLimits
from kthena.scheduler.framework import Timer
from kthena.sources.source import WatchStatus
from kthena.store import Datastore

log = Logger()


def _nobody(pod: PodEndpoint) -> None:
    pass


@implementer(IReconfigurable)
class DataPlane(Service):
    """
    @ivar observers: told of every request (L{Observers}: registered in one place).
    @ivar health: the one health rule (scheduling, gauges, views, readiness).
    @ivar readiness: whether the router takes traffic; C{draining} once stopping.
    @ivar inflight: the requests in flight (the drain waits for them).
    @ivar started_at: the router's start, epoch seconds.
    @ivar cut: how many requests the drain had to cut (once stopped).
    @ivar resource_watches: the Kubernetes source's watches as they stand (none without
        one), for the debug views and the metrics.
    """

    name = "data plane"

    def __init__(
        self,
        config: RouterConfig,
        reactor: IServerReactor,
        store: Datastore,
        upstream: IUpstream,
        limits: RateLimits,
        identifier: Identifier,
        fairness: Fairness,
        observers: Iterable[IRequestObserver] = (),
        timer: Timer | None = None,
        on_eject: Callable[[PodEndpoint], None] = _nobody,
        scheduler: IScheduler | None = None,
        estimator: ITokenEstimator | None = None,
    ) -> None:
        """
        @param limits: the rate limits (their service is in the tree before the plane).
        @param identifier: who calls (its key set's service is in the tree before the plane).
        @param fairness: the fairness queues (their service is in the tree before the plane).
        @param timer: times every scheduler plugin call (the plugin-duration histogram).
        @param on_eject: told of every pod outlier detection ejects.
        @param scheduler: a fixed scheduler (tests); built from the config otherwise.
        """
        self.reactor = reactor
        self.config = config
        self.store = store
        self.upstream = upstream
        self.started_at = int(time.time())
        self.observers = Observers(observers)
        self.outliers = OutlierDetector(config.upstream.outlier, reactor, on_eject)
        self.health = Health(store, reactor, self.outliers, None)
        self.readiness = Readiness(self.health, config)
        self.inflight = InFlight()
        self.cut: int | None = None
        self.resource_watches: Callable[[], Sequence[WatchStatus]] = tuple
        estimator = estimator or CharsEstimator()
        self.limits = limits
        self.fairness = fairness
        self.identification = Identification(identifier, config)
        self.scheduling = Scheduling(store, self.health, estimator, config, timer, scheduler)
        self.routing = Routing(store, config)
        self.dispatcher = Dispatcher(
            upstream, self.outliers, store, self.scheduling, self.observers, reactor, config
        )
        self.pipeline = Pipeline(
            reactor,
            config,
            self.identification,
            self.routing,
            Admission(limits, fairness),
            self.scheduling,
            self.dispatcher,
            self.observers,
            Settlement(reactor, self.observers),
            self.readiness,
            LocalAnswers(store, self.readiness, self.started_at),
            self.inflight,
            InternalErrors(reactor),
        )

    def scrape_pods(self) -> None:
        """Pods are scraped: their scrapes count in their health; not ready until the first
        round."""
        self.health.scrapes = self.config.pod_metrics
        self.readiness.scraped = False

    def reconfigure(self, config: RouterConfig) -> None:
        """A new generation, after the store took its resources."""
        self.config = config
        self.outliers.config = config.upstream.outlier
        if self.health.scrapes is not None:
            self.health.scrapes = config.pod_metrics
        parts = (
            self.readiness,
            self.identification,
            self.routing,
            self.scheduling,
            self.dispatcher,
        )
        for part in (*parts, self.pipeline):
            part.reconfigure(config)
        for observer in self.observers.observers:
            if IReconfigurable.providedBy(observer):
                observer.reconfigure(config)

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return Deferred.fromCoroutine(self._drain())

    async def _drain(self) -> None:
        self.readiness.draining = True
        self.cut = cut = await self.inflight.drain(self.reactor, self.config.drain_timeout)
        if cut:
            log.warn("drain timeout: cut {count} requests still in flight", count=cut)
