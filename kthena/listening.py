"""
A service that listens on an endpoint string and remembers its port.

L{twisted.application.strports.service} hides the port it bound; the router and the
simulator need it (C{tcp:0} in tests and the demo, the admin state in debug output).
"""

from __future__ import annotations

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IReactorCore
from twisted.logger import Logger
from twisted.python.failure import Failure

log = Logger()


class ListeningService(Service):
    """
    Listen on C{description} while running; a failure to listen stops the reactor, since
    a server that cannot take traffic must not look alive.
    """

    def __init__(self, reactor: IReactorCore, description: str, factory: IProtocolFactory) -> None:
        self.reactor = reactor
        self.description = description
        self.factory = factory
        self.port: IListeningPort | None = None

    def startService(self) -> None:
        super().startService()
        d = serverFromString(self.reactor, self.description).listen(self.factory)
        d.addCallbacks(self._listening, self._failed)

    def _listening(self, port: IListeningPort) -> None:
        self.port = port
        address = port.getHost()
        log.info(
            "listening on {description} ({address})", description=self.description, address=address
        )

    def _failed(self, failure: Failure) -> None:
        log.failure("cannot listen on {description}", failure, description=self.description)
        if self.reactor.running:
            self.reactor.stop()

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        port, self.port = self.port, None
        if port is None:
            return None
        return port.stopListening()

    @property
    def bound_port(self) -> int:
        """The TCP port bound (useful with C{tcp:0})."""
        assert self.port is not None, "not listening"
        return int(self.port.getHost().port)  # type: ignore[attr-defined]
