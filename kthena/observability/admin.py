"""
The admin listener: C{GET /metrics} (Prometheus) and C{/debug/*} (the debug app).

Listeners, from C{observability} in the router config:

  - the admin listener, at C{adminListen} or C{tcp:<metrics.port>} (9090): serves
    C{metrics.path} when metrics are enabled, and C{/debug} when debug is enabled on the
    same port; it exists when it serves either;
  - the debug listener, at C{debugListen} or C{tcp:<debug.port>}: only when debug is
    enabled on a port other than C{metrics.port}; serves C{/debug} only.

C{/metrics} answers anyone (Prometheus scrapes remotely); C{/debug} is guarded (see
L{kthena.observability.debug}). Both are read-only: other methods get 405.

A render runs on the reactor thread in slices of half a millisecond, with proxied
requests served between them (L{kthena.observability.render} says why and how; its
writer is ~5x faster than prometheus_client's and writes the same bytes). Renders run
one at a time; a few more scrapes may wait, past that a scrape is answered 503 at once;
a scrape whose client leaves stops rendering at the next slice. Renders are paced: after
one that took C seconds of CPU the next starts no sooner than C x (1 / MAX_RENDER_SHARE
- 1) later, which keeps scrapes to at most a quarter of the CPU however fast they come
(a scrape every 15 s is never delayed). The format follows the scraper's C{Accept}
header (Prometheus text 0.0.4 or OpenMetrics), gzip when accepted, and C{name[]=}
selects families, as prometheus_client's own handlers do. Collectors on the router's
registry are called on the reactor thread, between requests.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from time import perf_counter
from typing import cast

from prometheus_client import CollectorRegistry
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, DeferredLock, maybeDeferred
from twisted.internet.interfaces import IReactorThreads, IReactorTime
from twisted.internet.task import Cooperator, deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource, Resource
from twisted.web.server import NOT_DONE_YET
from zope.interface import implementer

from kthena.config.router import RouterConfig
from kthena.interfaces import IReconfigurable, IServerReactor
from kthena.lifecycle import restart_needed
from kthena.listening import ListeningService
from kthena.observability.debug.access import DebugAccess
from kthena.observability.debug.app import make_debug_resource
from kthena.observability.debug.common import DebugSources, ListenerInfo
from kthena.observability.decisions import DecisionRing
from kthena.observability.metrics import RouterMetrics
from kthena.observability.render import Render
from kthena.pipeline.plane import DataPlane
from kthena.webutil import READ_METHODS, QuietSite, client_gone, json_body, method_not_allowed

log = Logger()

MAX_WAITING_SCRAPES = 4
"""Scrapes rendering or waiting to render; one more is answered 503 at once."""

MAX_RENDER_SHARE = 0.25
"""The most of the CPU that back-to-back scrapes may take (see the module docstring)."""

MIN_PACING_DELAY = 0.005
"""Pauses shorter than this are not worth a timer: the render starts at once."""


SLICE_SECONDS = 0.0005
"""How long the reactor thread renders before it polls for I/O again."""

SLICE_PAUSE = 0.001
"""
The pause after each slice: a render takes a third of the CPU while it runs, so that
requests meet fewer slices and a router that shares its CPU is not scheduled as a busy
process (on a loaded machine that alone cost requests during a scrape a few ms).
"""

Runner = Callable[[Iterator[None]], "Deferred[Iterator[None]]"]
"""Takes a render's steps on the reactor thread; fires when the steps are done."""


def runner_for(reactor: object) -> Runner:
    """
    L{sliced} on C{reactor}; L{at_once} on a reactor without threads, which is a test's
    clock (every real reactor has threads), where timed calls wait for the test.
    """
    if not IReactorThreads.providedBy(reactor):
        return at_once
    return sliced(cast(IReactorTime, reactor))


def at_once(steps: Iterator[None]) -> Deferred[Iterator[None]]:
    """Takes all the steps now (what rendering in one go on the reactor thread is)."""

    def run() -> Iterator[None]:
        collections.deque(steps, maxlen=0)
        return steps

    return maybeDeferred(run)


def sliced(
    clock: IReactorTime, slice_seconds: float = SLICE_SECONDS, pause: float = SLICE_PAUSE
) -> Runner:
    """
    Takes steps for C{slice_seconds} at a time (wall clock), C{pause} after the last;
    in between the reactor handles the I/O that is ready.
    """

    def until_deadline() -> Callable[[], bool]:
        deadline = perf_counter() + slice_seconds
        return lambda: perf_counter() >= deadline

    cooperator = Cooperator(
        terminationPredicateFactory=until_deadline,
        scheduler=lambda tick: clock.callLater(pause, tick),
    )
    return cooperator.coiterate


class MetricsResource(Resource):
    """
    C{metrics.path}: the registry, rendered in slices by C{runner}, one render at a time,
    paced to C{max_share} of the CPU.

    @ivar waiting: scrapes rendering or waiting for their turn.
    """

    isLeaf = True

    def __init__(
        self,
        registry: CollectorRegistry,
        runner: Runner,
        clock: IReactorTime,
        max_waiting: int = MAX_WAITING_SCRAPES,
        max_share: float = MAX_RENDER_SHARE,
        before: Callable[[], None] = lambda: None,
    ) -> None:
        """@param before: called on the reactor thread just before each render (gauges
        set from state only the reactor thread may read)."""
        super().__init__()
        self.before = before
        self.registry = registry
        self.runner = runner
        self.clock = clock
        self.max_waiting = max_waiting
        self.max_share = max_share
        self.waiting = 0
        self.renders = 0
        self._not_before = 0.0
        self._one_at_a_time = DeferredLock()

    def _paced(self, render: Render) -> Deferred[Render]:
        delay = self._not_before - self.clock.seconds()
        if delay < MIN_PACING_DELAY:
            return self._run(render)
        d = deferLater(self.clock, delay, lambda: None)
        return d.addCallback(lambda _: self._run(render))

    def _run(self, render: Render) -> Deferred[Render]:
        self.before()
        return self.runner(render.steps()).addCallback(lambda _: self._rendered(render))

    def _rendered(self, render: Render) -> Render:
        self.renders += 1
        if 0 < self.max_share < 1:
            pause = render.cpu_seconds * (1 / self.max_share - 1)
            self._not_before = self.clock.seconds() + pause
        return render

    def render(self, request: IRequest) -> bytes | int:
        if request.method not in READ_METHODS:
            return method_not_allowed(request)
        if self.waiting >= self.max_waiting:
            request.setHeader(b"retry-after", b"1")
            return json_body(request, 503, {"error": "too many scrapes at once; try again"})
        accept = (request.getHeader(b"accept") or b"").decode("latin-1")
        accept_encoding = (request.getHeader(b"accept-encoding") or b"").decode("latin-1")
        args: dict[bytes, list[bytes]] = getattr(request, "args", None) or {}
        names = [n.decode("utf-8", "replace") for n in args.get(b"name[]", [])]
        gone = client_gone(request)
        self.waiting += 1
        render = Render(self.registry, accept, accept_encoding, names, lambda: bool(gone))

        def send(result: Render) -> None:
            if gone:
                return
            request.setResponseCode(200)
            request.setHeader(b"content-type", result.format.content_type.encode("latin-1"))
            if result.gzipped:
                request.setHeader(b"content-encoding", b"gzip")
            request.setHeader(b"vary", b"Accept, Accept-Encoding")
            request.setHeader(b"content-length", b"%d" % len(result.body))
            request.write(result.body)
            request.finish()

        def failed(failure: Failure) -> None:
            log.failure("rendering metrics failed", failure)
            if gone:
                return
            request.write(json_body(request, 500, {"error": "rendering metrics failed"}))
            request.finish()

        def done(result: object) -> None:
            self.waiting -= 1

        d = self._one_at_a_time.run(self._paced, render)
        d.addCallbacks(send, failed)
        d.addBoth(done)
        return NOT_DONE_YET


class JsonNotFound(Resource):
    isLeaf = True

    def render(self, request: IRequest) -> bytes:
        return json_body(request, 404, {"error": f"nothing at {request.path.decode('latin-1')}"})


class AdminRoot(Resource):
    """The admin site's root: the metrics path, C{/debug}, and a small index at C{/}."""

    def __init__(
        self,
        metrics: IResource | None = None,
        metrics_path: str = "/metrics",
        debug: IResource | None = None,
    ) -> None:
        super().__init__()
        self.metrics = metrics
        self.metrics_path = metrics_path.encode()
        self.debug = debug

    def getChild(self, path: bytes, request: IRequest) -> IResource:
        if self.metrics is not None and request.path == self.metrics_path:
            return self.metrics
        if self.debug is not None and path == b"debug":
            return self.debug
        if path == b"" and request.path == b"/":
            return self
        return JsonNotFound()

    def render(self, request: IRequest) -> bytes:
        if request.method not in READ_METHODS:
            return method_not_allowed(request)
        serves = []
        if self.metrics is not None:
            serves.append(self.metrics_path.decode())
        if self.debug is not None:
            serves.append("/debug/")
        return json_body(request, 200, {"endpoints": serves})


@dataclass(frozen=True, slots=True)
class AdminListenerPlan:
    name: str
    endpoint: str
    metrics: bool
    debug: bool

    @property
    def serves(self) -> tuple[str, ...]:
        return (("metrics",) if self.metrics else ()) + (("debug",) if self.debug else ())


def plan_listeners(config: RouterConfig) -> list[AdminListenerPlan]:
    """Which admin listeners the config asks for (see the module docstring)."""
    metrics = config.observability.metrics
    debug = config.observability.debug
    shared = debug.enabled and debug.port == metrics.port
    plans = []
    if metrics.enabled or shared:
        endpoint = config.admin_listen or f"tcp:{metrics.port}"
        plans.append(AdminListenerPlan("admin", endpoint, metrics.enabled, shared))
    if debug.enabled and not shared:
        endpoint = config.debug_listen or f"tcp:{debug.port}"
        plans.append(AdminListenerPlan("debug", endpoint, False, True))
    return plans


def listener_info(name: str, service: ListeningService, serves: Sequence[str]) -> ListenerInfo:
    port = service.port
    host = getattr(port.getHost(), "host", None) if port is not None else None
    number = getattr(port.getHost(), "port", None) if port is not None else None
    return ListenerInfo(name, service.description, tuple(serves), host, number)


@implementer(IReconfigurable)
class AdminService(MultiService):
    """
    The router's admin listener(s), per L{plan_listeners}; none when both metrics and
    debug are disabled. Their endpoints, the metrics path and the debug access rules are
    fixed at start: a reload that changes them is logged as needing a restart.

    @ivar listeners: each planned listener with its service.
    """

    name = "admin"

    def __init__(
        self,
        reactor: IServerReactor,
        config: RouterConfig,
        registry: CollectorRegistry,
        plane: DataPlane,
        decisions: DecisionRing,
        metrics: RouterMetrics,
        other_listeners: Callable[[], Sequence[ListenerInfo]] = tuple,
        runner: Runner | None = None,
    ) -> None:
        super().__init__()
        self.reactor = reactor
        self.config = config
        self.other_listeners = other_listeners
        obs = config.observability
        self.metrics_path = obs.metrics.path
        self.metrics_resource = MetricsResource(
            registry,
            runner if runner is not None else runner_for(reactor),
            reactor,
            before=metrics.before_scrape,
        )
        self.debug_resource: IResource | None = None
        if obs.debug.enabled:
            sources = DebugSources(
                plane, decisions, metrics, DebugAccess(obs.debug), self.all_listeners
            )
            self.debug_resource = make_debug_resource(sources)
        self.listeners: list[tuple[AdminListenerPlan, ListeningService]] = []
        for plan in plan_listeners(config):
            root = self.root(plan, obs.metrics.path)
            service = ListeningService(reactor, plan.endpoint, QuietSite(root, reactor))
            service.setServiceParent(self)
            self.listeners.append((plan, service))

    def root(self, plan: AdminListenerPlan, metrics_path: str) -> AdminRoot:
        """The resource tree one listener serves (also what tests render in memory)."""
        return AdminRoot(
            self.metrics_resource if plan.metrics else None,
            metrics_path,
            self.debug_resource if plan.debug else None,
        )

    def all_listeners(self) -> list[ListenerInfo]:
        infos = list(self.other_listeners())
        for plan, service in self.listeners:
            paths = []
            if plan.metrics:
                paths.append(self.metrics_path)
            if plan.debug:
                paths.append("/debug/")
            infos.append(listener_info(plan.name, service, paths))
        return infos

    def reconfigure(self, config: RouterConfig) -> None:
        old = self.config
        restart_needed("observability", old.observability, config.observability)
        restart_needed("adminListen", old.admin_listen, config.admin_listen)
        restart_needed("debugListen", old.debug_listen, config.debug_listen)
        self.config = config

    def service(self, name: str) -> ListeningService | None:
        """The listener named C{admin} or C{debug}, when there is one."""
        for plan, service in self.listeners:
            if plan.name == name:
                return service
        return None
