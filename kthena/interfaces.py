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
    from kthena.store import PodEndpoint, RouteMatch


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

    def schedule(
        match: RouteMatch, pods: Sequence[PodEndpoint], body: dict[str, object]
    ) -> list[PodEndpoint]:
        """
        @param match: the route, rule and server the request matched.
        @param pods: the server's pods that may take traffic (never empty).
        @param body: the parsed request body (read-only).
        @return: candidates, best first; empty when none may take the request.
        """


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

        @return: an L{kthena.engines.dialects.EngineSnapshot}.
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
