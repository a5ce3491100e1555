"""
The ports Gateways name (C{gatewayAPI}): as Kthena's router, one listening port for each
port among the HTTP listeners of the Gateways of the router's class, opened when a
Gateway names it and closed when none does any more; a request through one comes through
the Gateway listener on that port that takes its host
(L{kthena.config.gateway.PortListeners}), or none (404).

A port that cannot be opened (taken by another process, or by the router's own proxy
listener) is logged, shown in C{/debug/router/state}, and tried again at the next
change; it does not stop the router, whose other ports serve on.
"""

from __future__ import annotations

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.logger import Logger
from zope.interface import implementer

from kthena.config.gateway import PortListeners, listeners_by_port
from kthena.config.router import RouterConfig
from kthena.http.server import LeanSite
from kthena.interfaces import IExchange, IReconfigurable, IServerReactor
from kthena.listening import CannotListenError, ListeningService
from kthena.pipeline.pipeline import Pipeline
from kthena.proxy.site import take_limits

log = Logger()


class GatewayPort:
    """One port: its listening service and site, and the listeners its requests are
    matched against (a change of the Gateways replaces them for new requests)."""

    def __init__(
        self,
        reactor: IServerReactor,
        config: RouterConfig,
        number: int,
        listeners: PortListeners,
        pipeline: Pipeline,
    ) -> None:
        self.listeners = listeners
        self.pipeline = pipeline
        self.site = LeanSite(
            self.handle, config.max_body_bytes, reactor, config.downstream, pipeline.refused
        )
        self.service = ListeningService(
            reactor, endpoint_for(config.gateway_api.interface, number), self.site
        )
        self.service.setName(f"gateway port {number}")

    def handle(self, exchange: IExchange) -> None:
        self.pipeline.handle(exchange, self.listeners)


def endpoint_for(interface: str, port: int) -> str:
    """The endpoint string a Gateway port listens on."""
    if not interface:
        return f"tcp:{port}"
    return f"tcp:{port}:interface={interface.replace(':', chr(92) + ':')}"


@implementer(IReconfigurable)
class GatewayPorts(MultiService):
    """
    @ivar ports: the open ports by number.
    @ivar failed: the ports that could not be opened, with why.
    """

    name = "gateway ports"

    def __init__(self, reactor: IServerReactor, config: RouterConfig, pipeline: Pipeline) -> None:
        super().__init__()
        self.reactor = reactor
        self.config = config
        self.pipeline = pipeline
        self.ports: dict[int, GatewayPort] = {}
        self.failed: dict[int, str] = {}

    def startService(self) -> None:
        super().startService()
        self._apply()

    def stopService(self) -> Deferred[object]:
        self.ports.clear()
        d: Deferred[object] = super().stopService()
        return d

    def reconfigure(self, config: RouterConfig) -> None:
        self.config = config
        for port in self.ports.values():
            take_limits(port.site, config)
        if self.running:
            self._apply()

    def _apply(self) -> None:
        config = self.config
        wanted: dict[int, PortListeners] = {}
        if config.gateway_api.enabled:
            wanted = listeners_by_port(config.resources.gateways, config.gateway_api.class_name)
        for number in [n for n in self.ports if n not in wanted]:
            self._close(number)
        self.failed = {n: why for n, why in self.failed.items() if n in wanted}
        for number, listeners in wanted.items():
            port = self.ports.get(number)
            if port is not None:
                port.listeners = listeners
            else:
                self._open(number, listeners)

    def _open(self, number: int, listeners: PortListeners) -> None:
        port = GatewayPort(self.reactor, self.config, number, listeners, self.pipeline)
        try:
            port.service.setServiceParent(self)
        except CannotListenError as e:
            port.service.disownServiceParent()
            why = str(e).removeprefix("kthena: ")
            if self.failed.get(number) != why:
                log.error("Gateway port {port}: {why}; tried again at the next change",
                          port=number, why=why)  # fmt: skip
            self.failed[number] = why
            return
        self.failed.pop(number, None)
        self.ports[number] = port
        names = ", ".join(f"{via.key} {via.listener}" for via, _ in listeners.listeners)
        log.info("Gateway port {port} open for {names}", port=number, names=names)

    def _close(self, number: int) -> None:
        """Stop listening on the port (connections in flight finish)."""
        port = self.ports.pop(number)
        log.info("Gateway port {port} closed: no Gateway listener names it", port=number)
        closed = maybeDeferred(port.service.disownServiceParent)
        closed.addErrback(lambda f: log.failure("closing Gateway port {port}", f, port=number))
