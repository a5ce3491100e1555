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
from zope.interface import Interface

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
