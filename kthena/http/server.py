"""
The lean HTTP/1.1 server protocol (C{LeanChannel}) and its factory (L{LeanSite}): requests
parsed by C{httptools}, each handed whole (head and body) to the pipeline as a
L{LeanExchange}, with the same deadlines and limits as twisted.web's L{ProxyChannel}:

  - the head must arrive within C{downstream.headerTimeout} of its first byte, the body
    within C{downstream.bodyTimeout} of the head (408); an idle keep-alive connection
    closes after C{downstream.idleTimeout};
  - a request line over L{HEAD_LIMIT} is 414, a head over it 431, anything llhttp rejects
    400: malformed heads, bad chunk framing, and the smuggling shapes (C{Content-Length}
    with C{Transfer-Encoding}, two C{Content-Length}s).

Pipelining: one request is answered at a time, in order. What arrives meanwhile is held
unparsed (reading pauses once that passes L{HELD_LIMIT}), as twisted.web does; reading
goes on below that so that a client that leaves is noticed at once.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from httptools import HttpParserUpgrade, HttpRequestParser
from twisted.internet.interfaces import IReactorTime, ITCPTransport
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure

from kthena.config.traffic import DownstreamConfig
from kthena.errors import ErrorType
from kthena.http.deadline import Deadline
from kthena.http.exchange import LeanExchange, Wire
from kthena.http.head import CONTINUE, DateCache
from kthena.http.incoming import Incoming, Refusal, StopParsingError
from kthena.http.refusal import HEAD_LIMIT, SHOWN_PATH, refusal
from kthena.http.wire import EagerWire
from kthena.interfaces import IExchange
from kthena.record import RequestRecord

HELD_LIMIT = 16 * 1024
"""Bytes read ahead while a request is answered before reading pauses (twisted.web's)."""


def _unrecorded(record: RequestRecord) -> None:
    pass


class LeanSite(Factory):
    """
    @ivar handle: the pipeline's entry, given each request.
    @ivar max_body_bytes: bodies over this are dropped (C{too_large}); read per request.
    @ivar downstream: the clients' deadlines (a reload changes them for new requests).
    @ivar refused: told of each request the server answered itself (408, 414, 431, 400).
    """

    noisy = False

    def __init__(
        self,
        handle: Callable[[IExchange], None],
        max_body_bytes: int,
        clock: IReactorTime,
        downstream: DownstreamConfig | None = None,
        refused: Callable[[RequestRecord], None] = _unrecorded,
    ) -> None:
        self.handle = handle
        self.max_body_bytes = max_body_bytes
        self.clock = clock
        self.downstream = downstream or DownstreamConfig()
        self.refused = refused
        self.dates = DateCache()

    def buildProtocol(self, addr: object) -> LeanChannel:
        return LeanChannel(self)


class LeanChannel(Protocol):
    """One client connection (see the module docstring)."""

    def __init__(self, site: LeanSite) -> None:
        self.site = site
        self.client_host: str | None = None
        self._parser = HttpRequestParser(self)
        self._incoming: Incoming | None = None
        self._ready: deque[LeanExchange | Refusal] = deque()
        self._current: LeanExchange | None = None
        self._held: list[bytes] = []
        self._held_size = 0
        self._paused = False
        self._parsing = True
        """False once a refusal is queued or the client wants no more requests read."""
        self._closing = False
        self._advancing = False
        self._deadline = Deadline(site.clock)

    @property
    def wire(self) -> Wire:
        return self._wire

    def date(self) -> bytes:
        return self.site.dates.value(self.site.clock.seconds())

    # -- the connection

    def connectionMade(self) -> None:
        assert self.transport is not None
        # Streamed events are small writes: Nagle plus delayed ACKs would hold each back.
        tcp = ITCPTransport(self.transport, None)
        if tcp is not None:
            tcp.setTcpNoDelay(True)
        # A UNIX peer has no host: None, as for twisted.web's requests.
        self.client_host = getattr(self.transport.getPeer(), "host", None)
        self._wire = EagerWire(self.transport)
        self._deadline.set(self.site.downstream.idle_timeout, self._close)

    def dataReceived(self, data: bytes) -> None:
        if self._closing:
            return
        if self._current is not None or self._ready:
            self._held.append(data)
            self._held_size += len(data)
            if self._held_size > HELD_LIMIT and not self._paused:
                self._paused = True
                self.transport.pauseProducing()  # type: ignore[union-attr]
            return
        self._feed(data)
        self._advance()

    def connectionLost(self, reason: Failure | None = None) -> None:
        self._closing = True
        # The parser calls this channel back: the pair would be a cycle, left to the cyclic
        # collector, on every closed connection. Nothing parses once closing.
        del self._parser
        self._deadline.stop()
        self._ready.clear()
        self._held.clear()
        current, self._current = self._current, None
        if current is not None:
            current.lost()

    def ended(self, exchange: LeanExchange, keep_alive: bool) -> None:
        self._current = None
        if not keep_alive or (not self._parsing and not self._ready):
            self._close()
        elif not self._advancing:
            self._advance()

    # -- parsing

    def _feed(self, data: bytes) -> None:
        if not self._parsing:
            return
        before = self._incoming
        head_going = before is not None and not before.head_done
        try:
            self._parser.feed_data(data)
        except StopParsingError:
            pass
        except HttpParserUpgrade:  # not served: answer what came, then close
            self._parsing = False
        except Exception as error:
            # A refusal raised in a callback comes back as a callback error.
            if not isinstance(error.__context__, StopParsingError):
                self._refuse(400, ErrorType.BAD_REQUEST, "malformed HTTP request")
        else:
            incoming = self._incoming
            if incoming is None or incoming.head_done:
                return
            incoming.line_done = incoming.line_done or b"\n" in data
            # Bytes of a head still coming: httptools holds a header line until it ends,
            # so an endless one is only seen here. A head that began in this read after
            # another request's end is counted by the callbacks only (where it began in
            # C{data} is not known).
            if before is None or (head_going and incoming is before):
                incoming.received += len(data)
                if incoming.received > HEAD_LIMIT:
                    self._head_too_large(incoming)

    def on_message_begin(self) -> None:
        now = self.site.clock.seconds()
        self._incoming = Incoming(now)
        if self._first_in_line():
            self._deadline.set(self.site.downstream.header_timeout, self._head_timed_out)

    def on_url(self, url: bytes) -> None:
        incoming = self._incoming
        assert incoming is not None
        incoming.method = self._parser.get_method()
        incoming.url += url
        if len(incoming.url) > HEAD_LIMIT:
            self._parsing = False
            refused = Refusal(
                414, ErrorType.URI_TOO_LONG, f"the request line is over {HEAD_LIMIT} bytes", None
            )
            refused.method, refused.path = incoming.method[:16], incoming.url[:SHOWN_PATH]
            refused.started = incoming.started
            self._ready.append(refused)
            raise StopParsingError

    def on_header(self, name: bytes, value: bytes) -> None:
        incoming = self._incoming
        assert incoming is not None
        incoming.line_done = True
        incoming.head_size += len(name) + len(value) + 4
        if incoming.head_size > HEAD_LIMIT:
            self._head_too_large(incoming)
            raise StopParsingError
        incoming.headers.addRawHeader(name, value)

    def on_headers_complete(self) -> None:
        incoming = self._incoming
        assert incoming is not None
        parser = self._parser
        incoming.head_done = True
        incoming.version = parser.get_http_version().encode("ascii")
        incoming.keep_alive = parser.should_keep_alive()
        headers = incoming.headers
        length = headers.getRawHeaders(b"content-length")
        if length and int(length[0]) > self.site.max_body_bytes:
            incoming.too_large = True
        chunked = headers.hasHeader(b"transfer-encoding")
        body = chunked or (length is not None and length[0] != b"0")
        first = self._first_in_line()
        if first:
            self._deadline.clear()
        if not body:
            return
        expect = headers.getRawHeaders(b"expect")
        if expect and expect[0].lower() == b"100-continue" and incoming.version == b"1.1":
            if incoming.too_large:  # refused at once: the client need not send the body
                incoming.keep_alive = False
                self._parsing = False
                self._ready.append(self._exchange(incoming))
                raise StopParsingError
            if first:
                self.wire.write(CONTINUE)
        if first:
            self._deadline.set(self.site.downstream.body_timeout, self._body_timed_out)

    def on_body(self, data: bytes) -> None:
        incoming = self._incoming
        assert incoming is not None
        if incoming.too_large:
            return
        incoming.body_size += len(data)
        if incoming.body_size > self.site.max_body_bytes:
            incoming.too_large = True
            incoming.body = []
        else:
            incoming.body.append(data)

    def on_message_complete(self) -> None:
        incoming, self._incoming = self._incoming, None
        assert incoming is not None
        if self._first_in_line():
            self._deadline.clear()
        self._ready.append(self._exchange(incoming))
        if not incoming.keep_alive:  # the client sends no more requests (or none we read)
            self._parsing = False

    def _exchange(self, incoming: Incoming) -> LeanExchange:
        body = incoming.body
        return LeanExchange(
            self,
            incoming.method,
            incoming.url,
            incoming.version.decode("ascii"),
            incoming.headers,
            body[0] if len(body) == 1 else b"".join(body),
            incoming.too_large,
            incoming.keep_alive,
        )

    def _first_in_line(self) -> bool:
        """The request being parsed is the next to answer: its deadlines apply."""
        return self._current is None and not self._ready

    # -- answering, in order

    def _advance(self) -> None:
        """Answer what is ready, one at a time; parse what was held once nothing is."""
        self._advancing = True
        try:
            while not self._closing and self._current is None:
                if self._ready:
                    item = self._ready.popleft()
                    if isinstance(item, Refusal):
                        self._answer_refusal(item)
                    else:
                        self._current = item
                        self.site.handle(item)
                elif self._held and self._parsing:
                    data = b"".join(self._held)
                    self._held.clear()
                    self._held_size = 0
                    if self._paused:
                        self._paused = False
                        self.transport.resumeProducing()  # type: ignore[union-attr]
                    self._feed(data)
                else:
                    break
        finally:
            self._advancing = False
        if not self._closing and self._current is None:
            self._between_requests()

    def _between_requests(self) -> None:
        """Nothing to answer: close if asked, else read on with the right deadline."""
        if not self._parsing:  # a request asked for the close and has been answered
            self._close()
            return
        incoming = self._incoming
        if incoming is None:
            self._deadline.set(self.site.downstream.idle_timeout, self._close)
        elif not self._deadline.armed():  # held while another was answered: its deadlines now
            if incoming.head_done:
                self._deadline.set(self.site.downstream.body_timeout, self._body_timed_out)
            else:
                self._deadline.set(self.site.downstream.header_timeout, self._head_timed_out)

    def _close(self) -> None:
        self._closing = True
        self._deadline.stop()
        self.wire.loseConnection()  # what a pod's read left held goes first

    # -- refusals and deadlines

    def _refuse(self, status: int, error_type: ErrorType, message: str) -> None:
        """Answer C{status} once the requests before it are answered; read no more."""
        self._parsing = False
        self._ready.append(Refusal(status, error_type, message, self._incoming))

    def _head_too_large(self, incoming: Incoming) -> None:
        if incoming.line_done:
            self._refuse(
                431, ErrorType.HEADERS_TOO_LARGE, f"the request headers are over {HEAD_LIMIT} bytes"
            )
        else:
            self._refuse(
                414, ErrorType.URI_TOO_LONG, f"the request line is over {HEAD_LIMIT} bytes"
            )

    def _answer_refusal(self, refused: Refusal) -> None:
        record, answer = refusal(
            refused.status,
            refused.error_type,
            refused.message,
            method=refused.method,
            path=refused.path,
            protocol=refused.protocol,
            started=refused.started,
            now=self.site.clock.seconds(),
        )
        self.wire.write(answer)
        self._close()
        self.site.refused(record)

    def _head_timed_out(self) -> None:
        timeout = self.site.downstream.header_timeout
        self._timed_out(f"the request head did not arrive within {timeout}s")

    def _body_timed_out(self) -> None:
        timeout = self.site.downstream.body_timeout
        self._timed_out(f"the request body did not arrive within {timeout}s")

    def _timed_out(self, message: str) -> None:
        self._refuse(408, ErrorType.REQUEST_TIMEOUT, message)
        self._advance()
