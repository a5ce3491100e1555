"""
The router's HTTP client towards pods: one L{Agent} over one persistent, sized
L{HTTPConnectionPool}, with TCP_NODELAY on every connection and a connect timeout.

Not treq (cookies shared between users, redirects, decoding) and not
C{ReverseProxyResource} (HTTP/1.0, a connection per request, no backpressure).
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint, wrapClientTLS
from twisted.internet.interfaces import (
    IConsumer,
    IProtocol,
    IProtocolFactory,
    IStreamClientEndpoint,
)
from twisted.internet.ssl import optionsForClientTLS
from twisted.web.client import URI, Agent, HTTPConnectionPool, _HTTP11ClientFactory
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory, IBodyProducer, IResponse
from zope.interface import implementer

from kthena.config.traffic import UpstreamConfig
from kthena.interfaces import IServerReactor
from kthena.store import PodEndpoint


@implementer(IBodyProducer)
class BytesBody:
    """A request body already in memory: written at once, with its length known."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.length = len(body)

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        consumer.write(self.body)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


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


_Origin = tuple[tuple[bytes, bytes, int], IStreamClientEndpoint, URI, bytes]
"""What a pod's requests share: the pool key, the endpoint, the base URI, the Host value."""


class _QuietClientFactory(_HTTP11ClientFactory):
    """The pool's connection factory without a log line per connection."""

    noisy = False


class Upstream:
    """Sends requests to pods over pooled keep-alive connections."""

    def __init__(self, reactor: IServerReactor, config: UpstreamConfig) -> None:
        self.reactor = reactor
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.pool.maxPersistentPerHost = config.max_connections_per_pod
        # Twisted annotates this as int; any number of seconds works.
        self.pool.cachedConnectionTimeout = config.pool_idle_timeout  # type: ignore[assignment]
        # Inference POSTs are not idempotent: never resend one behind the caller's back.
        self.pool.retryAutomatically = False
        self.pool._factory = _QuietClientFactory
        self.agent = Agent.usingEndpointFactory(
            reactor, _PodEndpointFactory(reactor, config.connect_timeout), pool=self.pool
        )
        self._origins: dict[tuple[str, str], _Origin] = {}

    def request(
        self,
        pod: PodEndpoint,
        scheme: str,
        method: bytes,
        uri: bytes,
        headers: Headers,
        body: bytes | None,
    ) -> Deferred[IResponse]:
        """
        Send C{method uri} (origin form: path and query) to C{pod}.

        C{Agent.request} parses the absolute URL and builds an endpoint for every call,
        a tenth of the proxy's CPU; pods are few, so that is done once per pod and the
        request goes straight to the pool through the Agent's own request path.
        """
        origin = self._origins.get((scheme, pod.authority))
        if origin is None:
            origin = self._origin(scheme, pod.authority)
        key, endpoint, base, host = origin
        headers.setRawHeaders(b"host", [host])
        producer = None if body is None else BytesBody(body)
        d: Deferred[IResponse] = self.agent._requestWithEndpoint(
            key, endpoint, method, base, headers, producer, uri
        )
        return d

    def _origin(self, scheme: str, authority: str) -> _Origin:
        base = URI.fromBytes(f"{scheme}://{authority}/".encode("ascii"))
        endpoint = self.agent._getEndpoint(base)
        key = (base.scheme, base.host, base.port)
        default_port = {b"http": 80, b"https": 443}[base.scheme]
        host = base.host if base.port == default_port else authority.encode("ascii")
        origin = (key, endpoint, base, host)
        if len(self._origins) > 4096:  # pods come and go; never grow without bound
            self._origins.clear()
        self._origins[(scheme, authority)] = origin
        return origin

    def idle_connections(self, pod: PodEndpoint) -> int:
        """Idle keep-alive connections pooled for C{pod} (for the debug views)."""
        count = 0
        for scheme in ("http", "https"):
            origin = self._origins.get((scheme, pod.authority))
            if origin is not None:
                count += len(self.pool._connections.get(origin[0], ()))
        return count

    def close(self) -> Deferred[None]:
        """Close idle pooled connections (on shutdown)."""
        d: Deferred[None] = self.pool.closeCachedConnections()
        return d
