"""
The scrape loop: every pod's C{/metrics} each interval (and its C{/v1/models} now and
then, for the LoRA adapters it has loaded) into the pod's L{PodState}.

Scrapes run with bounded concurrency and a per-request timeout over a keep-alive pool of
their own (one connection per pod), never on the proxy's pool, with the kind of client
the proxy uses (C{upstream.client}; the lean one costs a third of C{Agent}'s CPU, which
a hundred pods scraped every second make felt). A pod that appears
in a new config generation is scraped at once rather than at the next round. A round
that outlasts the interval delays the next one instead of piling up.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, DeferredSemaphore, gatherResults
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse
from zope.interface import implementer

from kthena.config.router import PodMetricsConfig, RouterConfig
from kthena.config.traffic import UpstreamConfig
from kthena.engines.dialects import DIALECTS
from kthena.failures import describe
from kthena.interfaces import IReconfigurable, IServerReactor, IUpstream
from kthena.podclient import BodyCollector
from kthena.pods import PodEndpoint
from kthena.store import Datastore

log = Logger()

T = TypeVar("T")

_ACCEPT = Headers({b"accept": [b"text/plain;version=0.0.4"]})


@implementer(IReconfigurable)
class PodScraper(Service):
    """
    Stopping it stops the loop, cancels the scrapes in flight and closes its pool.

    @ivar rounds: completed scrape rounds (the router is ready after the first).
    @ivar round_hooks: called after every round (metrics, readiness).
    """

    name = "pod scraper"

    def __init__(
        self,
        reactor: IServerReactor,
        store: Datastore,
        settings: PodMetricsConfig,
        upstream: IUpstream,
    ) -> None:
        """
        @param upstream: the scraper's own client towards pods (of the kind the proxy
            uses; its settings are the scraper's: L{client_settings}).
        """
        self.reactor = reactor
        self.store = store
        self.rounds = 0
        self.round_hooks: list[Callable[[], None]] = []
        self.upstream = upstream
        self._loop: LoopingCall | None = None
        self._requests: set[Deferred[Any]] = set()
        self._known = set(store.pods)
        self._settings(settings)

    def _settings(self, settings: PodMetricsConfig) -> None:
        self.interval = settings.interval
        self.timeout = settings.timeout
        self.upstream.configure(client_settings(settings))
        self.models_every = max(1, round(settings.models_interval / settings.interval))
        self._semaphore = DeferredSemaphore(settings.concurrency)

    def reconfigure(self, config: RouterConfig) -> None:
        """New settings apply from the next round; pods new to the store are scraped now."""
        interval = self.interval
        self._settings(config.pod_metrics)
        if self._loop is not None and self._loop.running and self.interval != interval:
            self._loop.stop()
            self._start_loop(now=False)
        known, self._known = self._known, set(self.store.pods)
        if self.running:
            self.scrape([p for key, p in self.store.pods.items() if key not in known])

    def startService(self) -> None:
        super().startService()
        self._start_loop(now=True)

    def _start_loop(self, now: bool) -> None:
        self._loop = LoopingCall(self.scrape_round)
        self._loop.clock = self.reactor
        self._loop.start(self.interval, now=now).addErrback(
            lambda f: log.failure("the scrape loop stopped", f)
        )

    def stopService(self) -> Deferred[None]:
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        for request in list(self._requests):
            request.cancel()
        d: Deferred[None] = self.upstream.close()
        return d

    def scrape_round(self) -> Deferred[None]:
        """Scrape every pod once; fires when all are done (each failure is recorded)."""
        with_models = self.rounds % self.models_every == 0
        d = self.scrape(list(self.store.pods.values()), with_models)

        def done(_: object) -> None:
            self.rounds += 1
            for hook in self.round_hooks:
                hook()

        d.addCallback(done)
        return d

    def scrape(self, pods: Iterable[PodEndpoint], with_models: bool = True) -> Deferred[None]:
        """Scrape C{pods} now (new pods are, when they appear)."""
        work = [self._semaphore.run(self._one, pod, with_models) for pod in pods]
        d: Deferred[None] = gatherResults(work, consumeErrors=True).addCallback(lambda _: None)
        return d

    async def _one(self, pod: PodEndpoint, with_models: bool) -> None:
        dialect = DIALECTS.get(pod.engine)
        if dialect is None:
            pod.state.failed(f"no dialect for engine {pod.engine}")
            return
        finished = pod.state.finished
        try:
            text = await self._get(pod, b"/metrics")
            snapshot = dialect.parse(text.decode("utf-8", "replace"))
            if with_models:
                pod.state.models, pod.state.loras = _models(await self._get(pod, b"/v1/models"))
        except CancelledError:
            if not self.running:  # stopped: not the pod's failure
                return
            raise
        except Exception as e:
            why = describe(e)
            if pod.state.consecutive_failures == 0:
                log.warn("scraping pod {pod} failed: {why}", pod=pod.key, why=why)
            pod.state.failed(why)
            return
        if pod.state.consecutive_failures:
            log.info("pod {pod} answers its scrapes again", pod=pod.key)
        pod.state.update(snapshot, self.reactor.seconds(), finished)

    async def _get(self, pod: PodEndpoint, path: bytes) -> bytes:
        sent = self.upstream.request(pod, "http", b"GET", path, _ACCEPT, None)
        response: IResponse = await self._tracked(sent)
        collector = BodyCollector(MAX_BODY)
        response.deliverBody(collector)
        body: bytes = await self._tracked(collector.done)
        if response.code != 200:
            raise ValueError(f"{path.decode()} answered {response.code}")
        return body

    def _tracked(self, d: Deferred[T]) -> Deferred[T]:
        """C{d} with the scrape timeout, cancelled if the scraper stops first."""
        d.addTimeout(self.timeout, self.reactor)
        self._requests.add(d)
        d.addBoth(self._untrack, d)
        return d

    def _untrack(self, result: T, d: Deferred[Any]) -> T:
        self._requests.discard(d)
        return result


def client_settings(settings: PodMetricsConfig) -> UpstreamConfig:
    """
    The scraper's client: one connection per pod, kept idle for two intervals (so that
    each round reuses it), connecting within the scrape timeout.
    """
    return UpstreamConfig(
        connect_timeout=settings.timeout,
        max_connections_per_pod=1,
        pool_idle_timeout=2 * settings.interval,
    )


MAX_BODY = 8 * 1024 * 1024
"""A pod's C{/metrics} or C{/v1/models} larger than this is refused."""


def _models(body: bytes) -> tuple[frozenset[str], frozenset[str]]:
    """Every model id a pod lists, and those that are adapters (with a C{parent})."""
    listing = json.loads(body)
    data = listing.get("data", []) if isinstance(listing, dict) else []
    models = frozenset(
        m["id"] for m in data if isinstance(m, dict) and isinstance(m.get("id"), str)
    )
    loras = frozenset(
        m["id"] for m in data if isinstance(m, dict) and m.get("parent") and m.get("id") in models
    )
    return models, loras
