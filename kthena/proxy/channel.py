"""
The proxy's HTTP/1.1 channel: twisted.web's, with deadlines for slow clients and real
answers where twisted.web would only drop the connection.

  - The request head (request line and headers) must arrive whole within
    C{downstream.headerTimeout} of its first byte, and the body within
    C{downstream.bodyTimeout} of the head; otherwise 408 and the connection closes
    (one header byte a second, slowloris, would otherwise hold a connection for hours).
  - A request line longer than the line limit is answered 414, a head over the header
    limit 431, a malformed request 400 (twisted.web closes with no status, or a bare 400).

Each of these is recorded like any request the router answers itself: one metric count
and one access-log record, through the site's C{refused} callback.
"""

from __future__ import annotations

from typing import Protocol

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.python.failure import Failure

from kthena.config.traffic import DownstreamConfig
from kthena.errors import ErrorType
from kthena.http.refusal import SHOWN_PATH, refusal
from kthena.record import RequestRecord
from kthena.webutil import NoDelayHTTPChannel


class ChannelSite(Protocol):
    """What the channel needs of its site (L{kthena.proxy.site.ProxySite})."""

    @property
    def clock(self) -> IReactorTime: ...

    downstream: DownstreamConfig

    def refused(self, ctx: RequestRecord) -> None:
        """Record a request the channel answered itself."""


_LOST = Failure(ConnectionError("the connection was lost"))


class ProxyChannel(NoDelayHTTPChannel):
    def __init__(self) -> None:
        super().__init__()
        self._deadline: IDelayedCall | None = None
        self._head_started: float | None = None
        self._refused = False

    @property
    def _site(self) -> ChannelSite:
        site: ChannelSite = self.site  # type: ignore[attr-defined]
        return site

    # -- deadlines

    def dataReceived(self, data: bytes) -> None:
        if self._refused:
            return
        if self._deadline is None and not self._handlingRequest and data.strip(b"\r\n"):
            self._head_started = self._site.clock.seconds()
            self._deadline = self.callLater(
                self._site.downstream.header_timeout, self._head_timed_out
            )
        super().dataReceived(data)

    def allHeadersReceived(self) -> None:
        self._cancel_deadline()
        super().allHeadersReceived()
        if self.length != 0 and not self._refused:  # a body follows (None: chunked)
            self._deadline = self.callLater(
                self._site.downstream.body_timeout, self._body_timed_out
            )

    def allContentReceived(self) -> None:
        self._cancel_deadline()
        self._head_started = None
        super().allContentReceived()

    def connectionLost(self, reason: Failure = _LOST) -> None:
        self._cancel_deadline()
        super().connectionLost(reason)

    def _cancel_deadline(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    def _head_timed_out(self) -> None:
        self._deadline = None
        timeout = self._site.downstream.header_timeout
        self._refuse(
            408, ErrorType.REQUEST_TIMEOUT, f"the request head did not arrive within {timeout}s"
        )

    def _body_timed_out(self) -> None:
        self._deadline = None
        timeout = self._site.downstream.body_timeout
        self._refuse(
            408, ErrorType.REQUEST_TIMEOUT, f"the request body did not arrive within {timeout}s"
        )

    # -- limits

    def _in_request_line(self) -> bool:
        return bool(getattr(self, "_HTTPChannel__first_line", 0))

    def lineReceived(self, line: bytes) -> None:
        if self._receivedHeaderSize + len(line) > self.totalHeadersSize:
            self._too_long(line)
            return
        super().lineReceived(line)

    def lineLengthExceeded(self, line: bytes) -> None:
        self._too_long(line)

    def _too_long(self, line: bytes) -> None:
        if self._in_request_line():
            method, _, target = line.partition(b" ")
            self._refuse(
                414,
                ErrorType.URI_TOO_LONG,
                f"the request line is over {self.totalHeadersSize} bytes",
                method=method[:16],
                path=target[:SHOWN_PATH],
            )
        else:
            self._refuse(
                431,
                ErrorType.HEADERS_TOO_LARGE,
                f"the request headers are over {self.totalHeadersSize} bytes",
            )

    def _respondToBadRequestAndDisconnect(self) -> None:
        self._refuse(400, ErrorType.BAD_REQUEST, "malformed HTTP request")

    # -- answering

    def _refuse(
        self,
        status: int,
        error_type: ErrorType,
        message: str,
        method: bytes | None = None,
        path: bytes | None = None,
    ) -> None:
        """Answer C{status} with an OpenAI error object, close, and record it."""
        if self._refused:
            return
        self._refused = True
        self._cancel_deadline()
        site = self._site
        if method is None:
            method = getattr(self, "_command", b"-")
        if path is None:
            path = getattr(self, "_path", b"-").partition(b"?")[0]
        ctx, answer = refusal(
            status,
            error_type,
            message,
            method=method,
            path=path,
            protocol=getattr(self, "_version", b"HTTP/1.1"),
            started=self._head_started,
            now=site.clock.seconds(),
        )
        assert self.transport is not None
        self.transport.write(answer)
        self.loseConnection()
        site.refused(ctx)
