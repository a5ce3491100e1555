"""
The listening socket every worker shares.

The parent binds the config's C{listen} endpoint once (as a router would: TCP, TCP over
IPv6, or a socket systemd passed) and never accepts on it; each worker inherits the
descriptor and accepts from the one queue. One queue, rather than a socket per worker
with C{SO_REUSEPORT}, because a worker that closes its own socket (a drain, a crash)
would reset every connection still waiting in that socket's queue; with one queue a
connection waits for whichever worker accepts next, and nothing is lost while a worker
restarts.

A worker takes one connection per wake-up (L{SharedPort}): Twisted's port accepts as
many as are queued, up to a number it grows under load, so the first worker to wake
would take a whole burst of keep-alive connections and keep them; accepting one at a
time lets the least busy worker, which wakes first, take the next one.
"""

from __future__ import annotations

import os
import socket
from typing import Any

from twisted.internet import fdesc, tcp
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IStreamServerEndpoint
from twisted.internet.protocol import Factory
from zope.interface import implementer

from kthena.interfaces import IServerReactor

SHAREABLE = ("tcp", "tcp6", "systemd")
"""Endpoint types a worker can inherit: stream sockets on IP (TLS, Unix sockets and the
rest are not shared)."""


class NotShareableError(ValueError):
    """C{--workers} cannot share this C{listen} endpoint."""


def shareable(description: str) -> None:
    """@raise NotShareableError: C{description} names an endpoint workers cannot share."""
    kind = description.split(":", 1)[0].strip().lower()
    if kind not in SHAREABLE:
        raise NotShareableError(
            f"--workers shares the listen endpoint between processes, which works for "
            f"{', '.join(SHAREABLE)} endpoints, not {description!r}"
        )


class _Refuse(Factory):
    """The parent's port never reads (L{bind_shared}); were it asked, it would refuse."""

    def buildProtocol(self, addr: Any) -> None:
        return None


def bind_shared(reactor: IServerReactor, description: str) -> tcp.Port:
    """
    Listen on C{description} in this process without accepting: the port's socket is
    what the workers inherit.

    @raise NotShareableError: not a TCP socket.
    @raise twisted.internet.error.CannotListenError: it cannot bind.
    """
    shareable(description)
    ports: list[IListeningPort] = []
    failures: list[Any] = []
    d = serverFromString(reactor, description).listen(_Refuse())
    d.addCallbacks(ports.append, failures.append)
    if failures:
        failures[0].raiseException()
    port = ports[0]
    if not isinstance(port, tcp.Port) or port.addressFamily not in (
        socket.AF_INET,
        socket.AF_INET6,
    ):
        port.stopListening()
        raise NotShareableError(f"--workers cannot share {description!r}: not a TCP socket")
    port.stopReading()
    return port


class SharedPort(tcp.Port):
    """A port on an inherited socket that accepts one connection per wake-up (see the
    module docstring)."""

    @property
    def numberAccepts(self) -> int:
        return 1

    @numberAccepts.setter
    def numberAccepts(self, value: int) -> None:
        """Twisted grows it after a busy wake-up; it stays 1."""


@implementer(IStreamServerEndpoint)
class InheritedEndpoint:
    """Listen on the socket a parent passed as descriptor C{fd}; once."""

    def __init__(self, reactor: IServerReactor, fd: int, family: int) -> None:
        self.reactor = reactor
        self.fd = fd
        self.family = family

    def listen(self, factory: IProtocolFactory) -> Deferred[IListeningPort]:
        fdesc.setNonBlocking(self.fd)
        port = SharedPort._fromListeningDescriptor(self.reactor, self.fd, self.family, factory)
        port.startListening()
        os.close(self.fd)  # the port has its own copy
        return succeed(port)
