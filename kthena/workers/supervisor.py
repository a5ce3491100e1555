"""
The parent of C{--workers N}: starts N router processes on the shared socket, restarts
each one that ends while it runs, passes signals on, and stops them all with a drain.

A worker is C{python -m twisted kthena-router --config FILE}, in a process group of its
own (L{OWN_GROUP}), with C{KTHENA_WORKER} in its environment (L{kthena.workers.spec}),
the listening socket as descriptor 3, its log on
its standard error, which the parent reads into its own (L{kthena.workers.logs}), and
C{NOTIFY_SOCKET} naming a datagram socket of the parent's, on which the worker's own
systemd notifier says when it is ready, reloading or stopping (L{kthena.workers.notify}).

A worker that ends while the parent runs is started again after a pause that doubles
with each quick failure (from L{RESTART_DELAY} up to L{MAX_RESTART_DELAY}; back to the
first after a worker ran L{STABLE_AFTER} seconds), and counted in
C{kthena_router_worker_restarts_total}. Stopping the parent closes its copy of the
listening socket first (so that, once every worker has closed its own, new connections
are refused rather than queued with nobody to accept them), then sends each worker
SIGTERM (each drains as a single router does) and waits for all; past the config's
C{drainTimeout} and a grace of L{KILL_GRACE}, what is left gets SIGKILL.

Each worker has a watchdog, as systemd gives the router one: its notifier says
C{WATCHDOG=1} every half L{WORKER_WATCHDOG} (C{$WATCHDOG_USEC}, the parent's own when
systemd set one) from a timer on its reactor; one that is ready and silent for longer is
killed (and so started again), as systemd would kill a single router.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge
from twisted.application.service import Service
from twisted.internet import tcp
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IDelayedCall, IProcessTransport
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from kthena.interfaces import IServerReactor
from kthena.workers.logs import WorkerLog
from kthena.workers.merge import Family, Merger
from kthena.workers.sockets import bind_shared
from kthena.workers.spec import ENVIRONMENT, INHERITED_FD, WorkerSpec

log = Logger()

RESTART_DELAY = 0.5
MAX_RESTART_DELAY = 30.0
STABLE_AFTER = 10.0
KILL_GRACE = 10.0
OWN_GROUP = (
    "import os, sys; os.setpgrp(); os.execv(sys.executable, [sys.executable, *sys.argv[1:]])"
)
"""Run in a process group of its own, then the worker: a terminal's Ctrl-C (SIGINT to the
foreground group) reaches the parent only, which stops the workers with their drain, in
order, rather than every process at once (a worker ending first would look like a crash)."""

WORKER_WATCHDOG = 30.0
"""A worker that says nothing for this long (seconds) while it serves is killed and started
again: its reactor is wedged, and it would keep its share of the connections."""

DROPPED_ENVIRONMENT = (
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
)
"""What systemd told the parent and no worker must take as its own (its sockets, its
watchdog)."""


@dataclass(slots=True)
class Worker:
    """
    One worker's slot: the process in it changes with each restart.

    @ivar state: C{starting}, C{ready}, C{reloading}, C{stopping} or C{exited}.
    @ivar generation: how many processes this slot started (a scrape answered by an
        earlier one is not kept).
    @ivar last: its last scraped exposition (what it has counted so far).
    @ivar pinged: when it last said C{WATCHDOG=1} (or became ready).
    """

    index: int
    admin: str
    notify: str
    process: IProcessTransport | None = None
    pid: int | None = None
    state: str = "exited"
    started: float = 0.0
    restarts: int = 0
    generation: int = 0
    failures: int = 0
    last: list[Family] = field(default_factory=list)
    ended: Deferred[None] | None = None
    pinged: float = 0.0

    def view(self) -> dict[str, object]:
        return {
            "worker": self.index,
            "pid": self.pid,
            "state": self.state,
            "started": self.started,
            "restarts": self.restarts,
        }


class _WorkerProtocol(ProcessProtocol):
    def __init__(self, log: WorkerLog, ended: Callable[[Failure], None]) -> None:
        self.log = log
        self._ended = ended

    def errReceived(self, data: bytes) -> None:
        self.log.received(data)

    def processEnded(self, reason: Failure) -> None:
        self.log.ended()
        self._ended(reason)


def _how(reason: Failure) -> str:
    value = reason.value
    signum = getattr(value, "signal", None)
    if signum:
        return f"killed by {signal.Signals(signum).name}"
    return f"exit status {getattr(value, 'exitCode', '?')}"


class WorkerMetrics:
    """The parent's own families, added to the merged exposition."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.running = Gauge(
            "kthena_router_workers",
            "Worker processes running under the parent (--workers)",
            registry=registry,
        )
        self.restarts = Counter(
            "kthena_router_worker_restarts",
            "Worker processes started again after one ended (--workers)",
            ["worker"],
            registry=registry,
        )


class Supervisor(Service):
    """
    N workers on the shared socket (see the module docstring).

    @param notified: called with a worker after its state changed.
    @param bind: binds the shared socket (L{bind_shared}; tests give a fake).
    """

    name = "workers"

    def __init__(
        self,
        reactor: IServerReactor,
        listen: str,
        config_path: str,
        workers: list[Worker],
        metrics: WorkerMetrics,
        drain_timeout: float,
        notified: Callable[[Worker], None] = lambda worker: None,
        environ: Mapping[str, str] = os.environ,
        bind: Callable[[IServerReactor, str], tcp.Port] = bind_shared,
        watchdog: float = WORKER_WATCHDOG,
    ) -> None:
        self.reactor = reactor
        self.listen = listen
        self.config_path = config_path
        self.workers = workers
        self.metrics = metrics
        self.drain_timeout = drain_timeout
        self.notified = notified
        self.environ = environ
        self.bind = bind
        self.watchdog = watchdog
        self._watch: LoopingCall | None = None
        self.merger = Merger()
        self.port: tcp.Port | None = None
        self._restarts: dict[int, IDelayedCall] = {}
        for worker in workers:
            metrics.restarts.labels(str(worker.index))

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        self._bind()

    def _bind(self) -> None:
        if self.port is None:
            self.port = self.bind(self.reactor, self.listen)
            log.info(
                "workers share {listen} ({address})",
                listen=self.listen,
                address=self.port.getHost(),
            )

    def startService(self) -> None:
        super().startService()
        self._bind()
        for worker in self.workers:
            self.spawn(worker)
        self._watch = LoopingCall(self._check_watchdogs)
        self._watch.clock = self.reactor
        self._watch.start(self.watchdog / 4, now=False)

    def pinged(self, worker: Worker) -> None:
        """C{worker} said C{WATCHDOG=1} (or became ready)."""
        worker.pinged = self.reactor.seconds()

    def _check_watchdogs(self) -> None:
        now = self.reactor.seconds()
        for worker in self.live():
            silent = now - worker.pinged
            if worker.state in ("ready", "reloading") and silent > self.watchdog:
                log.error(
                    "worker {index} (pid {pid}) said nothing for {silent:.0f} s: SIGKILL",
                    index=worker.index,
                    pid=worker.pid,
                    silent=silent,
                )
                assert worker.process is not None
                worker.state = "stopping"  # once: it ends, and is started again, at once
                worker.process.signalProcess("KILL")

    def spawn(self, worker: Worker) -> None:
        """Start a process in C{worker}'s slot."""
        assert self.port is not None
        self._restarts.pop(worker.index, None)
        if os.path.exists(worker.admin):  # the socket file a killed process left behind
            os.unlink(worker.admin)
        spec = WorkerSpec(worker.index, INHERITED_FD, self.port.addressFamily, worker.admin)
        env = {k: v for k, v in self.environ.items() if k not in DROPPED_ENVIRONMENT}
        env[ENVIRONMENT] = spec.encode()
        env["NOTIFY_SOCKET"] = worker.notify
        env["WATCHDOG_USEC"] = str(int(self.watchdog * 1_000_000))
        argv = [sys.executable, "-c", OWN_GROUP, "-m", "twisted", "--log-file", "+"]
        argv += ["--log-format", "json", "kthena-router", "--config", self.config_path]
        worker.generation += 1
        generation = worker.generation
        protocol = _WorkerProtocol(
            WorkerLog(worker.index), lambda reason: self._ended(worker, generation, reason)
        )
        worker.process = self.reactor.spawnProcess(  # type: ignore[attr-defined]
            protocol,
            sys.executable,
            argv,
            env=env,
            childFDs={0: 0, 1: 1, 2: "r", INHERITED_FD: self.port.fileno()},
        )
        worker.pid = worker.process.pid
        worker.state = "starting"
        worker.started = self.reactor.seconds()
        worker.ended = Deferred()
        self.metrics.running.inc()
        log.info("worker {index} started (pid {pid})", index=worker.index, pid=worker.pid)
        self.notified(worker)

    def _ended(self, worker: Worker, generation: int, reason: Failure) -> None:
        ran = self.reactor.seconds() - worker.started
        worker.process = None
        worker.state = "exited"
        self.metrics.running.dec()
        self.merger.retire(worker.last)
        worker.last = []
        ended, worker.ended = worker.ended, None
        self.notified(worker)
        if ended is not None:
            ended.callback(None)
        if not self.running:
            log.info(
                "worker {index} (pid {pid}) ended: {how}",
                index=worker.index,
                pid=worker.pid,
                how=_how(reason),
            )
            return
        worker.failures = 0 if ran >= STABLE_AFTER else worker.failures + 1
        delay = min(MAX_RESTART_DELAY, RESTART_DELAY * 2 ** max(0, worker.failures - 1))
        log.error(
            "worker {index} (pid {pid}) ended: {how}; starting it again in {delay} s",
            index=worker.index,
            pid=worker.pid,
            how=_how(reason),
            delay=delay,
        )
        self._restarts[worker.index] = self.reactor.callLater(delay, self._restart, worker)

    def _restart(self, worker: Worker) -> None:
        worker.restarts += 1
        self.metrics.restarts.labels(str(worker.index)).inc()
        self.spawn(worker)

    def live(self) -> list[Worker]:
        return [worker for worker in self.workers if worker.process is not None]

    def signal_all(self, signum: int) -> None:
        """Send C{signum} to every running worker."""
        for worker in self.live():
            assert worker.process is not None
            try:
                worker.process.signalProcess(signal.Signals(signum).name[3:])
            except OSError as e:  # it ended meanwhile; processEnded follows
                log.warn("cannot signal worker {index}: {e}", index=worker.index, e=str(e))

    def stopService(self) -> Deferred[None]:
        super().stopService()
        if self._watch is not None and self._watch.running:
            self._watch.stop()
        self._watch = None
        for call in self._restarts.values():
            call.cancel()
        self._restarts.clear()
        port, self.port = self.port, None
        if port is not None:
            port.stopListening()  # the parent's copy; workers keep accepting on theirs
        waiting = [worker.ended for worker in self.live() if worker.ended is not None]
        for worker in self.live():
            worker.state = "stopping"
        self.signal_all(signal.SIGTERM)
        kill = self.reactor.callLater(self.drain_timeout + KILL_GRACE, self._kill)

        def ended(result: object) -> None:
            if kill.active():
                kill.cancel()

        return DeferredList(waiting).addBoth(ended)

    def _kill(self) -> None:
        for worker in self.live():
            log.error("worker {index} did not stop: SIGKILL", index=worker.index)
        self.signal_all(signal.SIGKILL)
