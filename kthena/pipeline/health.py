"""
One health rule, used by scheduling, the gauges, the debug views and readiness alike.

A pod is healthy when it may take traffic: it serves (Running, Ready, addressed, not
being deleted), its scrapes say it is up (when pods are scraped: fewer than
C{podMetrics.unhealthyAfter} failures in a row, the last success at most
C{podMetrics.staleAfter} old), and outlier detection has not ejected it.

A model server is C{healthy} when every pod it selects is, C{degraded} when at least one
is (for a prefill/decode server: at least one prefill and one decode pod), else
C{unhealthy}. A model is servable when one of its routes' target servers has a healthy
pod; the router is ready (C{/readyz}) when every model is (C{readiness: allModels}, the
default) or any is (C{anyModel}).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from twisted.internet.interfaces import IReactorTime

from kthena.config.resources import GatewayListener, ModelServer
from kthena.config.router import PodMetricsConfig, RouterConfig
from kthena.config.traffic import OutlierConfig
from kthena.engines.state import PodState
from kthena.pipeline.outlier import OutlierDetector
from kthena.pods import OutlierState, PodEndpoint
from kthena.store import Datastore


@dataclass(frozen=True, slots=True)
class ServerHealth:
    """
    @ivar selected: pods the server's labels select, serving or not.
    @ivar pods: those that serve (Running, Ready, not deleting).
    @ivar healthy: those that are healthy.
    """

    selected: int
    pods: Sequence[PodEndpoint]
    healthy: Sequence[PodEndpoint]
    status: str


KEPT = 64
"""Pod sets whose verdicts are kept (all dropped past this)."""


@dataclass(frozen=True, slots=True)
class _Verdict:
    """
    Which pods of a set were healthy, and until when that stands: a pass over a hundred
    pods costs a hundred microseconds, and it would run for every request.

    It stands until a pod's scrape goes stale or its ejection ends (L{until}), a pod is
    ejected (L{OutlierState.epoch}), the settings change, and, when every pod was
    healthy, a write that can make one unhealthy (L{PodState.setbacks}: their scrapes do
    not count); when some were not, any write to a pod's state (L{PodState.generation}).
    """

    healthy: tuple[PodEndpoint, ...]
    until: float
    whole: bool
    epoch: int
    ejections: int
    scrapes: PodMetricsConfig | None
    outliers: OutlierConfig

    @classmethod
    def of(
        cls, pods: Sequence[PodEndpoint], healthy: tuple[PodEndpoint, ...], health: Health
    ) -> _Verdict:
        until = math.inf
        scrapes = health.scrapes
        for p in pods:
            scraped, ejected = p.state.scraped_at, p.outlier.ejected_until
            if scrapes is not None and scraped is not None:
                until = min(until, scraped + scrapes.stale_after)
            if ejected is not None:
                until = min(until, ejected)
        whole = len(healthy) == len(pods)
        epoch = PodState.setbacks if whole else PodState.generation
        return cls(
            healthy, until, whole, epoch, OutlierState.epoch, scrapes, health.outliers.config
        )

    def stands(self, now: float, health: Health) -> bool:
        return (
            now < self.until
            and self.epoch == (PodState.setbacks if self.whole else PodState.generation)
            and self.ejections == OutlierState.epoch
            and self.scrapes is health.scrapes
            and self.outliers is health.outliers.config
        )


class Health:
    """
    @ivar scrapes: the pod-metrics settings when pods are scraped (their health then
        counts), else C{None}.
    """

    def __init__(
        self,
        store: Datastore,
        clock: IReactorTime,
        outliers: OutlierDetector,
        scrapes: PodMetricsConfig | None,
    ) -> None:
        self.store = store
        self.clock = clock
        self.outliers = outliers
        self.scrapes = scrapes
        self._kept: dict[tuple[PodEndpoint, ...], _Verdict] = {}

    def pod(self, pod: PodEndpoint, now: float | None = None) -> bool:
        """Whether a serving pod is healthy (C{now}: the reactor time, when known)."""
        scrapes = self.scrapes
        if scrapes is not None and not pod.state.healthy(
            self.clock.seconds() if now is None else now,
            scrapes.unhealthy_after,
            scrapes.stale_after,
        ):
            return False
        return not self.outliers.ejected(pod)

    def healthy(self, pods: Sequence[PodEndpoint]) -> list[PodEndpoint]:
        """Those of C{pods} that are healthy now (a verdict kept while it stands)."""
        now = self.clock.seconds()
        key = tuple(pods)
        kept = self._kept.get(key)
        if kept is None or not kept.stands(now, self):
            if len(self._kept) >= KEPT:
                self._kept.clear()
            healthy = tuple(p for p in key if self.pod(p, now))
            kept = self._kept[key] = _Verdict.of(key, healthy, self)
        return list(kept.healthy)  # the caller's own list

    def server(self, server: ModelServer) -> ServerHealth:
        pods = self.store.server_pods(server)
        healthy = self.healthy(pods)
        selected = sum(1 for p in self.store.resources.pods if server.selects(p))
        if server.pd_group is not None:
            roles = {server.pd_role(p.pod) for p in healthy}
            usable = {"prefill", "decode"} <= roles
        else:
            usable = bool(healthy)
        serving = len({p.pod.meta.key for p in pods})  # a pool's pod may have several ports
        if not usable:
            status = "unhealthy"
        elif len(healthy) == len(pods) and serving == selected:
            status = "healthy"
        else:
            status = "degraded"
        return ServerHealth(selected, pods, healthy, status)

    def models_without_healthy_pods(self, via: GatewayListener | None = None) -> list[str]:
        """Every model name (base or adapter) no route serving C{via}'s requests can send
        to a healthy pod."""
        store = self.store
        servers: dict[str, bool] = {}
        models: dict[str, bool] = {}
        for name, _, table_routes in store.route_table():
            routes = [r for r in table_routes if r.attaches(via)]
            if name in models or not routes:  # a modelName shadows adapter routes
                continue
            ok = False
            for route in routes:
                for server in store.route_servers(route):
                    key = server.meta.key
                    if key not in servers:
                        servers[key] = bool(self.healthy(store.server_pods(server)))
                    ok = ok or servers[key]
            models[name] = ok
        return [name for name, ok in models.items() if not ok]


class Readiness:
    """
    Whether the router takes traffic (C{/readyz}), by the health rule and the config's
    C{readiness}: not while draining, not before the first scrape round when pods are
    scraped, and not while some model (C{allModels}) or every model (C{anyModel}) has
    no healthy pod.

    @ivar draining: set on shutdown; new requests are refused with 503.
    @ivar scraped: the first scrape round is done (or pods are not scraped).
    @ivar listed: the resources a Kubernetes source reads were listed once (or there is
        no such source).
    @ivar via: the Gateway listener requests come through (the config's C{gateway}):
        only the models of routes serving it count.
    """

    def __init__(self, health: Health, config: RouterConfig) -> None:
        self.health = health
        self.rule = config.readiness
        self.via = config.gateway
        self.draining = False
        self.scraped = True
        self.listed = True

    def reconfigure(self, config: RouterConfig) -> None:
        self.rule = config.readiness
        self.via = config.gateway

    def check(self) -> tuple[bool, str, list[str]]:
        """Whether ready, why, and the models no healthy pod serves."""
        if self.draining:
            return False, "draining", []
        if not self.listed:
            return False, "not ready: the Kubernetes resources are not listed yet", []
        if not self.scraped:
            return False, "not ready: the first scrape of the pods is not done", []
        without = self.health.models_without_healthy_pods(self.via)
        if without and (
            self.rule == "allModels" or len(without) == len(self.health.store.model_names(self.via))
        ):
            shown = ", ".join(without[:10]) + (
                f" and {len(without) - 10} more" if len(without) > 10 else ""
            )
            return False, f"not ready: no healthy pod serves {shown}", without
        return True, "ready", without
