"""
Every zope Interface of the project, documented.

The interfaces for the router's plugins (scheduler, estimators, limiters, sources, engine
dialects, KV connectors, log sinks) arrive with the issues that build them.
"""

from __future__ import annotations

from twisted.internet.interfaces import (
    IReactorCore,
    IReactorPluggableNameResolver,
    IReactorTCP,
    IReactorTime,
)


class IServerReactor(IReactorCore, IReactorTCP, IReactorTime, IReactorPluggableNameResolver):
    """
    The reactor a server of ours needs: to listen, to keep time, to connect out by host
    name (treq, Agent) and to stop itself when it cannot listen. For type checking; any
    real reactor provides it.
    """
