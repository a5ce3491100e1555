"""
Every zope Interface of the project, documented.

The interfaces for the router's plugins (scheduler, estimators, limiters, sources, engine
dialects, KV connectors, log sinks) arrive with the issues that build them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from twisted.internet.interfaces import (
    IReactorCore,
    IReactorPluggableNameResolver,
    IReactorTCP,
    IReactorTime,
)
from zope.interface import Attribute, Interface

if TYPE_CHECKING:
    from kthena.pods import PodEndpoint


class IServerReactor(IReactorCore, IReactorTCP, IReactorTime, IReactorPluggableNameResolver):
    """
    The reactor a server of ours needs: to listen, to keep time, to connect out by host
    name (treq, Agent) and to stop itself when it cannot listen. For type checking; any
    real reactor provides it.
    """


class IScheduler(Interface):
    """
    Chooses the pods a request may go to, best first. The data plane tries them in that
    order, moving on when a pod fails before answering (the retry policy).
    """

    def schedule(request: Any) -> Any:
        """
        @param request: a L{kthena.scheduler.framework.SchedulingRequest}: the matched
            route and server, its pods that may take traffic (never empty), the body.
        @return: a L{kthena.scheduler.framework.Decision} whose C{candidates} are best
            first (empty when none may take the request).
        """

    def scheduled(decision: Any, pod: PodEndpoint) -> None:
        """C{pod}, a candidate of C{decision}, served the request."""

    def forget_pods(keys: set[str]) -> None:
        """Pods (by key) left the config: drop whatever is kept about them."""

    def prefix_entries() -> int:
        """(prefix block, pod) entries its prefix indexes hold (0 without one), for
        C{kthena_router_prefix_cache_entries}; read from the metrics' worker thread."""


class IPrefixIndex(Interface):
    """A plugin remembering which pods served which prompt prefixes."""

    entries = Attribute(
        "(prefix block, pod) entries held: a block cached on N pods counts N times."
    )


class ITokenEstimator(Interface):
    """Estimates a request's input tokens from its body, before it is sent."""

    def estimate(body: dict[str, Any]) -> int:
        """
        @param body: the parsed request body (chat messages or a completions prompt).
        @return: the estimated number of input tokens (0 when there is no prompt).
        """


class IEngineDialect(Interface):
    """How one inference engine family names what the router reads from C{/metrics}."""

    name = Attribute("The engine, as ModelServer.spec.inferenceEngine names it.")

    def parse(text: str) -> Any:
        """
        Read one scrape of a pod's C{/metrics} (Prometheus text or OpenMetrics).

        @return: an L{kthena.engines.snapshot.EngineSnapshot}.
        @raise ValueError: when the text cannot be read.
        """


class IAccessLogSink(Interface):
    """
    Where access-log lines go: a stream, a file, an external collector.

    The access log calls a sink only from its own writer thread, never from the reactor,
    one call at a time: a sink may block (a slow disk, a full pipe, the network) without
    slowing the proxy; lines wait in the access log's bounded buffer meanwhile, and are
    dropped and counted when it is full.
    """

    def write(lines: Sequence[str]) -> None:
        """
        Write a batch of lines, in order.

        @param lines: formatted records, each without its trailing newline.
        @raise Exception: the batch is lost; the access log counts and reports it and goes
            on with the next one.
        """

    def reopen() -> None:
        """
        Release the destination and acquire it again: a file is closed and opened again
        by its path (after log rotation renamed it). Nothing to do for a stream.
        """

    def close() -> None:
        """Flush and release the destination; no call follows."""


class IFilterPlugin(Interface):
    """A scheduler plugin that removes pods unfit for a request."""

    name = Attribute("The plugin's configuration name.")

    def filter(request: Any, pods: Sequence[PodEndpoint]) -> list[PodEndpoint]:
        """
        @param request: the L{kthena.scheduler.framework.SchedulingRequest}.
        @return: the pods that pass, in their given order.
        """


class IScorePlugin(Interface):
    """A scheduler plugin that rates pods for a request, 0 (worst) to 100 (best)."""

    name = Attribute("The plugin's configuration name.")

    def score(request: Any, pods: Sequence[PodEndpoint]) -> Sequence[float]:
        """
        @param request: the L{kthena.scheduler.framework.SchedulingRequest}.
        @return: a score for each pod, in the order of C{pods}.
        """


class IPostScheduleHook(Interface):
    """Told which pod served a request, to learn from it (e.g. the prefix index)."""

    name = Attribute("The plugin's configuration name.")

    def scheduled(request: Any, pod: PodEndpoint) -> None:
        """C{pod} served C{request} (its response began with a status below 500)."""
