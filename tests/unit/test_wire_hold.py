"""
Writes held while a pod's read is handled (L{kthena.http.wire.hold}): what the router
writes meanwhile goes out as one write a connection once the read is done, in order; a
connection closed meanwhile sends what it holds first, one aborted drops it. A pod's read
holds the client's writes (a stream's head, events and end) until it is handled.
"""

from __future__ import annotations

from twisted.internet.protocol import Protocol
from twisted.internet.testing import StringTransport

from kthena.http.wire import EagerWire, hold, release
from tests.unit.test_http_client import Harness, answer


class Writes(StringTransport):
    """A transport that keeps each write apart."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(data)
        super().write(data)


def test_writes_in_a_hold_go_as_one_write_a_wire_when_released() -> None:
    a, b = Writes(), Writes()
    wa, wb = EagerWire(a), EagerWire(b)
    assert hold()
    wa.write(b"head ")
    wb.write(b"other")
    wa.writeSequence([b"body ", b"end"])
    assert a.writes == [] and b.writes == []
    release()
    assert a.writes == [b"head body end"] and b.writes == [b"other"]
    wa.write(b"after")  # no hold: at once
    assert a.writes[-1] == b"after"


def test_a_hold_inside_a_hold_is_the_outer_ones() -> None:
    t = Writes()
    wire = EagerWire(t)
    assert hold()
    assert not hold()  # nested: the outer call releases
    wire.write(b"x")
    assert t.writes == []
    release()
    assert t.writes == [b"x"]


def test_a_close_in_a_hold_sends_what_is_held_first_and_an_abort_drops_it() -> None:
    closed, aborted = Writes(), Writes()
    wc, wa = EagerWire(closed), EagerWire(aborted)
    assert hold()
    wc.write(b"last words")
    wc.loseConnection()
    assert closed.writes == [b"last words"] and closed.disconnecting
    wa.write(b"never")
    wa.abortConnection()
    release()
    assert aborted.writes == [] and aborted.disconnected
    assert closed.writes == [b"last words"]  # not sent twice


class Forward(Protocol):
    """A body protocol writing what it gets to the client's wire, as the relay does."""

    def __init__(self, wire: EagerWire) -> None:
        self.wire = wire

    def dataReceived(self, data: bytes) -> None:
        self.wire.write(data)

    def connectionLost(self, reason: object = None) -> None:
        self.wire.write(b"<end>")


def test_what_a_pods_read_makes_the_router_write_goes_once_the_read_is_handled() -> None:
    client = Writes()
    wire = EagerWire(client)
    h = Harness()
    d = h.request()
    pod_side = h.accept()
    d.addCallback(lambda response: response.deliverBody(Forward(wire)))
    answer(
        pod_side,
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"7\r\nevent 1\r\n7\r\nevent 2\r\n0\r\n\r\n",
    )
    assert client.writes == [b"event 1event 2<end>"]
