"""
The lean HTTP/1.1 server on its own (no pipeline): framing both ways, keep-alive and
pipelining, the client deadlines and limits, the smuggling shapes, backpressure and
disconnects. The pipeline on top of it is checked by the proxy tests run with
C{KTHENA_TEST_SERVER=lean}.
"""

from __future__ import annotations

import json

from twisted.internet.address import UNIXAddress
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IPushProducer
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from zope.interface import implementer
from zope.interface.verify import verifyObject

from kthena.config.traffic import DownstreamConfig
from kthena.http.exchange import LeanExchange
from kthena.http.server import HELD_LIMIT, LeanChannel, LeanSite
from kthena.interfaces import IExchange
from kthena.record import RequestRecord
from tests.unit.proxyfixtures import parse_response

DATE = b"date: Thu, 01 Jan 1970 00:00:00 GMT\r\n"
GET = b"GET /v1/models HTTP/1.1\r\nHost: r\r\n\r\n"


class Server:
    """A lean site whose requests the test answers by hand, and one client connection."""

    def __init__(
        self,
        cap: int = 1000,
        header_timeout: float = 10,
        body_timeout: float = 60,
        idle_timeout: float = 60,
    ) -> None:
        self.clock = MemoryReactorClock()
        self.exchanges: list[LeanExchange] = []
        self.refused: list[RequestRecord] = []
        self.site = LeanSite(
            self.exchanges.append,  # type: ignore[arg-type]
            cap,
            self.clock,
            DownstreamConfig(header_timeout, body_timeout, idle_timeout, "lean"),
            self.refused.append,
        )
        self.transport = StringTransport()
        self.channel = self.site.buildProtocol(None)
        self.channel.makeConnection(self.transport)

    def send(self, data: bytes) -> None:
        self.channel.dataReceived(data)

    @property
    def last(self) -> LeanExchange:
        assert self.exchanges, self.transport.value()
        return self.exchanges[-1]

    def take(self) -> bytes:
        value: bytes = self.transport.value()
        self.transport.clear()
        return value

    def closed(self) -> bool:
        return bool(self.transport.disconnecting)

    def error(self, status: int) -> dict[str, object]:
        response = parse_response(self.transport.value())
        assert response is not None and response.status == status, self.transport.value()
        assert response.header("connection") == "close"
        assert self.closed()
        (record,) = self.refused
        assert record.status == status
        error: dict[str, object] = response.json()["error"]
        return error


def ok(exchange: LeanExchange, body: bytes = b'{"ok":true}') -> None:
    exchange.answer(200, body, [(b"x-request-id", b"r1")])


def test_exchange_provides_the_interface() -> None:
    s = Server()
    s.send(GET)
    assert verifyObject(IExchange, s.last)
    e = s.last
    assert (e.method, e.path, e.uri, e.protocol) == (
        b"GET",
        b"/v1/models",
        b"/v1/models",
        "HTTP/1.1",
    )
    assert e.header(b"host") == b"r"
    assert e.headers.getRawHeaders(b"Host") == [b"r"]
    assert (e.body(), e.too_large, e.started) == (b"", False, False)


def test_query_kept_in_the_uri_only() -> None:
    s = Server()
    s.send(b"GET /healthz?verbose=1 HTTP/1.1\r\n\r\n")
    assert (s.last.path, s.last.uri) == (b"/healthz", b"/healthz?verbose=1")


def test_whole_answer_has_a_length_and_a_date() -> None:
    s = Server()
    s.send(GET)
    ok(s.last)
    assert s.take() == (
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 11\r\n"
        b"x-request-id: r1\r\n" + DATE + b"\r\n" + b'{"ok":true}'
    )
    assert s.last.started and s.last.ended
    assert not s.closed()


def test_answer_headers_replace_ours() -> None:
    s = Server()
    s.send(GET)
    s.last.answer(200, b"x", [(b"Content-Type", b"text/plain")])
    response = parse_response(s.take())
    assert response is not None
    assert response.values("content-type") == ["text/plain"]


def test_keep_alive_serves_requests_in_turn() -> None:
    s = Server()
    for _ in range(3):
        s.send(GET)
        ok(s.last)
    assert s.take().count(b"HTTP/1.1 200 OK") == 3
    assert len(s.exchanges) == 3
    assert not s.closed()


def test_pipelined_requests_answered_in_order() -> None:
    s = Server()
    s.send(b"GET /one HTTP/1.1\r\n\r\nGET /two HTTP/1.1\r\n\r\n")
    assert [e.path for e in s.exchanges] == [b"/one"]  # the second waits for the first
    first = s.exchanges[0]
    first.begin(200, b"OK", [])
    first.write(b"first")
    s.clock.advance(30)  # the second head is whole: no deadline runs for it
    first.finish()
    assert [e.path for e in s.exchanges] == [b"/one", b"/two"]
    ok(s.exchanges[1])
    raw = s.take()
    assert raw.index(b"first") < raw.index(b'{"ok":true}')
    assert s.refused == []


def test_a_request_arriving_while_one_is_answered_waits() -> None:
    s = Server()
    s.send(GET)
    s.send(b"GET /two HTTP/1.1\r\n")
    s.clock.advance(20)  # held unparsed: its head deadline starts when its turn comes
    s.send(b"\r\n")
    assert len(s.exchanges) == 1
    ok(s.exchanges[0])
    assert [e.path for e in s.exchanges] == [b"/v1/models", b"/two"]


def test_reading_pauses_while_much_is_held() -> None:
    s = Server(cap=2 * HELD_LIMIT)
    s.send(GET)
    body = b"x" * (HELD_LIMIT + 1)
    s.send(b"POST /two HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    assert s.transport.producerState == "paused"
    ok(s.last)
    assert s.transport.producerState == "producing"
    assert s.last.body() == body


def test_chunked_request_body() -> None:
    s = Server()
    s.send(b"POST /v1/completions HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n")
    s.send(b"5\r\nhello\r\n")
    s.send(b"6\r\n world\r\n0\r\n\r\n")
    assert s.last.body() == b"hello world"
    assert not s.last.too_large


def test_body_over_the_cap_is_dropped_and_the_connection_kept() -> None:
    s = Server(cap=10)
    s.send(b"POST /v1/completions HTTP/1.1\r\nContent-Length: 20\r\n\r\n" + b"y" * 20)
    assert (s.last.too_large, s.last.body()) == (True, b"")
    ok(s.last)
    s.send(b"POST /v1/completions HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n")
    s.send(b"8\r\n12345678\r\n8\r\n12345678\r\n0\r\n\r\n")
    assert (s.last.too_large, s.last.body()) == (True, b"")
    assert not s.closed()


def test_expect_100_continue() -> None:
    s = Server()
    s.send(b"POST /v1/completions HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n")
    assert s.take() == b"HTTP/1.1 100 Continue\r\n\r\n"
    assert s.exchanges == []
    s.send(b"{}")
    assert s.last.body() == b"{}"


def test_expect_100_continue_with_a_body_over_the_cap_is_answered_at_once() -> None:
    s = Server(cap=10)
    s.send(b"POST /v1/completions HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 99\r\n\r\n")
    assert s.last.too_large
    s.last.answer(413, b"{}", [])
    raw = s.take()
    assert raw.startswith(b"HTTP/1.1 413 Request Entity Too Large\r\n")
    assert b"100 Continue" not in raw and b"connection: close\r\n" in raw
    assert s.closed()  # the body may or may not follow: the connection cannot be reused


def test_a_head_sent_byte_by_byte_gets_408() -> None:
    s = Server(header_timeout=10)
    for byte in b"POST /v1/chat/completions HTTP/1.1\r\nX-Slow: ":  # 45 bytes in 9 s
        s.send(bytes([byte]))
        s.clock.advance(0.2)
    assert s.transport.value() == b""
    s.clock.advance(10 - s.clock.seconds())
    error = s.error(408)
    assert error["message"] == "the request head did not arrive within 10s"
    (record,) = s.refused
    assert (record.method, record.path) == ("POST", "/v1/chat/completions")
    assert (record.started, record.finished) == (0, 10)


def test_a_body_that_never_arrives_gets_408() -> None:
    s = Server(body_timeout=30)
    s.send(b"POST /v1/completions HTTP/1.1\r\nContent-Length: 10\r\n\r\n12345")
    s.clock.advance(30)
    assert s.error(408)["message"] == "the request body did not arrive within 30s"
    assert s.exchanges == []


def test_an_idle_connection_closes_quietly() -> None:
    s = Server(idle_timeout=5)
    s.send(GET)
    ok(s.last)
    s.take()
    s.clock.advance(4)
    assert not s.closed()
    s.clock.advance(1)
    assert s.closed() and s.take() == b"" and s.refused == []


def test_an_over_long_request_line_is_414() -> None:
    s = Server()
    s.send(b"GET /v1/models/" + b"x" * 20_000 + b" HTTP/1.1\r\n")
    s.error(414)
    (record,) = s.refused
    assert record.method == "GET" and len(record.path) == 256


def test_an_over_long_head_is_431() -> None:
    s = Server()
    s.send(b"GET / HTTP/1.1\r\n" + b"".join(b"X-%d: %s\r\n" % (i, b"y" * 100) for i in range(200)))
    s.error(431)


def test_one_huge_header_line_is_431() -> None:
    s = Server()
    s.send(b"GET / HTTP/1.1\r\nHost: r\r\nX-Big: " + b"y" * 20_000)
    s.error(431)


def test_a_head_under_the_limit_in_pieces_is_served() -> None:
    s = Server()
    head = b"GET / HTTP/1.1\r\n" + b"".join(b"X-%d: %s\r\n" % (i, b"y" * 100) for i in range(110))
    data = head + b"\r\n"
    assert 11_000 < len(data) < 16 * 1024
    for i in range(0, len(data), 4000):
        s.send(data[i : i + 4000])
    assert len(s.exchanges) == 1 and s.refused == []


def test_an_endless_header_line_in_pieces_is_431() -> None:
    s = Server()
    s.send(b"GET / HTTP/1.1\r\nX-Big: ")
    for _ in range(5):
        s.send(b"y" * 4000)
    s.error(431)


def test_an_endless_request_line_in_pieces_is_414() -> None:
    s = Server()
    s.send(b"GET /")
    for _ in range(5):
        s.send(b"x" * 4000)
    s.error(414)


def test_a_malformed_request_line_is_400() -> None:
    s = Server()
    s.send(b"GARBAGE\r\n\r\n")
    assert s.error(400)["message"] == "malformed HTTP request"
    assert s.exchanges == []


def test_content_length_with_transfer_encoding_is_400() -> None:
    s = Server()
    s.send(
        b"POST / HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"0\r\n\r\nGET /smuggled HTTP/1.1\r\n\r\n"
    )
    s.error(400)
    assert s.exchanges == []


def test_two_content_lengths_are_400() -> None:
    s = Server()
    s.send(b"POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 12\r\n\r\nhello")
    s.error(400)
    assert s.exchanges == []


def test_bad_chunk_framing_is_400() -> None:
    s = Server()
    s.send(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcX\r\n")
    s.error(400)


def test_a_refusal_after_a_pipelined_request_waits_its_turn() -> None:
    s = Server()
    s.send(GET + b"BAD\r\n\r\n")
    assert s.take() == b""
    ok(s.last)
    raw = s.transport.value()
    assert raw.index(b"200 OK") < raw.index(b"400 Bad Request")
    assert s.closed()


def test_connection_close_from_the_client() -> None:
    s = Server()
    s.send(b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n" + GET)
    ok(s.last)
    assert b"connection: close\r\n" in s.take()
    assert s.closed() and len(s.exchanges) == 1


def test_connection_close_from_the_pipeline() -> None:
    s = Server()
    s.send(GET)
    s.last.answer(503, b"{}", [(b"connection", b"close")])
    assert s.take().count(b"connection: close") == 1
    assert s.closed()


def test_http_10_stream_is_not_chunked_and_ends_with_the_close() -> None:
    s = Server()
    s.send(b"GET /stream HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    e = s.last
    assert e.protocol == "HTTP/1.0"
    e.begin(200, b"OK", [(b"content-type", [b"text/event-stream"])])
    e.write(b"data: 1\n\n")
    e.finish()
    assert s.take() == (
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n" + DATE
        + b"connection: close\r\n\r\ndata: 1\n\n"
    )  # fmt: skip
    assert s.closed()


def test_http_10_keep_alive_with_a_length() -> None:
    s = Server()
    s.send(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    ok(s.last)
    assert b"connection: keep-alive\r\n" in s.take()
    assert not s.closed()
    s.send(b"GET / HTTP/1.0\r\n\r\n")
    ok(s.last)
    assert b"connection: close\r\n" in s.take()
    assert s.closed()


def test_head_gets_the_head_only() -> None:
    s = Server()
    s.send(b"HEAD /healthz HTTP/1.1\r\n\r\n")
    ok(s.last)
    raw = s.take()
    assert raw.endswith(b"\r\n\r\n") and b"content-length: 11\r\n" in raw
    s.send(b"HEAD /stream HTTP/1.1\r\n\r\n")
    s.last.begin(200, b"OK", [])
    s.last.write(b"data")
    s.last.finish()
    raw = s.take()
    assert b"transfer-encoding" not in raw and raw.endswith(b"\r\n\r\n")
    assert not s.closed()


def test_streamed_response_is_chunked_byte_exact() -> None:
    s = Server()
    s.send(GET)
    e = s.last
    e.begin(201, b"Made", [(b"x-a", [b"1", b"2"]), (b"date", [b"pod's"]), (b"x-a", [b"3"])])
    e.write(b"")
    assert (
        s.take()
        == b"HTTP/1.1 201 Made\r\nx-a: 3\r\ndate: pod's\r\ntransfer-encoding: chunked\r\n\r\n"
    )
    e.write(b"hello")
    e.write(b"")
    e.write(b"x" * 26)
    e.finish()
    assert s.take() == b"5\r\nhello\r\n1a\r\n" + b"x" * 26 + b"\r\n0\r\n\r\n"
    assert not s.closed()


@implementer(IPushProducer)
class Producer:
    def __init__(self) -> None:
        self.state = "producing"

    def pauseProducing(self) -> None:
        self.state = "paused"

    def resumeProducing(self) -> None:
        self.state = "producing"

    def stopProducing(self) -> None:
        self.state = "stopped"


def test_a_registered_producer_follows_the_client_transport() -> None:
    s = Server()
    s.send(GET)
    producer = Producer()
    s.last.register_producer(producer)
    assert s.transport.producer is producer and s.transport.streaming
    s.transport.producer.pauseProducing()  # the client's write buffer filled up
    assert producer.state == "paused"
    s.transport.producer.resumeProducing()
    assert producer.state == "producing"
    s.last.unregister_producer()
    assert not s.transport.producer
    s.last.register_producer(producer)
    ok(s.last)  # a producer still registered at the end is let go
    assert s.transport.producer is None


def test_when_gone_on_disconnect_before_the_end() -> None:
    s = Server()
    s.send(GET)
    called: list[str] = []
    s.last.when_gone(lambda: called.append("gone"))
    s.last.register_producer(Producer())
    s.channel.connectionLost(Failure(ConnectionDone()))
    assert called == ["gone"] and s.last.gone
    s.last.unregister_producer()  # nothing to undo: the connection is gone
    s.last.write(b"late")
    s.last.finish()
    assert s.transport.value() == b""


def test_when_gone_not_called_after_the_end() -> None:
    s = Server()
    s.send(GET)
    called: list[str] = []
    s.last.when_gone(lambda: called.append("gone"))
    ok(s.last)
    s.channel.connectionLost(Failure(ConnectionDone()))
    assert called == []


def test_abort_drops_the_connection() -> None:
    s = Server()
    s.send(GET)
    s.last.abort()
    assert s.transport.disconnected


def test_client_host() -> None:
    s = Server()
    s.send(GET)
    assert s.last.client_host == "192.168.1.1"  # StringTransport's peer
    site = s.site
    local = site.buildProtocol(None)
    assert isinstance(local, LeanChannel)
    local.makeConnection(StringTransport(peerAddress=UNIXAddress(None)))
    local.dataReceived(GET)
    assert s.exchanges[-1].client_host is None


def test_refusal_body_is_an_openai_error() -> None:
    s = Server()
    s.send(b"GARBAGE\r\n\r\n")
    response = parse_response(s.transport.value())
    assert response is not None
    body = json.loads(response.body)
    assert body["error"]["code"] == "bad_request"
    assert response.header("x-request-id") == s.refused[0].request_id
