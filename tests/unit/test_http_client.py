"""
The lean client towards pods (L{kthena.http.client}), with no sockets: a memory reactor
records the connections it is asked for, and each is completed with a string transport
that plays the pod.
"""

from __future__ import annotations

from typing import Any, cast

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectionDone, ConnectionLost, ConnectionRefusedError
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone, ResponseFailed, ResponseNeverReceived
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IResponse
from zope.interface.verify import verifyObject

from kthena.config.documents import parse_pod
from kthena.config.router import RouterConfig
from kthena.config.traffic import UpstreamConfig, parse_upstream
from kthena.config.validate import ConfigError, Where
from kthena.failures import CONNECT_ERRORS
from kthena.http.client import LeanUpstream, request_bytes
from kthena.http.connection import PodConnection
from kthena.http.response import PodResponse
from kthena.interfaces import IReconfigurable, IServerReactor, IUpstream
from kthena.pods import PodEndpoint
from tests.unit.routerfixtures import pod

HOST = "10.0.0.1"
POD = PodEndpoint(
    key="default/p", pod=parse_pod(pod("p", HOST, {}), Where("t"), 0), host=HOST, port=8000
)
SIMPLE = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
CHUNKED = (
    b"HTTP/1.1 100 Continue\r\n\r\n"
    b"HTTP/1.1 200 Fine\r\nTransfer-Encoding: chunked\r\nX-A: 1\r\nX-A: 2\r\n\r\n"
    b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
)


class Body(Protocol):
    """A body's protocol that records what it was given."""

    def __init__(self) -> None:
        self.data: list[bytes] = []
        self.reason: Failure | None = None

    def dataReceived(self, data: bytes) -> None:
        self.data.append(data)

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:  # noqa: B008
        self.reason = reason

    @property
    def text(self) -> bytes:
        return b"".join(self.data)


class PodSide(StringTransport):
    """The pod's end of a connection: what the router wrote, and the router's protocol."""

    connection: PodConnection


class Harness:
    """A lean upstream on a memory reactor; C{accept} plays the pod taking a connection."""

    def __init__(self, **config: Any) -> None:
        self.reactor = MemoryReactorClock()
        self.upstream = LeanUpstream(cast(IServerReactor, self.reactor), UpstreamConfig(**config))
        self.accepted = 0

    def request(
        self, method: bytes = b"POST", body: bytes | None = b"{}", scheme: str = "http"
    ) -> Deferred[IResponse]:
        headers = Headers({b"Content-Type": [b"application/json"]})
        return self.upstream.request(POD, scheme, method, b"/v1/chat/completions", headers, body)

    def accept(self) -> PodSide:
        """Complete the next connection attempt; the pod's side of it."""
        factory = self.reactor.tcpClients[self.accepted][2]
        self.accepted += 1
        wrapper: Any = factory.buildProtocol(IPv4Address("TCP", HOST, 8000))
        transport = PodSide()
        wrapper.makeConnection(transport)
        transport.connection = wrapper._wrappedProtocol
        return transport


def answer(transport: PodSide, data: bytes) -> None:
    transport.connection.dataReceived(data)


def lose(transport: PodSide, error: Exception | None = None) -> None:
    transport.connection.connectionLost(Failure(error or ConnectionDone()))


def result(d: Deferred[IResponse]) -> IResponse:
    found: list[object] = []
    d.addBoth(found.append)
    assert found, "the request has no answer yet"
    value = found[0]
    if isinstance(value, Failure):
        value.raiseException()
    assert isinstance(value, PodResponse)
    return value


def failure_of(d: Deferred[IResponse]) -> BaseException:
    found: list[object] = []
    d.addBoth(found.append)
    assert found and isinstance(found[0], Failure), found
    error = found[0].value
    assert error is not None
    return error


def closing(transport: StringTransport) -> bool:
    return bool(transport.disconnecting)


def fired(d: Deferred[None]) -> bool:
    return bool(d.called)


def read(response: IResponse) -> Body:
    body = Body()
    response.deliverBody(body)
    return body


# -- the request


def test_request_bytes_are_exact() -> None:
    h = Harness()
    h.request(body=b'{"a":1}')
    transport = h.accept()
    assert transport.value() == (
        b"POST /v1/chat/completions HTTP/1.1\r\n"
        b"Host: 10.0.0.1:8000\r\n"
        b"Content-Type: application/json\r\n"
        b'Content-Length: 7\r\n\r\n{"a":1}'
    )


def test_host_leaves_out_the_default_port_and_a_missing_body_has_no_length() -> None:
    data = request_bytes(b"GET", b"/x?y=1", b"pod", Headers({b"a": [b"1", b"2"]}), None)
    assert data == b"GET /x?y=1 HTTP/1.1\r\nHost: pod\r\nA: 1\r\nA: 2\r\n\r\n"


# -- answers


def test_a_content_length_answer() -> None:
    h = Harness()
    d = h.request()
    answer(h.accept(), SIMPLE)
    response = result(d)
    assert (response.code, response.phrase, response.length) == (200, b"OK", 2)
    assert response.version == (b"HTTP", 1, 1)
    assert response.headers.getRawHeaders(b"content-type") == [b"application/json"]
    assert (response.request, response.previousResponse) == (None, None)
    body = read(response)
    assert body.text == b"{}"
    assert body.reason is not None and body.reason.check(ResponseDone)


def test_the_response_provides_iresponse() -> None:
    h = Harness()
    d = h.request()
    answer(h.accept(), SIMPLE)
    response = result(d)
    assert verifyObject(IResponse, response)
    response.setPreviousResponse(response)
    assert response.previousResponse is response


def test_a_chunked_answer_after_an_interim_one() -> None:
    h = Harness()
    d = h.request()
    answer(h.accept(), CHUNKED)
    response = result(d)
    assert (response.code, response.phrase, response.length) == (200, b"Fine", UNKNOWN_LENGTH)
    assert response.headers.getRawHeaders(b"x-a") == [b"1", b"2"]
    body = read(response)
    assert body.text == b"hello world"
    assert body.reason is not None and body.reason.check(ResponseDone)


def test_a_close_delimited_answer_ends_with_potential_data_loss() -> None:
    h = Harness()
    d = h.request()
    transport = h.accept()
    answer(transport, b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n{")
    response = result(d)
    assert response.length is UNKNOWN_LENGTH
    body = read(response)
    answer(transport, b"}")
    lose(transport)
    assert body.text == b"{}"
    assert body.reason is not None and body.reason.check(PotentialDataLoss)
    assert h.upstream.idle_connections(POD) == 0


@pytest.mark.parametrize("wire", [SIMPLE, CHUNKED], ids=["length", "chunked"])
def test_an_answer_split_at_every_byte(wire: bytes) -> None:
    for cut in range(1, len(wire)):
        h = Harness()
        d = h.request()
        transport = h.accept()
        answer(transport, wire[:cut])
        answer(transport, wire[cut:])
        response = result(d)
        assert response.code == 200
        body = read(response)
        assert body.text == (b"{}" if wire is SIMPLE else b"hello world"), cut
        assert body.reason is not None and body.reason.check(ResponseDone), cut
        assert h.upstream.idle_connections(POD) == 1, cut


def test_a_head_answer_has_no_body() -> None:
    h = Harness()
    d = h.request(b"HEAD", None)
    transport = h.accept()
    answer(transport, b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n")
    response = result(d)
    assert response.length == 0
    body = read(response)
    assert body.text == b""
    assert body.reason is not None and body.reason.check(ResponseDone)


def test_a_malformed_answer_fails_and_closes() -> None:
    h = Harness()
    d = h.request()
    transport = h.accept()
    answer(transport, b"HTTP/1.1 two hundred\r\n\r\n")
    assert isinstance(failure_of(d), ResponseNeverReceived)
    assert transport.disconnecting


def test_a_connection_broken_mid_body_fails_the_body() -> None:
    h = Harness()
    d = h.request()
    transport = h.accept()
    answer(transport, b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
    body = read(result(d))
    lose(transport, ConnectionLost())
    assert body.text == b"abc"
    assert body.reason is not None and body.reason.check(ResponseFailed)
    assert h.upstream.idle_connections(POD) == 0


def test_the_pod_is_paused_resumed_and_stopped_through_the_body() -> None:
    h = Harness()
    d = h.request()
    transport = h.accept()
    answer(transport, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\n")
    body = read(result(d))
    assert body.transport is not None
    body.transport.pauseProducing()  # type: ignore[attr-defined]
    assert transport.producerState == "paused"
    body.transport.resumeProducing()  # type: ignore[attr-defined]
    assert transport.producerState == "producing"
    body.transport.stopProducing()  # type: ignore[attr-defined]
    lose(transport, ConnectionLost())  # the abort, as the reactor reports it
    assert body.reason is not None and body.reason.check(ResponseFailed)


def test_a_paused_body_that_ends_resumes_the_pooled_connection() -> None:
    h = Harness()
    d = h.request()
    transport = h.accept()
    answer(transport, b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nab")
    body = read(result(d))
    body.transport.pauseProducing()  # type: ignore[union-attr]
    answer(transport, b"cd")
    assert transport.producerState == "producing"
    assert h.upstream.idle_connections(POD) == 1
    body.transport.pauseProducing()  # type: ignore[union-attr]
    assert transport.producerState == "producing"  # no longer the body's to pause


# -- the pool


def test_keep_alive_reuses_the_connection() -> None:
    h = Harness()
    first = h.request()
    transport = h.accept()
    answer(transport, SIMPLE)
    read(result(first))
    assert h.upstream.idle_connections(POD) == 1
    transport.clear()
    second = h.request()
    assert h.upstream.idle_connections(POD) == 0
    assert transport.value().startswith(b"POST /v1/chat/completions HTTP/1.1\r\n")
    answer(transport, SIMPLE)
    assert read(result(second)).text == b"{}"
    assert len(h.reactor.tcpClients) == 1


def test_connection_close_is_not_reused() -> None:
    h = Harness()
    d = h.request()
    transport = h.accept()
    answer(transport, b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n")
    read(result(d))
    assert transport.disconnecting
    assert h.upstream.idle_connections(POD) == 0
    h.request()
    assert len(h.reactor.tcpClients) == 2


def test_idle_connections_are_capped_per_pod() -> None:
    h = Harness(max_connections_per_pod=1)
    pending = [h.request(), h.request()]
    transports = [h.accept(), h.accept()]
    for d, transport in zip(pending, transports, strict=True):
        answer(transport, SIMPLE)
        read(result(d))
    assert h.upstream.idle_connections(POD) == 1
    assert [t.disconnecting for t in transports] == [True, False]  # the oldest went


def test_idle_connections_close_after_the_pool_idle_timeout() -> None:
    h = Harness(pool_idle_timeout=4.0)
    d = h.request()
    transport = h.accept()
    answer(transport, SIMPLE)
    read(result(d))
    h.reactor.advance(3.9)
    assert not closing(transport)
    h.reactor.advance(0.2)
    assert closing(transport)
    assert h.upstream.idle_connections(POD) == 0
    assert not h.reactor.getDelayedCalls()


def test_close_closes_idle_connections() -> None:
    h = Harness()
    d = h.request()
    transport = h.accept()
    answer(transport, SIMPLE)
    read(result(d))
    closed = h.upstream.close()
    assert transport.disconnecting
    assert not fired(closed)
    lose(transport)
    assert fired(closed)
    assert not h.reactor.getDelayedCalls()


def test_a_stale_pooled_connection_is_retried_once_on_a_fresh_one() -> None:
    h = Harness()
    first = h.request()
    stale = h.accept()
    answer(stale, SIMPLE)
    read(result(first))
    second = h.request()
    lose(stale)  # the pod had closed it: not a byte of an answer
    assert not second.called or isinstance(second.result, Deferred)  # waits on a new one
    fresh = h.accept()
    assert fresh.value().startswith(b"POST /v1/chat/completions HTTP/1.1\r\n")
    answer(fresh, SIMPLE)
    assert result(second).code == 200


def test_a_fresh_connection_closing_unanswered_is_not_retried() -> None:
    h = Harness()
    d = h.request()
    lose(h.accept())
    assert isinstance(failure_of(d), ResponseNeverReceived)
    assert len(h.reactor.tcpClients) == 1


# -- connecting and cancelling


def test_a_refused_connection_is_a_connect_error() -> None:
    h = Harness()
    d = h.request()
    factory: Any = h.reactor.tcpClients[0][2]
    factory.clientConnectionFailed(None, Failure(ConnectionRefusedError()))
    error = failure_of(d)
    assert isinstance(error, ConnectionRefusedError)
    assert isinstance(error, CONNECT_ERRORS)


def test_the_connect_timeout_is_the_configured_one() -> None:
    h = Harness(connect_timeout=1.5)
    h.request()
    assert h.reactor.tcpClients[0][:2] == (HOST, 8000)
    assert h.reactor.tcpClients[0][3] == 1.5


def test_cancelling_before_the_head_aborts_the_connection() -> None:
    h = Harness()
    d = h.request()
    transport = h.accept()
    answer(transport, b"HTTP/1.1 200 OK\r\n")
    d.cancel()
    assert isinstance(failure_of(d), CancelledError)
    assert transport.disconnecting
    lose(transport, ConnectionLost())
    assert h.upstream.idle_connections(POD) == 0


def test_cancelling_while_connecting_is_a_cancel() -> None:
    h = Harness()
    d = h.request()
    d.cancel()
    assert isinstance(failure_of(d), CancelledError)
    assert h.reactor.connectors[0].stoppedConnecting


# -- the service


def test_the_upstream_provides_its_interfaces() -> None:
    upstream = Harness().upstream
    assert verifyObject(IUpstream, upstream)
    assert verifyObject(IReconfigurable, upstream)


def test_reconfigure_takes_the_pool_settings() -> None:
    h = Harness()
    config = RouterConfig(upstream=UpstreamConfig(max_connections_per_pod=3, connect_timeout=2))
    h.upstream.reconfigure(config)
    assert (h.upstream.pool.max_idle, h.upstream.endpoints.connect_timeout) == (3, 2)


def test_the_client_switch() -> None:
    assert UpstreamConfig().client == "lean"
    assert parse_upstream({"client": "twisted"}, Where("upstream")).client == "twisted"
    assert parse_upstream({"client": "lean"}, Where("upstream")).client == "lean"
    with pytest.raises(ConfigError, match="client"):
        parse_upstream({"client": "fast"}, Where("upstream"))
