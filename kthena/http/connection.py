"""
One keep-alive HTTP/1.1 connection to a pod, one request at a time (no pipelining): the
request's bytes written at once, the answer parsed by C{httptools} (llhttp, in C) instead
of C{twisted.web._newclient}'s line parser, a third of the router's CPU with C{Agent}.

The answer's head fires the request's Deferred with a L{PodResponse}; its body follows
through that response. Interim (1xx) answers are skipped. After a whole answer the
connection goes back to its owner (the pool) when both sides allow keep-alive, and is
closed otherwise. How a connection's loss reads:

  - before any byte of the answer on a connection that served a request before:
    L{NotSentError}; the pod closed it idle, so it never saw this request;
  - before the head otherwise: L{ResponseNeverReceived};
  - mid-body: L{ResponseFailed} to the body's protocol, or L{PotentialDataLoss} for a
    body that the close delimits (no C{Content-Length}, not chunked), as C{Agent} says.
"""

from __future__ import annotations

from typing import Protocol as TypingProtocol

from httptools import HttpParserError, HttpParserUpgrade, HttpResponseParser
from twisted.internet.defer import Deferred, succeed
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone, ResponseFailed, ResponseNeverReceived
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IResponse

from kthena.http.deadline import Deadline
from kthena.http.response import PodResponse
from kthena.http.wire import EagerWire, hold, release

Key = tuple[str, str]
"""Which pod a connection goes to: (scheme, authority)."""

_VERSIONS = {"1.1": (b"HTTP", 1, 1), "1.0": (b"HTTP", 1, 0)}
_DONE = Failure(ResponseDone())
"""Every whole body's end (one Failure: making one per answer is measurable)."""


class NotSentError(Exception):
    """
    A pooled connection was closed before the pod answered anything: the pod closes only
    idle connections, so it never saw the request, which may go again on a fresh one.
    """


class Owner(TypingProtocol):
    """Where a connection goes between requests (the pool)."""

    def release(self, connection: PodConnection) -> None: ...

    def lost(self, connection: PodConnection) -> None: ...


class PodConnection(Protocol):
    """
    @ivar reused: it served a whole answer already (a request on it may meet L{NotSentError}).
    @ivar idle_deadline: closes it while it waits in the pool (the pool's).
    """

    def __init__(self, owner: Owner, key: Key, idle_deadline: Deadline) -> None:
        self.owner = owner
        self.key = key
        self.reused = False
        self.lost = False
        self.idle_deadline = idle_deadline
        self._closers: list[Deferred[None]] = []
        self._parser: HttpResponseParser | None = None
        self._waiting: Deferred[IResponse] | None = None
        self._head: PodResponse | None = None
        self._head_only = False
        self._received = False
        self._stopped = False
        self._paused = False
        self._interim = False
        self._complete = False
        self._keep = False
        self._headers = Headers()
        self._phrase = b""
        self._content_length: int | None = None
        self._chunked = False

    def connectionMade(self) -> None:
        self._wire = EagerWire(self.transport)

    def send(self, data: bytes, head_only: bool) -> Deferred[IResponse]:
        """
        Write a request (all its bytes); the Deferred fires with the answer's head and is
        cancelled by aborting the connection.

        @param head_only: the answer has no body whatever its headers say (HEAD).
        """
        self._parser = HttpResponseParser(self)
        self._head_only = head_only
        self._received = self._stopped = self._paused = self._complete = False
        waiting: Deferred[IResponse] = Deferred(self._cancel)
        self._waiting = waiting
        self._wire.write(data)
        return waiting

    def close(self) -> Deferred[None]:
        """Close it (idle, on shutdown); fires once it is closed."""
        if self.lost:
            return succeed(None)
        closed: Deferred[None] = Deferred()
        self._closers.append(closed)
        self._wire.loseConnection()
        return closed

    def _cancel(self, waiting: Deferred[IResponse]) -> None:
        self._waiting = None
        self._stopped = True
        self._wire.abortConnection()

    # -- the answer

    def dataReceived(self, data: bytes) -> None:
        parser = self._parser
        if parser is None:  # idle, or aborted: nothing is expected
            if not self._stopped:
                self._wire.abortConnection()
            return
        self._received = True
        # What this read makes the router write (to the client: a stream's head, events
        # and end) goes out as one send per connection once it is handled.
        holding = hold()
        try:
            self._read(parser, data)
        finally:
            if holding:
                release()

    def _read(self, parser: HttpResponseParser, data: bytes) -> None:
        try:
            parser.feed_data(data)
        except (HttpParserError, HttpParserUpgrade):
            self._broken(Failure())
            return
        if self._head is not None and self._waiting is not None:
            waiting, self._waiting = self._waiting, None
            waiting.callback(self._head)
        if self._complete:
            self._done()

    def on_message_begin(self) -> None:
        self._headers = Headers()
        self._phrase = b""
        self._content_length = None
        self._chunked = False

    def on_status(self, status: bytes) -> None:
        self._phrase += status  # may come in pieces, as the bytes do

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.addRawHeader(name, value)
        size = len(name)  # compared first: most headers are neither
        if size == 14 and name.lower() == b"content-length":
            self._content_length = int(value)  # llhttp checked it is digits
        elif size == 17 and name.lower() == b"transfer-encoding":
            self._chunked = value.lower().endswith(b"chunked")

    def on_headers_complete(self) -> None:
        assert self._parser is not None
        code = self._parser.get_status_code()
        self._interim = code < 200
        if self._interim:
            return
        length: int | object
        if self._head_only or code in (204, 304):
            length = 0
        elif self._chunked or self._content_length is None:
            length = UNKNOWN_LENGTH
        else:
            length = self._content_length
        version = self._parser.get_http_version()
        self._head = PodResponse(
            _VERSIONS.get(version) or _version(version),
            code,
            self._phrase,
            self._headers,
            length,
            self,
        )
        if self._head_only:  # llhttp would wait for the body the headers announce
            self._complete = True
            self._keep = False

    def on_body(self, body: bytes) -> None:
        if self._head is not None and not self._stopped:
            self._head.body_received(body)

    def on_message_complete(self) -> None:
        if self._interim or self._complete:
            return
        assert self._parser is not None
        self._complete = True
        self._keep = self._parser.should_keep_alive()

    def _done(self) -> None:
        """A whole answer: the connection to the pool (or closed), then the body's end."""
        self._parser = None
        if self._stopped:  # aborted: connectionLost ends the body
            return
        response, self._head = self._head, None
        if self._keep:
            self.reused = True
            if self._paused:
                self._wire.resumeProducing()
            self.owner.release(self)
        else:
            self._wire.loseConnection()
        if response is not None:  # its body ends after the connection may serve another
            response.body_ended(_DONE)

    def _broken(self, failure: Failure) -> None:
        """The pod sent what is not HTTP: the request fails, the connection closes."""
        self._parser = None
        self._stopped = True
        self._wire.abortConnection()
        waiting, self._waiting = self._waiting, None
        response, self._head = self._head, None
        if waiting is not None:
            waiting.errback(ResponseNeverReceived([failure]))
        elif response is not None:
            response.body_ended(Failure(ResponseFailed([failure])))

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost = True
        self._parser = None
        self.owner.lost(self)
        waiting, self._waiting = self._waiting, None
        response, self._head = self._head, None
        if waiting is not None:
            if self.reused and not self._received:
                waiting.errback(NotSentError())
            else:
                waiting.errback(ResponseNeverReceived([reason]))
        elif response is not None:
            delimited = not self._chunked and self._content_length is None
            if delimited and not self._stopped:
                response.body_ended(Failure(PotentialDataLoss()))
            else:
                response.body_ended(Failure(ResponseFailed([reason])))
        closers, self._closers = self._closers, []
        for closed in closers:
            closed.callback(None)

    # -- the body's flow (BodySource), while it flows

    def pause_body(self) -> None:
        self._paused = True
        self._wire.pauseProducing()

    def resume_body(self) -> None:
        self._paused = False
        self._wire.resumeProducing()

    def stop_body(self) -> None:
        """The body is not wanted: abort (a pod stops generating when its client goes)."""
        if not self._stopped:
            self._stopped = True
            self._wire.abortConnection()


def _version(text: str) -> tuple[bytes, int, int]:
    major, _, minor = text.partition(".")
    return (b"HTTP", int(major), int(minor or 0))
