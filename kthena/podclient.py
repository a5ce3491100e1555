"""
The router's HTTP clients towards pods (the proxy's and the scraper's): keep-alive pools
that log nothing per connection and never resend a request, and Agents that connect to a
pod's IP address directly (a plain TCP endpoint, no name resolution in a thread) with
Nagle's algorithm off and a connect timeout.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint, wrapClientTLS
from twisted.internet.interfaces import IProtocol, IProtocolFactory, IStreamClientEndpoint
from twisted.internet.ssl import optionsForClientTLS
from twisted.web.client import Agent, HTTPConnectionPool, _HTTP11ClientFactory
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

from kthena.interfaces import IServerReactor


class _QuietClientFactory(_HTTP11ClientFactory):
    """A pool's connection factory without two log lines per connection."""

    noisy = False


def client_pool(reactor: IServerReactor, max_idle_per_host: int) -> HTTPConnectionPool:
    """
    A keep-alive pool for the router's own clients (to pods, scrapes): quiet (the stock
    factory logs "Starting factory" and "Stopping factory" for every connection: hundreds
    of lines a minute scraping pods that are down), and never resending a request behind
    the caller's back (inference POSTs are not idempotent).
    """
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = max_idle_per_host
    pool.retryAutomatically = False
    pool._factory = _QuietClientFactory
    return pool


@implementer(IStreamClientEndpoint)
class _NoDelayEndpoint:
    """Connects through another endpoint, then turns Nagle's algorithm off."""

    def __init__(self, inner: IStreamClientEndpoint) -> None:
        self.inner = inner

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        d = self.inner.connect(protocolFactory)
        d.addCallback(self._no_delay)
        return d

    @staticmethod
    def _no_delay(protocol: Any) -> Any:
        transport = getattr(protocol, "transport", None)
        set_no_delay = getattr(transport, "setTcpNoDelay", None)
        if set_no_delay is not None:
            set_no_delay(True)
        return protocol


@implementer(IAgentEndpointFactory)
class _PodEndpointFactory:
    def __init__(self, reactor: IServerReactor, connect_timeout: float) -> None:
        self.reactor = reactor
        self.connect_timeout = connect_timeout

    def endpointForURI(self, uri: Any) -> IStreamClientEndpoint:
        host = uri.host.decode("ascii")
        tcp = TCP6ClientEndpoint if ":" in host else TCP4ClientEndpoint
        endpoint: IStreamClientEndpoint = tcp(
            self.reactor, host, uri.port, timeout=self.connect_timeout
        )
        if uri.scheme == b"https":
            endpoint = wrapClientTLS(optionsForClientTLS(host), endpoint)
        return _NoDelayEndpoint(endpoint)


def pod_agent(reactor: IServerReactor, connect_timeout: float, pool: HTTPConnectionPool) -> Agent:
    """An Agent over C{pool} whose connections go straight to pods' addresses."""
    agent: Agent = Agent.usingEndpointFactory(
        reactor, _PodEndpointFactory(reactor, connect_timeout), pool=pool
    )
    return agent
