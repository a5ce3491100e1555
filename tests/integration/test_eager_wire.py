"""
L{kthena.http.wire.EagerWire} on real loopback sockets: a write that finds nothing queued
goes to the socket at once (not to the transport's buffer); one the socket cannot take
whole leaves the rest to the transport, and later writes queue behind it, so the peer
reads every byte in order.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.internet.protocol import Factory, Protocol

from kthena.http.wire import EagerWire
from tests.integration.router_helpers import LOOPBACK, inline

BIG = bytes(range(256)) * (16 * 1024)  # 4 MiB: more than the socket buffers take at once


class Reader(Protocol):
    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.received: list[bytes] = []
        self.size = 0
        self.done: Deferred[bytes] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.received.append(data)
        self.size += len(data)
        if self.size >= self.expected:
            self.done.callback(b"".join(self.received))


@inline
async def test_writes_go_out_at_once_and_in_order() -> None:
    expected = b"first" + BIG + b"second" + b"third"
    reader = Reader(len(expected))
    port = await TCP4ServerEndpoint(reactor, 0, interface=LOOPBACK).listen(
        Factory.forProtocol(lambda: reader)
    )
    writer = await TCP4ClientEndpoint(reactor, LOOPBACK, port.getHost().port).connect(
        Factory.forProtocol(Protocol)
    )
    transport: Any = writer.transport  # type: ignore[attr-defined]
    try:
        wire = EagerWire(transport)
        wire.write(b"first")
        assert not transport._tempDataLen and not transport.dataBuffer  # sent, not queued
        wire.write(BIG)
        assert transport._tempDataLen > 0  # the socket took part; the rest is queued
        wire.writeSequence([b"sec", b"ond"])
        wire.write(b"third")
        assert await reader.done == expected
    finally:
        transport.loseConnection()
        await port.stopListening()
