"""
Writes that go to the socket at once, and writes held for the rest of a read.

A Twisted transport buffers every write and sends it on the reactor's next turn: it
registers the socket for writing (an C{epoll_ctl}), waits for the loop to find it
writable, sends, and unregisters it (another C{epoll_ctl}). On the router's path, where
almost every write finds an empty buffer and a socket with room, that costs more than the
send. L{EagerWire} tries C{send} first when nothing is queued, and leaves to the
transport only what the socket did not take (so ordering, backpressure and errors stay
the transport's); anything else than a plain TCP or Unix socket (TLS) writes as usual.

One read from a pod often holds a whole answer: a stream's head, its events and its end
come as three writes to the client, three sends. While such a read is handled
(L{holding}), eager writes are held per wire and go as one send when it is done; a wire
closed meanwhile sends what it holds first, one aborted drops it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from twisted.internet import tcp

_held: list[EagerWire] | None = None
"""While a read is handled: the wires holding writes, in the order they first wrote."""


def hold() -> bool:
    """
    Hold every eager write until L{release}.

    @return: whether this call holds (False when a hold is on already: the outer one
        releases).
    """
    global _held  # noqa: PLW0603 (one reactor thread; a hold lasts one read)
    if _held is not None:
        return False
    _held = []
    return True


def release() -> None:
    """Send what every wire held, one send a wire."""
    global _held
    wires, _held = _held, None
    for wire in wires or ():
        wire.flush()


class EagerWire:
    """A transport as its connection uses it: C{write} and C{writeSequence} sending at once
    when they can, the rest passed on."""

    __slots__ = ("_pending", "_socket", "transport")

    def __init__(self, transport: Any) -> None:
        self.transport = transport
        eager = isinstance(transport, tcp.Connection)
        self._socket = transport.socket if eager else None
        self._pending: list[bytes] | None = None

    def write(self, data: bytes) -> None:
        held = _held
        if held is not None:
            pending = self._pending
            if pending is None:
                self._pending = [data]
                held.append(self)
            else:
                pending.append(data)
            return
        self._send(data)

    def writeSequence(self, data: Sequence[bytes]) -> None:
        self.write(b"".join(data))

    def flush(self) -> None:
        """Send what is held now."""
        pending, self._pending = self._pending, None
        if pending:
            self._send(pending[0] if len(pending) == 1 else b"".join(pending))

    def _send(self, data: bytes) -> None:
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

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.transport.registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        self.transport.unregisterProducer()

    def pauseProducing(self) -> None:
        self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        self.transport.resumeProducing()

    def loseConnection(self) -> None:
        """Close once everything written, held or queued, is sent."""
        self.flush()
        self.transport.loseConnection()

    def abortConnection(self) -> None:
        self._pending = None
        self.transport.abortConnection()
