"""
The router's HTTP client towards pods: one L{Agent} over one persistent, sized
L{HTTPConnectionPool}, with TCP_NODELAY on every connection and a connect timeout.

Not treq (cookies shared between users, redirects, decoding) and not
C{ReverseProxyResource} (HTTP/1.0, a connection per request, no backpressure).
"""

from __future__ import annotations

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IStreamClientEndpoint,
)
from twisted.web.client import URI
from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse
from zope.interface import implementer

from kthena.config.router import RouterConfig
from kthena.config.traffic import UpstreamConfig
from kthena.interfaces import IReconfigurable, IServerReactor, IUpstream
from kthena.podclient import BytesBody, PodEndpoints, client_pool, host_header, pod_agent
from kthena.pods import PodEndpoint

_Origin = tuple[tuple[bytes, bytes, int], IStreamClientEndpoint, URI, bytes]
"""What a pod's requests share: the pool key, the endpoint, the base URI, the Host value."""


@implementer(IUpstream, IReconfigurable)
class Upstream(Service):
    """
    Sends requests to pods over pooled keep-alive connections; its pooled connections
    close when the service stops (after the drain, in the router's tree).
    """

    name = "upstream"

    def __init__(self, reactor: IServerReactor, config: UpstreamConfig) -> None:
        self.reactor = reactor
        self.pool = client_pool(reactor, config.max_connections_per_pod)
        self.endpoints = PodEndpoints(reactor, config.connect_timeout)
        self.agent = pod_agent(reactor, self.endpoints, self.pool)
        self._origins: dict[tuple[str, str], _Origin] = {}
        self.configure(config)

    def configure(self, config: UpstreamConfig) -> None:
        """Take new pool sizes and timeouts (a reload's, or the scraper's own)."""
        self.pool.maxPersistentPerHost = config.max_connections_per_pod
        # Twisted annotates this as int; any number of seconds works.
        self.pool.cachedConnectionTimeout = config.pool_idle_timeout  # type: ignore[assignment]
        if self.endpoints.retime(config.connect_timeout):
            self._origins.clear()  # they hold endpoints made with the old timeout

    def reconfigure(self, config: RouterConfig) -> None:
        self.configure(config.upstream)

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return self.close()

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
        origin = (key, endpoint, base, host_header(base, authority))
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
