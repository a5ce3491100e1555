"""
The proxy listener's site: its channel (L{ProxyChannel}: deadlines and limits for clients),
request bodies kept in memory and capped (twisted.web would spool bodies of 100 kB and
more to a temporary file, blocking the reactor on disk I/O).
"""

from __future__ import annotations

from collections.abc import Callable
from io import BytesIO
from typing import Protocol

from twisted.internet.interfaces import IProtocolFactory, IReactorTime, IStreamServerEndpoint
from twisted.web.resource import IResource
from twisted.web.server import Request
from zope.interface import implementer

from kthena.config.router import RouterConfig
from kthena.config.traffic import DownstreamConfig
from kthena.http.server import LeanSite
from kthena.interfaces import IReconfigurable, IServerReactor
from kthena.lifecycle import restart_needed
from kthena.listening import ListeningService
from kthena.pipeline.pipeline import Pipeline
from kthena.proxy.channel import ProxyChannel
from kthena.proxy.resource import ProxyResource
from kthena.record import RequestRecord
from kthena.webutil import QuietSite


class CappedRequest(Request):
    """
    Keeps the body in memory up to the site's C{max_body_bytes}; past that the body is
    read and dropped, and C{too_large} tells the resource to answer 413.
    """

    too_large = False

    def _cap(self) -> int:
        site = getattr(self.channel, "site", None)
        return int(getattr(site, "max_body_bytes", 10 * 1024 * 1024))

    def gotLength(self, length: int | None) -> None:
        self.content = BytesIO()
        if length is not None and length > self._cap():
            self.too_large = True

    def handleContentChunk(self, data: bytes) -> None:
        if self.too_large:
            return
        content = self.content
        assert isinstance(content, BytesIO)
        if content.tell() + len(data) > self._cap():
            self.too_large = True
            self.content = BytesIO()
            return
        content.write(data)


def _unrecorded(ctx: RequestRecord) -> None:
    pass


class ProxySite(QuietSite):
    """
    @ivar downstream: the clients' deadlines (changed by a reload for new requests).
    @ivar refused: told of each request the channel answered itself (408, 414, 431, 400).
    """

    protocol = ProxyChannel
    requestFactory = CappedRequest

    def __init__(
        self,
        resource: IResource,
        max_body_bytes: int,
        reactor: IReactorTime | None = None,
        downstream: DownstreamConfig | None = None,
        refused: Callable[[RequestRecord], None] = _unrecorded,
    ) -> None:
        downstream = downstream or DownstreamConfig()
        # Bodies are JSON, never forms: twisted.web's form parsing (a content-type parse
        # through the email package) cost about 15% of the proxy's CPU.
        super().__init__(
            resource, reactor, parsePOSTFormSubmission=False, timeout=downstream.idle_timeout
        )
        self.max_body_bytes = max_body_bytes
        self.downstream = downstream
        self.refused = refused

    @property
    def clock(self) -> IReactorTime:
        clock: IReactorTime = self.reactor
        return clock


class ListenerSite(Protocol):
    """
    What the listener changes on its site (L{ProxySite}, or the lean server's
    L{kthena.http.server.LeanSite}), which must also provide C{IProtocolFactory}.
    """

    max_body_bytes: int
    downstream: DownstreamConfig


def take_limits(site: ListenerSite, config: RouterConfig) -> None:
    """What a reload changes on a listener's site: the body cap and the client deadlines,
    for new requests."""
    site.max_body_bytes = config.max_body_bytes
    site.downstream = config.downstream


@implementer(IReconfigurable)
class ProxyListener(ListeningService):
    """
    The proxy's listener and its site: a reload changes the body cap and the client
    deadlines for new requests; a new C{listen} endpoint or C{downstream.server} needs a
    restart.
    """

    name = "proxy listener"

    def __init__(
        self,
        reactor: IServerReactor,
        config: RouterConfig,
        site: ListenerSite,
        endpoint: IStreamServerEndpoint | None = None,
    ) -> None:
        super().__init__(reactor, config.listen, IProtocolFactory(site), endpoint)
        self.site = site
        self.server = config.downstream.server

    def reconfigure(self, config: RouterConfig) -> None:
        restart_needed("listen", self.description, config.listen)
        restart_needed("downstream.server", self.server, config.downstream.server)
        take_limits(self.site, config)


def proxy_site(
    reactor: IServerReactor, config: RouterConfig, pipeline: Pipeline
) -> ProxySite | LeanSite:
    """The proxy listener's site, on the HTTP server C{downstream.server} names."""
    if config.downstream.server == "lean":
        return LeanSite(
            pipeline.handle, config.max_body_bytes, reactor, config.downstream, pipeline.refused
        )
    return ProxySite(
        ProxyResource(pipeline), config.max_body_bytes, reactor, config.downstream,
        pipeline.refused,
    )  # fmt: skip
