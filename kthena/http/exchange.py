"""
One request on the lean server as the pipeline sees it (L{IExchange}), and its response
framed onto the connection: C{Content-Length} when the pipeline gives one, chunked for
HTTP/1.1 streams otherwise, and the close for HTTP/1.0 streams.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

from twisted.web.http_headers import Headers
from zope.interface import implementer

from kthena.http.head import LAST_CHUNK, bodyless, chunk, head, phrase
from kthena.interfaces import IExchange
from kthena.webutil import JSON_TYPE


class Wire(Protocol):
    """What an exchange uses of the client's transport (a TCP or UNIX one)."""

    def write(self, data: bytes) -> None: ...

    def writeSequence(self, data: Sequence[bytes]) -> None: ...

    def registerProducer(self, producer: Any, streaming: bool) -> None: ...

    def unregisterProducer(self) -> None: ...

    def abortConnection(self) -> None: ...

    def loseConnection(self) -> None: ...


class Connection(Protocol):
    """What an exchange needs of the connection it came on (L{kthena.http.server})."""

    @property
    def wire(self) -> Wire: ...

    @property
    def client_host(self) -> str | None: ...

    def date(self) -> bytes:
        """The C{Date} header's value now."""

    def ended(self, exchange: LeanExchange, keep_alive: bool) -> None:
        """The response went out whole; the next request may be answered, or the close."""


_Staged = tuple[int, bytes, Sequence[tuple[bytes, Sequence[bytes]]]]
_OK: _Staged = (200, b"OK", ())


@implementer(IExchange)
class LeanExchange:
    """
    @ivar gone: the client disconnected before the response ended.
    @ivar ended: the response went out whole.
    """

    def __init__(
        self,
        connection: Connection,
        method: bytes,
        uri: bytes,
        version: str,
        headers: Headers,
        body: bytes,
        too_large: bool,
        keep_alive: bool,
    ) -> None:
        """
        @param version: the request's HTTP version, C{"1.1"} or C{"1.0"}.
        @param keep_alive: the client lets the connection carry another request.
        """
        self.method = method
        self.uri = uri
        self.path = uri.partition(b"?")[0]
        self.protocol = "HTTP/" + version
        self.headers = headers
        self.too_large = too_large
        self.started = False
        self.gone = False
        self.ended = False
        self._connection = connection
        self._wire = connection.wire
        self._body = body
        self._http11 = version == "1.1"
        self._keep_alive = keep_alive
        self._chunked = False
        self._no_body = False
        self._staged: _Staged = _OK
        self._producing = False
        self._gone_callbacks: list[Callable[[], None]] = []

    @property
    def client_host(self) -> str | None:
        return self._connection.client_host

    def header(self, name: bytes) -> bytes | None:
        values = self.headers.getRawHeaders(name)
        return values[-1] if values else None  # the last, as twisted.web's getHeader

    def body(self) -> bytes:
        return self._body

    def release_body(self) -> None:
        self._body = b""

    # -- the response

    def answer(self, status: int, body: bytes, headers: Sequence[tuple[bytes, bytes]]) -> None:
        if self.gone or self.ended:
            return
        length = b"%d" % len(body)
        ours = [(b"content-type", (JSON_TYPE,)), (b"content-length", (length,))]
        self._staged = (status, phrase(status), [*ours, *((n, (v,)) for n, v in headers)])
        self.write(body)
        self.finish()

    def begin(
        self, status: int, phrase: bytes, headers: Sequence[tuple[bytes, Sequence[bytes]]]
    ) -> None:
        self._staged = (status, phrase, headers)

    def write(self, data: bytes) -> None:
        if self.gone or self.ended:
            return
        if not self.started:
            first = self._head()
            if self._no_body or not data:
                self._wire.write(first)
            elif self._chunked:
                self._wire.writeSequence((first, *chunk(data)))
            else:
                self._wire.writeSequence((first, data))
        elif data and not self._no_body:
            if self._chunked:
                self._wire.writeSequence(chunk(data))
            else:
                self._wire.write(data)

    def finish(self) -> None:
        if self.gone or self.ended:
            return
        if not self.started:
            self.write(b"")
        if self._chunked:
            self._wire.write(LAST_CHUNK)
        self.ended = True
        self.unregister_producer()
        # The callbacks hold the request's run, which holds this exchange: let go now, so
        # that a request's objects are freed by reference counting, not the cyclic GC.
        self._gone_callbacks.clear()
        self._connection.ended(self, self._keep_alive)

    def _head(self) -> bytes:
        """The staged head with the server's framing; decides whether the connection stays."""
        status, reason, staged = self._staged
        # A name given again replaces the earlier one, as twisted.web's setRawHeaders.
        named: dict[bytes, int] = {}
        headers: list[tuple[bytes, Sequence[bytes]]] = []
        for name, values in staged:
            lower = name.lower()
            at = named.get(lower)
            if at is None:
                named[lower] = len(headers)
                headers.append((name, values))
            else:
                headers[at] = (name, values)
        length = b"content-length" in named
        dated = b"date" in named
        at = named.get(b"connection")
        close = at is not None and any(b"close" in v.lower() for v in headers[at][1])
        extra = [] if dated else [(b"date", self._connection.date())]
        self._no_body = bodyless(status, self.method)
        if not (self._no_body or length):
            if self._http11:
                extra.append((b"transfer-encoding", b"chunked"))
                self._chunked = True
            else:  # an HTTP/1.0 client knows the end of such a body by the close only
                self._keep_alive = False
        if close:
            self._keep_alive = False
        elif not self._keep_alive:
            extra.append((b"connection", b"close"))
        elif not self._http11:
            extra.append((b"connection", b"keep-alive"))
        self.started = True
        return head(status, reason, headers, extra)

    # -- the connection

    def abort(self) -> None:
        self._wire.abortConnection()

    def register_producer(self, producer: Any) -> None:
        """The transport pauses C{producer} while its write buffer is full (backpressure)."""
        if not (self.gone or self.ended or self._producing):
            self._wire.registerProducer(producer, True)
            self._producing = True

    def unregister_producer(self) -> None:
        if self._producing:
            self._producing = False
            if not self.gone:
                self._wire.unregisterProducer()

    def when_gone(self, callback: Callable[[], None]) -> None:
        self._gone_callbacks.append(callback)

    def lost(self) -> None:
        """The connection closed before the response ended."""
        self.gone = True
        self._producing = False
        callbacks, self._gone_callbacks = self._gone_callbacks, []
        for callback in callbacks:
            callback()
