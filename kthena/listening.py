"""
A service that listens on an endpoint string and remembers its port.

L{twisted.application.strports.service} hides the port it bound; the router and the
simulator need it (C{tcp:0} in tests and the demo, the admin state in debug output).

As Twisted's C{StreamServerEndpointService}, it listens in L{privilegedStartService}, so
that C{twistd --uid} binds :80 or :443 before dropping privileges, and a pending listen
is cancelled on stop. A listener that cannot bind is fatal: L{CannotListenError} (a
C{SystemExit}) ends C{twistd} and C{twist} at start with a non-zero status and one line
saying why, rather than leaving a router up that takes no traffic (systemd's
C{Restart=on-failure} then does its job).
"""

from __future__ import annotations

from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import (
    IListeningPort,
    IProtocolFactory,
    IReactorCore,
    IStreamServerEndpoint,
)
from twisted.logger import Logger
from twisted.python.failure import Failure

log = Logger()


class CannotListenError(SystemExit):
    """A listener could not bind; C{str()} says which and why."""


def _why(failure: Failure) -> str:
    value = failure.value
    os_error = getattr(value, "socketError", None) or getattr(value, "osError", None)
    if isinstance(os_error, OSError) and os_error.strerror:
        return os_error.strerror
    return failure.getErrorMessage() or failure.type.__name__  # type: ignore[union-attr]


class ListeningService(Service):
    """Listen on C{description} while running (or on C{endpoint}, already made: a socket
    inherited from a parent, which C{description} then only names)."""

    def __init__(
        self,
        reactor: IReactorCore,
        description: str,
        factory: IProtocolFactory,
        endpoint: IStreamServerEndpoint | None = None,
    ) -> None:
        self.reactor = reactor
        self.description = description
        self.factory = factory
        self.endpoint = endpoint
        self.port: IListeningPort | None = None
        self._listening: Deferred[IListeningPort] | None = None
        self._binding = False
        self._failure: Failure | None = None

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        self._listen()

    def startService(self) -> None:
        super().startService()
        if self._listening is None:  # started without the privileged step (twist, tests)
            self._listen()

    def _listen(self) -> None:
        self._failure = None
        self._binding = True
        try:
            try:
                endpoint = self.endpoint or serverFromString(self.reactor, self.description)
            except IndexError:  # Twisted's systemd: endpoint, with no such socket passed
                raise CannotListenError(
                    f"kthena: cannot listen on {self.description}: no such socket passed by "
                    "systemd (LISTEN_FDS, LISTEN_FDNAMES)"
                ) from None
            d = endpoint.listen(self.factory)
            self._listening = d
            d.addCallbacks(self._bound, self._failed)
        finally:
            self._binding = False
        if self._failure is not None:  # TCP, UNIX and systemd sockets bind at once
            raise CannotListenError(
                f"kthena: cannot listen on {self.description}: {_why(self._failure)}"
            )

    def _bound(self, port: IListeningPort) -> None:
        self.port = port
        address = port.getHost()
        log.info(
            "listening on {description} ({address})", description=self.description, address=address
        )

    def _failed(self, failure: Failure) -> None:
        if failure.check(CancelledError):  # stopped before it bound
            return
        if self._binding:
            self._failure = failure  # raised by _listen
            return
        if self.reactor.running:  # failed later: stop all the same
            log.critical(
                "cannot listen on {description}: {why}; stopping",
                description=self.description,
                why=_why(failure),
            )
            self.reactor.stop()

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        listening, self._listening = self._listening, None
        if listening is not None and not listening.called:
            listening.cancel()
        port, self.port = self.port, None
        if port is None:
            return None
        return port.stopListening()

    @property
    def bound_port(self) -> int:
        """The TCP port bound (useful with C{tcp:0})."""
        assert self.port is not None, "not listening"
        return int(self.port.getHost().port)  # type: ignore[attr-defined]
