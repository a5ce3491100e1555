"""
The router's lean client towards pods (C{upstream.client: lean}): L{IUpstream} over our own
HTTP/1.1 connections (L{kthena.http.connection}) and pool (L{kthena.http.pool}), in place of
C{Agent} and C{HTTPConnectionPool}, whose parser and pool cost about a third of the
router's CPU.

Connections go through the same endpoints as C{Agent}'s (L{PodEndpoints}: the pod's
address, the connect timeout, TCP_NODELAY, TLS for C{https} pods with C{wrapClientTLS}),
so a pod that cannot be reached fails with the same errors
(L{kthena.failures.CONNECT_ERRORS}: the dispatcher retries those on the next pod).
A request that met a pooled connection the pod had closed goes once more on a new one.
"""

from __future__ import annotations

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.python.failure import Failure
from twisted.web.client import URI
from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse
from zope.interface import implementer

from kthena.config.router import RouterConfig
from kthena.config.traffic import UpstreamConfig
from kthena.http.connection import Key, NotSentError, PodConnection
from kthena.http.pool import ConnectionPool
from kthena.interfaces import IReconfigurable, IServerReactor, IUpstream
from kthena.podclient import PodEndpoints, host_header
from kthena.pods import PodEndpoint

_Origin = tuple[IStreamClientEndpoint, bytes]
"""What a pod's requests share: the endpoint, the Host value."""


def request_bytes(
    method: bytes, uri: bytes, host: bytes, headers: Headers, body: bytes | None
) -> bytes:
    """
    A request, whole: C{Host} first, then C{headers} (the pipeline left out the hop-by-hop
    ones and any C{Host} or C{Content-Length}), then the body with its length.
    """
    parts = [method, b" ", uri, b" HTTP/1.1\r\nHost: ", host, b"\r\n"]
    for name, values in headers.getAllRawHeaders():
        for value in values:
            parts += (name, b": ", value, b"\r\n")
    if body is None:
        parts.append(b"\r\n")
    else:
        parts += (b"Content-Length: ", b"%d" % len(body), b"\r\n\r\n", body)
    return b"".join(parts)


@implementer(IUpstream, IReconfigurable)
class LeanUpstream(Service):
    """
    Sends requests to pods over pooled keep-alive connections; its pooled connections
    close when the service stops (after the drain, in the router's tree).
    """

    name = "upstream"

    def __init__(self, reactor: IServerReactor, config: UpstreamConfig) -> None:
        self.reactor = reactor
        self.pool = ConnectionPool(
            reactor, config.max_connections_per_pod, config.pool_idle_timeout
        )
        self.endpoints = PodEndpoints(reactor, config.connect_timeout)
        self._origins: dict[Key, _Origin] = {}
        self.configure(config)

    def configure(self, config: UpstreamConfig) -> None:
        """Take new pool sizes and timeouts (a reload's, or the scraper's own)."""
        self.pool.max_idle = config.max_connections_per_pod
        self.pool.idle_timeout = config.pool_idle_timeout
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
        """Send C{method uri} (origin form: path and query) to C{pod}."""
        key = (scheme, pod.authority)
        origin = self._origins.get(key)
        if origin is None:
            origin = self._origin(key)
        endpoint, host = origin
        data = request_bytes(method, uri, host, headers, body)
        head_only = method == b"HEAD"
        connection = self.pool.take(key)
        if connection is None:
            return self._on_new(key, endpoint, data, head_only)
        sent = connection.send(data, head_only)
        sent.addErrback(self._if_not_sent, key, endpoint, data, head_only)
        return sent

    def _on_new(
        self, key: Key, endpoint: IStreamClientEndpoint, data: bytes, head_only: bool
    ) -> Deferred[IResponse]:
        connecting = self.pool.connect(key, endpoint)

        def send(connection: PodConnection) -> Deferred[IResponse]:
            return connection.send(data, head_only)

        sent: Deferred[IResponse] = connecting.addCallback(send)
        return sent

    def _if_not_sent(
        self,
        failure: Failure,
        key: Key,
        endpoint: IStreamClientEndpoint,
        data: bytes,
        head_only: bool,
    ) -> Deferred[IResponse]:
        failure.trap(NotSentError)
        return self._on_new(key, endpoint, data, head_only)

    def _origin(self, key: Key) -> _Origin:
        scheme, authority = key
        base = URI.fromBytes(f"{scheme}://{authority}/".encode("ascii"))
        endpoint = self.endpoints.endpointForURI(base)
        host = host_header(base, authority)
        if len(self._origins) > 4096:  # pods come and go; never grow without bound
            self._origins.clear()
        self._origins[key] = (endpoint, host)
        return endpoint, host

    def idle_connections(self, pod: PodEndpoint) -> int:
        """Idle keep-alive connections pooled for C{pod} (for the debug views)."""
        return sum(self.pool.count((scheme, pod.authority)) for scheme in ("http", "https"))

    def close(self) -> Deferred[None]:
        """Close idle pooled connections (on shutdown)."""
        return self.pool.close()
