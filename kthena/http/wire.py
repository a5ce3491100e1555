"""
Writes that go to the socket at once.

A Twisted transport buffers every write and sends it on the reactor's next turn: it
registers the socket for writing (an C{epoll_ctl}), waits for the loop to find it
writable, sends, and unregisters it (another C{epoll_ctl}). On the router's path, where
almost every write finds an empty buffer and a socket with room, that costs more than the
send. L{EagerWire} tries C{send} first when nothing is queued, and leaves to the
transport only what the socket did not take (so ordering, backpressure and errors stay
the transport's); anything else than a plain TCP or Unix socket (TLS) writes as usual.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from twisted.internet import tcp


class EagerWire:
    """A transport's C{write} and C{writeSequence}, sending at once when they can."""

    __slots__ = ("_socket", "transport")

    def __init__(self, transport: Any) -> None:
        self.transport = transport
        eager = isinstance(transport, tcp.Connection)
        self._socket = transport.socket if eager else None

    def write(self, data: bytes) -> None:
        t = self.transport
        if (
            self._socket is not None
            and data
            and not t._tempDataLen
            and t.offset == len(t.dataBuffer)
            and t.connected
            and not t.disconnecting
            and not t.TLS
        ):
            try:
                sent = self._socket.send(data)
            except OSError:  # no room (EAGAIN), or an error the transport will meet too
                sent = 0
            if sent == len(data):
                return
            data = data[sent:]
        t.write(data)

    def writeSequence(self, data: Sequence[bytes]) -> None:
        self.write(b"".join(data))

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.transport.registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        self.transport.unregisterProducer()

    def abortConnection(self) -> None:
        self.transport.abortConnection()
