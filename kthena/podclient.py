"""
The router's HTTP clients towards pods (the proxy's and the scraper's): keep-alive pools
that log nothing per connection and never resend a request, Agents that connect to a
pod's IP address directly (a plain TCP endpoint, no name resolution in a thread) with
Nagle's algorithm off and a connect timeout, and bounded reading of small bodies.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint, wrapClientTLS
from twisted.internet.interfaces import (
    IConsumer,
    IProtocol,
    IProtocolFactory,
    IPushProducer,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Protocol
from twisted.internet.ssl import optionsForClientTLS
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool, ResponseDone, _HTTP11ClientFactory
from twisted.web.iweb import IAgentEndpointFactory, IBodyProducer, IResponse
from zope.interface import implementer

from kthena.deferreds import stopping
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
class PodEndpoints:
    """Endpoints to pods' addresses (C{connect_timeout} may change between requests)."""

    def __init__(self, reactor: IServerReactor, connect_timeout: float) -> None:
        self.reactor = reactor
        self.connect_timeout = connect_timeout

    def retime(self, connect_timeout: float) -> bool:
        """A (reloaded) connect timeout; C{True} when it changed, so that endpoints made
        with the old one must be made again."""
        changed = connect_timeout != self.connect_timeout
        self.connect_timeout = connect_timeout
        return changed

    def endpointForURI(self, uri: Any) -> IStreamClientEndpoint:
        host = uri.host.decode("ascii")
        tcp = TCP6ClientEndpoint if ":" in host else TCP4ClientEndpoint
        endpoint: IStreamClientEndpoint = tcp(
            self.reactor, host, uri.port, timeout=self.connect_timeout
        )
        if uri.scheme == b"https":
            endpoint = wrapClientTLS(optionsForClientTLS(host), endpoint)
        return _NoDelayEndpoint(endpoint)


DEFAULT_PORTS = {b"http": 80, b"https": 443}


def host_header(base: Any, authority: str) -> bytes:
    """A pod's C{Host} value: its host alone on the scheme's default port, else
    C{host:port} (C{base}: the pod's root URI)."""
    host: bytes = base.host
    return host if base.port == DEFAULT_PORTS[base.scheme] else authority.encode("ascii")


def pod_agent(reactor: IServerReactor, endpoints: PodEndpoints, pool: HTTPConnectionPool) -> Agent:
    """An Agent over C{pool} whose connections go straight to pods' addresses."""
    agent: Agent = Agent.usingEndpointFactory(reactor, endpoints, pool=pool)
    return agent


class BodyCollector(Protocol):
    """Collects a response body of at most C{limit} bytes; C{done} fires with it."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.done: Deferred[bytes] = stopping(self._stop)
        self._parts: list[bytes] = []
        self._size = 0

    def dataReceived(self, data: bytes) -> None:
        self._size += len(data)
        if self._size > self.limit:
            self._stop()
            if not self.done.called:
                self.done.errback(ValueError(f"body over {self.limit} bytes"))
            return
        self._parts.append(data)

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:  # noqa: B008
        if self.done.called:
            return
        if isinstance(reason.value, ResponseDone):
            self.done.callback(b"".join(self._parts))
        else:
            self.done.errback(reason)

    def _stop(self) -> None:
        if self.transport is not None:
            self.transport.stopProducing()  # type: ignore[attr-defined]


@implementer(IPushProducer)
class InMemory:
    """A producer of bytes already in memory: there is no flow to control."""

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


@implementer(IBodyProducer)
class BytesBody(InMemory):
    """A request body already in memory: written at once, with its length known."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.length = len(body)

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        consumer.write(self.body)
        return succeed(None)


@implementer(IResponse)
class BufferedResponse:
    """
    A pod's response whose body was read already (to look at it before deciding what
    to do), delivered again to whichever protocol takes it as if it came off the wire.
    """

    def __init__(self, response: IResponse, body: bytes) -> None:
        self.version = response.version
        self.code = response.code
        self.phrase = response.phrase
        self.headers = response.headers
        self.length = len(body)
        self.request = response.request
        self.previousResponse = response.previousResponse
        self.body = body

    def deliverBody(self, protocol: IProtocol) -> None:
        protocol.makeConnection(InMemory())  # type: ignore[arg-type]
        if self.body:
            protocol.dataReceived(self.body)
        protocol.connectionLost(Failure(ResponseDone()))

    def setPreviousResponse(self, response: IResponse) -> None:
        self.previousResponse = response
