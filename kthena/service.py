"""
The embeddable router: L{makeRouterService} returns the L{MultiService} that runs one
router (its listeners, config reloads and, in demo mode, its simulated pods), so that
embedding kthena-router in another Twisted application is one call.
"""

from __future__ import annotations

import signal
from typing import Any

from prometheus_client import CollectorRegistry
from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from kthena.config.files import file_stamps
from kthena.config.router import RouterConfig, SimulatorSpec, load_config
from kthena.config.validate import ConfigError
from kthena.engines.scraper import PodScraper
from kthena.interfaces import IServerReactor
from kthena.listening import ListeningService
from kthena.observability.accesslog import ReopenOnSignal, access_log_for
from kthena.observability.admin import AdminService, listener_info
from kthena.observability.debug import ListenerInfo
from kthena.proxy.core import RouterCore
from kthena.proxy.resource import ProxyResource
from kthena.proxy.site import ProxySite
from kthena.sim.engine import EngineConfig
from kthena.sim.service import SimConfig, SimService

log = Logger()

_RESTART_ONLY = ("listen", "admin_listen", "debug_listen", "observability", "simulators")


class ConfigReloader(Service):
    """
    Reloads the config on SIGHUP and when any file it was read from changes; an invalid
    new config is reported and the running one kept.
    """

    def __init__(
        self,
        reactor: IServerReactor,
        router: RouterService,
        install_signal_handler: bool,
    ) -> None:
        self.reactor = reactor
        self.router = router
        self.install_signal_handler = install_signal_handler
        self._stamps = file_stamps(router.config.files)
        self._poll: LoopingCall | None = None
        self._previous_handler: Any = None

    def startService(self) -> None:
        super().startService()
        interval = self.router.config.reload_interval
        if self.router.config_path is not None and interval > 0:
            self._poll = LoopingCall(self._check_files)
            self._poll.clock = self.reactor
            self._poll.start(interval, now=False)
        if self.install_signal_handler:
            self._previous_handler = signal.signal(signal.SIGHUP, self._on_sighup)

    def stopService(self) -> None:
        super().stopService()
        if self._poll is not None and self._poll.running:
            self._poll.stop()
        if self.install_signal_handler:
            signal.signal(signal.SIGHUP, self._previous_handler or signal.SIG_DFL)

    def _on_sighup(self, signum: int, frame: object) -> None:
        self.reactor.callFromThread(self.reload, "SIGHUP")  # type: ignore[attr-defined]

    def _check_files(self) -> None:
        stamps = file_stamps(self.router.config.files)
        if stamps != self._stamps:
            self.reload("a config file changed")

    def reload(self, why: str) -> bool:
        """
        Load the config file again and apply it.

        @return: whether the new config was applied.
        """
        path = self.router.config_path
        if path is None:
            log.warn("reload ({why}) ignored: the config was not read from a file", why=why)
            return False
        old = self.router.config
        self._stamps = file_stamps(old.files)
        try:
            new = load_config(path)
        except ConfigError as e:
            log.error(
                "reload ({why}) failed; keeping generation {generation}: {error}",
                why=why,
                generation=self.router.core.store.generation,
                error=str(e),
            )
            return False
        self._stamps = file_stamps(new.files)
        changed = [k for k in _RESTART_ONLY if getattr(new, k) != getattr(old, k)]
        if changed:
            log.warn(
                "reload ({why}): {fields} changed and take effect at the next restart",
                why=why,
                fields=", ".join(changed),
            )
        self.router.apply(new)
        log.info(
            "reload ({why}) applied: generation {generation}, {routes} routes, "
            "{servers} servers, {pods} pods",
            why=why,
            generation=self.router.core.store.generation,
            routes=len(new.resources.routes),
            servers=len(new.resources.servers),
            pods=len(new.resources.pods),
        )
        return True


class RouterService(MultiService):
    """
    One router. Stopping it drains: the proxy port closes, requests in flight get up to
    C{drainTimeout} to finish, then whatever is left is cut and the pods' connections
    closed; simulated pods (demo) stop last.
    """

    def __init__(
        self,
        config: RouterConfig,
        reactor: IServerReactor,
        registry: CollectorRegistry | None = None,
        config_path: str | None = None,
        install_signal_handlers: bool = False,
    ) -> None:
        super().__init__()
        self.config = config
        self.config_path = config_path
        self.reactor = reactor
        self.registry = registry if registry is not None else CollectorRegistry()
        self.simulators = MultiService()
        self.simulators.setServiceParent(self)
        for spec in config.simulators:
            _simulator_service(spec, reactor).setServiceParent(self.simulators)
        self.core = RouterCore(reactor, config, registry=self.registry)
        self.scraper: PodScraper | None = None
        if config.pod_metrics.enabled:
            self._start_scraping(config)
        self.access_log = access_log_for(
            config.observability.access_log, self.core.registry, reactor, config.source
        )
        self.access_log_reopener: ReopenOnSignal | None = None
        if self.access_log is not None:
            self.access_log.setServiceParent(self)
            self.core.request_hooks.append(self.access_log.record)
            if install_signal_handlers:  # SIGUSR1: reopen the file after logrotate
                self.access_log_reopener = ReopenOnSignal(
                    reactor,  # type: ignore[arg-type]
                    self.access_log,
                    signal.SIGUSR1,
                )
                self.access_log_reopener.setServiceParent(self)
        site = ProxySite(
            ProxyResource(self.core),
            config.max_body_bytes,
            reactor,
            config.downstream,
            self.core.request_done,
        )
        self.proxy = ListeningService(reactor, config.listen, site)
        self.proxy.setServiceParent(self)
        self.reloader = ConfigReloader(reactor, self, install_signal_handlers)
        self.reloader.setServiceParent(self)
        # /metrics and /debug (observability.metrics / .debug, adminListen, debugListen).
        self.admin = AdminService(reactor, self.core, config, self._proxy_listeners)
        self.admin.setServiceParent(self)

    def _proxy_listeners(self) -> list[ListenerInfo]:
        return [listener_info("proxy", self.proxy, ("/v1/*", "/healthz", "/readyz"))]

    def _start_scraping(self, config: RouterConfig) -> None:
        """Pods' own metrics feed the scheduler; the router is ready after one round."""
        settings = config.pod_metrics
        self.scraper = PodScraper(
            self.reactor,
            self.core.store,
            interval=settings.interval,
            timeout=settings.timeout,
            concurrency=settings.concurrency,
            models_every=max(1, round(settings.models_interval / settings.interval)),
        )
        self.scraper.setServiceParent(self)
        self.core.scrape_pods()
        self.scraper.round_hooks.append(self._scraped)

    def _scraped(self) -> None:
        self.core.scraped = True
        self.core.pods_observed()

    def apply(self, config: RouterConfig) -> None:
        known = set(self.core.store.pods)
        self.core.apply(config)
        if self.scraper is not None:  # new pods are scraped now, not at the next round
            store = self.core.store
            self.scraper.scrape([p for key, p in store.pods.items() if key not in known])
        site = self.proxy.factory
        if isinstance(site, ProxySite):
            site.max_body_bytes = config.max_body_bytes
            site.downstream = config.downstream
        self.config = config

    def stopService(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        self.reloader.stopService()
        await _maybe(self.proxy.stopService())
        cut = await self.core.drain(self.config.drain_timeout)
        if cut:
            log.warn("drain timeout: cut {count} requests still in flight", count=cut)
        if self.access_log_reopener is not None:
            self.access_log_reopener.stopService()
        if self.access_log is not None:  # after the drain: its records are flushed too
            await _maybe(self.access_log.stopService())
        await _maybe(self.admin.stopService())
        Service.stopService(self)
        await _maybe(self.simulators.stopService())


async def _maybe(result: Deferred[Any] | None) -> None:
    if result is not None:
        await result


def _simulator_service(spec: SimulatorSpec, reactor: IServerReactor) -> Service:
    config = SimConfig(
        engine=spec.engine,
        model=spec.model,
        listen=spec.listen,
        engine_config=EngineConfig(
            max_num_seqs=spec.max_num_seqs,
            prefill_per_token=spec.prefill_per_token,
            itl=spec.itl,
        ),
        output_tokens=spec.output_tokens,
        loras={name: f"/models/{name}" for name in spec.loras},
    )
    return SimService(config, reactor)


def makeRouterService(
    config: RouterConfig,
    reactor: IServerReactor | None = None,
    registry: CollectorRegistry | None = None,
    *,
    config_path: str | None = None,
    install_signal_handlers: bool = False,
) -> RouterService:
    """
    Build a router from a loaded config. To embed it, add the result to your
    application (C{setServiceParent}) or start it yourself.

    @param reactor: the reactor to run on (the global one when omitted).
    @param registry: the Prometheus registry its metrics go to (a new one when omitted).
    @param config_path: the file the config came from, to reload it on SIGHUP or change.
    @param install_signal_handlers: handle SIGHUP (reload); for a process of its own.
    """
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor  # type: ignore[assignment]
    assert reactor is not None
    return RouterService(config, reactor, registry, config_path, install_signal_handlers)
