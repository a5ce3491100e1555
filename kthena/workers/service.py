"""
The parent's service tree under C{--workers N} (see L{kthena.workers.supervisor}). Its
children start in this order and stop in reverse:

  1. simulators (the demo's in-process pods: once, here, rather than in every worker)
  2. notify sockets (each worker's readiness; they outlive the workers' C{STOPPING=1})
  3. admin (the config's admin listener(s): merged C{/metrics}, C{/debug} over workers)
  4. workers (the shared socket and the processes; stop: the socket closes, then every
     worker drains)
  5. signals: SIGHUP is checked (the config must load) and passed on to every worker,
     SIGUSR1 (reopen the access log) passed on
  6. systemd (C{READY=1} once every worker said it; C{RELOADING=1} then C{READY=1}
     around a SIGHUP until every worker reloaded)
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
from collections.abc import Callable

from prometheus_client import CollectorRegistry
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IDelayedCall,
    IListeningPort,
    IReactorFromThreads,
    IReactorTime,
)
from twisted.logger import Logger

from kthena.config.router import RouterConfig
from kthena.config.validate import ConfigError
from kthena.interfaces import IServerReactor
from kthena.lifecycle import SequentialMultiService, SignalService
from kthena.listening import ListeningService
from kthena.observability.admin import AdminRoot, plan_listeners
from kthena.observability.debug.access import DebugAccess
from kthena.observability.debug.app import DebugGate
from kthena.service import load
from kthena.sim.embedded import Simulators
from kthena.systemd import Systemd, SystemdNotifier
from kthena.webutil import QuietSite
from kthena.workers.admin import MergedMetrics, WorkerAsker, WorkersDebug
from kthena.workers.notify import NotifyProtocol
from kthena.workers.supervisor import WORKER_WATCHDOG, Supervisor, Worker, WorkerMetrics

log = Logger()

RELOAD_WAIT = 30.0
"""The longest the parent waits for every worker to say it reloaded before it tells
systemd it is ready again all the same."""


class NotifySockets(Service):
    """Each worker's notify socket, bound before the first worker starts."""

    def __init__(
        self,
        reactor: IServerReactor,
        workers: list[Worker],
        changed: Callable[[Worker], None],
        pinged: Callable[[Worker], None],
    ) -> None:
        self.reactor = reactor
        self.workers = workers
        self.changed = changed
        self.pinged = pinged
        self.ports: list[IListeningPort] = []

    def startService(self) -> None:
        super().startService()
        for worker in self.workers:
            protocol = NotifyProtocol(worker, self.changed, self.pinged)
            self.ports.append(self.reactor.listenUNIXDatagram(worker.notify, protocol))  # type: ignore[attr-defined]

    def stopService(self) -> None:
        super().stopService()
        for port in self.ports:
            port.stopListening()
        self.ports = []


class WorkersService(SequentialMultiService):
    """
    The parent of N workers (see the module docstring).

    @ivar runtime: the private directory of the workers' admin and notify sockets (made
        on start, removed on stop).
    """

    def __init__(
        self,
        config: RouterConfig,
        config_path: str,
        count: int,
        reactor: IServerReactor,
        systemd: Systemd | None = None,
        install_signal_handlers: bool = True,
    ) -> None:
        super().__init__()
        self.config = config
        self.config_path = config_path
        self.reactor = reactor
        self.runtime = ""
        self.workers = [Worker(i, "", "") for i in range(count)]
        self.registry = CollectorRegistry()
        self.supervisor = Supervisor(
            reactor,
            config.listen,
            config_path,
            self.workers,
            WorkerMetrics(self.registry),
            config.drain_timeout,
            self._changed,
            # systemd's timeout for the parent, when it set one, is the workers' too
            watchdog=2 * systemd.watchdog if systemd and systemd.watchdog else WORKER_WATCHDOG,
        )
        self.asker = WorkerAsker(reactor, self.workers)
        self.systemd = SystemdNotifier(reactor, systemd, self._all_ready, self._status)
        self._reloading: set[int] = set()
        self._reload_wait: IDelayedCall | None = None
        Simulators(config.simulators, reactor).setServiceParent(self)
        sockets = NotifySockets(reactor, self.workers, self._changed, self.supervisor.pinged)
        sockets.setServiceParent(self)
        self._admin()
        self.supervisor.setServiceParent(self)
        if install_signal_handlers:
            signals = IReactorFromThreads(reactor)
            SignalService(signals, signal.SIGHUP, self.reload).setServiceParent(self)
            reopen = lambda: self.supervisor.signal_all(signal.SIGUSR1)  # noqa: E731
            SignalService(signals, signal.SIGUSR1, reopen).setServiceParent(self)
        self.systemd.setServiceParent(self)

    def _admin(self) -> None:
        obs = self.config.observability
        metrics = MergedMetrics(
            self.asker,
            self.supervisor.live,
            self.supervisor.merger,
            self.registry,
            obs.metrics.path,
        )
        debug = DebugGate(WorkersDebug(self.asker, self.workers), DebugAccess(obs.debug))
        for plan in plan_listeners(self.config):
            root = AdminRoot(
                metrics if plan.metrics else None,
                obs.metrics.path,
                debug if plan.debug else None,
            )
            ListeningService(
                self.reactor, plan.endpoint, QuietSite(root, self.reactor)
            ).setServiceParent(self)

    def _all_ready(self) -> bool:
        return all(worker.state == "ready" for worker in self.workers)

    def _status(self) -> str:
        ready = sum(worker.state == "ready" for worker in self.workers)
        return f"{ready} of {len(self.workers)} workers ready"

    def _changed(self, worker: Worker) -> None:
        if worker.state in ("ready", "exited"):
            self._reloading.discard(worker.index)
        self.systemd.check()
        if self._reload_wait is not None and not self._reloading:
            self._reloaded()

    def reload(self) -> None:
        """SIGHUP: the config must load here before every worker is told to reload."""
        try:
            load(self.config_path)
        except ConfigError as e:
            log.error(
                "reload (SIGHUP) refused, the workers keep their config: {error}", error=str(e)
            )
            return
        self.systemd.reloading()
        self._reloading = {worker.index for worker in self.supervisor.live()}
        clock: IReactorTime = self.reactor
        if self._reload_wait is None:
            self._reload_wait = clock.callLater(RELOAD_WAIT, self._reloaded)
        self.supervisor.signal_all(signal.SIGHUP)

    def _reloaded(self) -> None:
        wait, self._reload_wait = self._reload_wait, None
        if wait is not None and wait.active():
            wait.cancel()
        if self._reloading:
            log.warn("workers {left} did not say they reloaded", left=sorted(self._reloading))
        self._reloading = set()
        self.systemd.reloaded()

    def startService(self) -> None:
        # Made here, not at construction: twistd --uid drops privileges between the two,
        # and the workers (as the dropped user) bind their sockets in it.
        self.runtime = tempfile.mkdtemp(prefix="kthena-workers-")
        for worker in self.workers:
            worker.admin = os.path.join(self.runtime, f"w{worker.index}.admin")
            worker.notify = os.path.join(self.runtime, f"w{worker.index}.notify")
        super().startService()

    def stopService(self) -> Deferred[None]:
        d = super().stopService()
        self.asker.pool.closeCachedConnections()
        return d.addBoth(self._cleanup)

    def _cleanup(self, result: None) -> None:
        shutil.rmtree(self.runtime, ignore_errors=True)
        return result
