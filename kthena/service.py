"""
The embeddable router: L{makeRouterService} returns the service tree that runs one router,
so that embedding kthena-router in another Twisted application is one call.

The tree is the lifecycle. Its children start in this order and stop in reverse, one
after another (L{SequentialMultiService}):

  1. simulators (the demo's in-process pods: up first, down last)
  2. resources (the datastore: the config's routes, servers and pods), and the Kubernetes
     source when the config has a C{kubernetes} section (its objects join the config's;
     stop: the watches end)
  3. pod scraper (each pod's metrics; stop: loop, scrapes in flight and pool end)
  4. upstream (the client towards pods; stop: pooled connections close)
  5. admin (C{/metrics}, C{/debug})
  6. access log (stop: the buffer is flushed), and its SIGUSR1 reopener
  7. jwks (the identity section's key set: read before requests come; stop: the refresh
     loop and a read in flight end, waiting requests get their 401)
  8. rate limits (the tokenizers, the local buckets, a connection per Redis)
  9. fairness (the queues; stop: what is still queued after the drain gets 503)
 10. data plane (the request pipeline; stop: the drain)
 11. proxy listener (stop: the port closes first of all)
 12. gateway ports (C{gatewayAPI}: a port for the listeners of Gateways; stop: they close
     too)
 13. reloader (SIGHUP, file changes)
 14. systemd (READY=1 once listening and the first scrape round is done; stop: STOPPING=1,
     before the proxy's port closes)

A reload is a protocol of the tree: the new config is loaded and validated whole, then
each reconfigurable child takes it in that order (the store first, so that the scraper
sees the new pods and the data plane the new routes); what cannot change while running
is logged as needing a restart. systemd is told RELOADING=1 before and READY=1 after.
A change in the cluster goes the same way, with the config as loaded and the cluster's
objects merged into its resources (L{kthena.sources.merge}); no RELOADING=1 for it.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from prometheus_client import CollectorRegistry
from twisted.application.service import IService, Service
from twisted.internet.interfaces import IReactorFromThreads, IStreamServerEndpoint
from twisted.logger import Logger
from zope.interface import implementer

from kthena.config.router import RouterConfig, load_config
from kthena.config.traffic import UpstreamConfig
from kthena.engines.scraper import PodScraper, client_settings
from kthena.fairness.service import FairQueues
from kthena.http.client import LeanUpstream
from kthena.identity.identity import build_identity
from kthena.interfaces import IReconfigurable, IScheduler, IServerReactor, IUpstream
from kthena.lifecycle import SequentialMultiService, SignalService, restart_needed
from kthena.observability.accesslog import access_log_for
from kthena.observability.admin import AdminService, listener_info
from kthena.observability.debug.common import ListenerInfo
from kthena.observability.decisions import DecisionRing
from kthena.observability.metrics import RouterMetrics
from kthena.pipeline.plane import DataPlane
from kthena.proxy.gateways import GatewayPorts, endpoint_for
from kthena.proxy.site import ProxyListener, proxy_site
from kthena.proxy.upstream import Upstream
from kthena.ratelimit.service import RateLimits
from kthena.reload import ConfigReloader
from kthena.scheduler.build import check_scheduler
from kthena.sim.embedded import Simulators
from kthena.sources.merge import with_cluster
from kthena.sources.source import KubernetesSource
from kthena.store import Datastore
from kthena.systemd import Systemd, SystemdNotifier

log = Logger()


def load(path: str) -> RouterConfig:
    """
    Read and validate a router config whole: the file and every resource file it names,
    and the scheduler's plugins and their arguments.

    @raise kthena.config.validate.ConfigError: with the file, document and field.
    """
    config = load_config(path)
    check_scheduler(config.scheduler)
    return config


@implementer(IReconfigurable)
class ResourcesService(Service):
    """The datastore in the tree: a reload replaces its resources first of all."""

    name = "resources"

    def __init__(self, store: Datastore) -> None:
        self.store = store

    def reconfigure(self, config: RouterConfig) -> None:
        self.store.replace(config.resources)


class RouterService(SequentialMultiService):
    """
    One router (see the module docstring for its tree).

    @ivar plane: the data plane (the request pipeline and its parts).
    @ivar metrics: every metric family of the spec, on C{registry}.
    """

    def __init__(
        self,
        config: RouterConfig,
        reactor: IServerReactor,
        registry: CollectorRegistry | None = None,
        config_path: str | None = None,
        install_signal_handlers: bool = False,
        *,
        upstream: IUpstream | None = None,
        scheduler: IScheduler | None = None,
        systemd: Systemd | None = None,
        listen_endpoint: IStreamServerEndpoint | None = None,
        loader: Callable[[str], RouterConfig] = load,
    ) -> None:
        """
        @param upstream: the client towards pods (an L{Upstream} when omitted).
        @param scheduler: a fixed scheduler (tests); built from the config otherwise.
        @param systemd: the service manager to notify (a process of its own under systemd).
        @param listen_endpoint: where the proxy listens, when not at C{config.listen}'s
            endpoint (a socket inherited from a parent: C{--workers}).
        @param loader: reads the config file again on a reload.
        """
        super().__init__()
        check_scheduler(config.scheduler)
        self.config = config
        """The config in force: as loaded, with the cluster's objects among its resources."""
        self.loaded = config
        """The config as loaded from its file (or given)."""
        self.cluster: list[dict[str, Any]] = []
        """The Kubernetes objects last handed over by the source."""
        self._problems: set[str] = set()
        self.config_path = config_path
        self.reactor = reactor
        self.registry = registry if registry is not None else CollectorRegistry()
        signals = IReactorFromThreads(reactor) if install_signal_handlers else None
        self.store = Datastore()
        self.store.replace(config.resources)
        self.metrics = RouterMetrics(self.registry, reactor, config)
        self.decisions = DecisionRing()
        self.upstream = (
            upstream
            if upstream is not None
            else _upstream(reactor, config.upstream.client, config.upstream)
        )
        self.access_log = access_log_for(
            config.observability.access_log, self.registry, reactor, config.source
        )
        self.limits = RateLimits(reactor, config, self.metrics.backend_error)
        self.identifier, self.jwks = build_identity(config.identity, reactor)
        self.fairness = FairQueues(
            reactor,
            config,
            self.metrics.fairness_queue_size,
            self.metrics.fairness_queue_duration,
        )
        self.metrics.scrape_hooks.append(self.fairness.before_scrape)
        self.plane = self._data_plane(scheduler)
        pipeline = self.plane.pipeline
        site = proxy_site(reactor, config, pipeline)
        self.proxy = ProxyListener(reactor, config, site, listen_endpoint)
        self.gateway_ports = GatewayPorts(reactor, config, pipeline)
        self.admin = AdminService(
            reactor,
            config,
            self.registry,
            self.plane,
            self.decisions,
            self.metrics,
            self._proxy_listeners,
        )
        self.scraper: PodScraper | None = None
        if config.pod_metrics.enabled:
            scrapes = _upstream(
                reactor, config.upstream.client, client_settings(config.pod_metrics)
            )
            self.scraper = PodScraper(reactor, self.store, config.pod_metrics, scrapes)
            self.plane.scrape_pods()
            self.scraper.round_hooks.append(self._scraped)
        self.source = self._kubernetes_source(config)
        self.reloader = ConfigReloader(reactor, self, config_path, loader, signals)
        self.systemd = SystemdNotifier(reactor, systemd, self._serving, self._status)
        self._add(Simulators(config.simulators, reactor), ResourcesService(self.store))
        self._add(self.source)
        self._add(self.scraper, self.upstream, self.admin, self.access_log)
        if signals is not None:
            # SIGUSR1: reopen the file after logrotate renamed it (and with no access log,
            # a logrotate postrotate that sends it anyway must not kill the router).
            reopen = self._no_access_log if self.access_log is None else self.access_log.reopen
            self._add(SignalService(signals, signal.SIGUSR1, reopen))
        self._add(self.jwks, self.limits, self.fairness, self.plane, self.proxy)
        self._add(self.gateway_ports, self.reloader)
        self._add(self.systemd)

    def _kubernetes_source(self, config: RouterConfig) -> KubernetesSource | None:
        """The config's Kubernetes source, if any: the router is not ready until it listed."""
        if not config.kubernetes.enabled:
            return None
        source = KubernetesSource(
            self.reactor,
            config.kubernetes,
            self._cluster_changed,
            gateways=config.gateway_api.enabled,
        )
        self.plane.readiness.listed = False
        self.plane.resource_watches = source.status
        self.metrics.read_watches(source.status)
        return source

    @staticmethod
    def _no_access_log() -> None:
        log.info("SIGUSR1: the access log is off, nothing to reopen")

    def _data_plane(self, scheduler: IScheduler | None) -> DataPlane:
        """The pipeline, its observers registered here, in one place."""
        observers: list[Any] = [
            self.metrics,
            self.decisions,
            self.limits.limiter,
            self.fairness.observer,
        ]
        if self.access_log is not None:
            observers.append(self.access_log)
        plane = DataPlane(
            self.config,
            self.reactor,
            self.store,
            self.upstream,
            self.limits,
            self.identifier,
            self.fairness.fairness,
            observers,
            self.metrics.plugin_timer,
            self.metrics.ejected,
            scheduler,
        )
        self.metrics.read_gauges(lambda: len(plane.inflight), plane.scheduling.prefix_entries)
        return plane

    def _add(self, *children: object) -> None:
        for child in children:
            if child is not None:
                IService(child).setServiceParent(self)

    def _proxy_listeners(self) -> list[ListenerInfo]:
        """The proxy's and the Gateways' ports (those that could not open, with why)."""
        serves = ("/v1/*", "/healthz", "/readyz")
        gateways = self.gateway_ports
        interface = self.config.gateway_api.interface
        return [
            listener_info("proxy", self.proxy, serves),
            *(listener_info(f"gateway port {n}", p.service, serves)
              for n, p in gateways.ports.items()),
            *(ListenerInfo(f"gateway port {n}", endpoint_for(interface, n), serves, error=why)
              for n, why in gateways.failed.items()),
        ]  # fmt: skip

    def _scraped(self) -> None:
        """After each scrape round: ready (after the first), and the pod gauges."""
        self.plane.readiness.scraped = True
        self.metrics.observe_pods(self.plane)
        self.systemd.check()

    def _serving(self) -> bool:
        """Takes traffic: every listener listens and the first scrape round is done."""
        listeners = [self.proxy, *(service for _, service in self.admin.listeners)]
        return self.plane.readiness.scraped and all(s.port is not None for s in listeners)

    def _status(self) -> str:
        resources = self.config.resources
        return (
            f"generation {self.generation()}: {len(resources.routes)} routes, "
            f"{len(resources.servers)} servers, {len(resources.pods)} pods"
        )

    def startService(self) -> None:
        super().startService()
        self._log_started()

    def _log_started(self) -> None:
        """What the router serves and where, in a few lines, once it started."""
        log.info("kthena-router started, {status}", status=self._status())
        for info in self.admin.all_listeners():
            log.info(
                "{name}: {endpoint} at {host}:{port} serves {serves}",
                name=info.name,
                endpoint=info.endpoint,
                host=info.host,
                port=info.port,
                serves=", ".join(info.serves),
            )
        access = self.config.observability.access_log
        log.info(
            "access log: {where}",
            where=f"{access.output} ({access.format})" if access.enabled else "off",
        )

    def generation(self) -> int:
        return self.store.generation

    def reconfigure(self, config: RouterConfig) -> None:
        """A new config, validated whole: each reconfigurable child takes it, in order."""
        self.systemd.reloading()
        try:
            restart_needed("upstream.client", self.config.upstream.client, config.upstream.client)
            self.loaded = config
            self._take(config)
        finally:
            self.systemd.reloaded()

    def _take(self, loaded: RouterConfig) -> None:
        """The loaded config, with the cluster's objects when there is a source, to each
        reconfigurable child in order."""
        config = loaded
        if self.source is not None:
            resources, problems = with_cluster(loaded.resources, self.cluster)
            for problem in sorted(set(problems) - self._problems):  # once while it stands
                log.warn("{problem}", problem=problem)
            self._problems = set(problems)
            config = replace(loaded, resources=resources)
        for child in self:
            if IReconfigurable.providedBy(child):
                child.reconfigure(config)
        self.config = config

    def _cluster_changed(self, objects: list[dict[str, Any]]) -> None:
        """The Kubernetes source's objects changed (the first time: every kind is listed)."""
        self.cluster = objects
        self._take(self.loaded)
        self.plane.readiness.listed = True


def _upstream(reactor: IServerReactor, client: str, settings: UpstreamConfig) -> IUpstream:
    """A client towards pods of the kind C{upstream.client} names."""
    if client == "lean":
        return LeanUpstream(reactor, settings)
    return Upstream(reactor, settings)


def makeRouterService(
    config: RouterConfig,
    reactor: IServerReactor | None = None,
    registry: CollectorRegistry | None = None,
    *,
    config_path: str | None = None,
    install_signal_handlers: bool = False,
    systemd: Systemd | None = None,
    listen_endpoint: IStreamServerEndpoint | None = None,
    loader: Callable[[str], RouterConfig] = load,
) -> RouterService:
    """
    Build a router from a loaded config. To embed it, add the result to your
    application (C{setServiceParent}) or start it yourself.

    @param reactor: the reactor to run on (the global one when omitted).
    @param registry: the Prometheus registry its metrics go to (a new one when omitted).
    @param config_path: the file the config came from, to reload it on SIGHUP or change.
    @param install_signal_handlers: handle SIGHUP (reload) and SIGUSR1 (reopen the access
        log); for a process of its own.
    @param systemd: tell systemd the router's state (L{Systemd.from_environment}); for a
        process of its own.
    @param listen_endpoint: where the proxy listens instead of C{config.listen}'s endpoint.
    @param loader: reads and validates the config file on a reload (L{load} by default).
    """
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor  # type: ignore[assignment]
    assert reactor is not None
    return RouterService(
        config,
        reactor,
        registry,
        config_path,
        install_signal_handlers,
        systemd=systemd,
        listen_endpoint=listen_endpoint,
        loader=loader,
    )
