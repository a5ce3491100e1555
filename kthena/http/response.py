"""
A pod's response as the pipeline reads it: the L{IResponse} of C{twisted.web}, so stages
written for C{Agent}'s responses take these unchanged.

The body comes off the wire before or after C{deliverBody} is called (the dispatcher may
look at the head first): what arrives before is held, then handed over in order. While the
body flows the response is its protocol's transport, a push producer over the pod's
connection: the relay pauses the pod when the client is slow, and stops it (the connection
is aborted, the pod stops generating) when the client is gone.
"""

from __future__ import annotations

from typing import Protocol as TypingProtocol

from twisted.internet.interfaces import IProtocol, IPushProducer
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from twisted.web.iweb import IClientRequest, IResponse
from zope.interface import implementer


class BodySource(TypingProtocol):
    """The connection a body is read from, while it is."""

    def pause_body(self) -> None: ...

    def resume_body(self) -> None: ...

    def stop_body(self) -> None: ...


@implementer(IResponse, IPushProducer)
class PodResponse:
    """
    @ivar length: the body's length from C{Content-Length}, or C{UNKNOWN_LENGTH}
        (chunked, or delimited by the connection's close).
    """

    request: IClientRequest | None = None

    def __init__(
        self,
        version: tuple[bytes, int, int],
        code: int,
        phrase: bytes,
        headers: Headers,
        length: int | object,
        source: BodySource,
    ) -> None:
        self.version = version
        self.code = code
        self.phrase = phrase
        self.headers = headers
        self.length = length
        self.previousResponse: IResponse | None = None
        self._source: BodySource | None = source
        self._protocol: IProtocol | None = None
        self._delivered = False
        self._held: list[bytes] = []
        self._end: Failure | None = None

    def setPreviousResponse(self, response: IResponse) -> None:
        self.previousResponse = response

    def deliverBody(self, protocol: IProtocol) -> None:
        """Give the body to C{protocol}: what arrived already, then the rest as it comes."""
        if self._delivered:
            raise RuntimeError("the body of a response is delivered once")
        self._delivered = True
        self._protocol = protocol
        protocol.makeConnection(self)  # type: ignore[arg-type]
        held, self._held = self._held, []
        for data in held:
            protocol.dataReceived(data)
        if self._end is not None:
            protocol.connectionLost(self._end)

    # -- from the connection

    def body_received(self, data: bytes) -> None:
        if self._protocol is None:
            self._held.append(data)
        else:
            self._protocol.dataReceived(data)

    def body_ended(self, reason: Failure) -> None:
        """
        The body ended (L{ResponseDone}) or broke; the connection is not ours any more,
        and the protocol is let go of (it holds this response as its transport: the cycle
        would wait for the cyclic collector).
        """
        self._source = None
        protocol, self._protocol = self._protocol, None
        if protocol is None:
            self._end = reason
        else:
            protocol.connectionLost(reason)

    # -- IPushProducer, for the body's protocol

    def pauseProducing(self) -> None:
        if self._source is not None:
            self._source.pause_body()

    def resumeProducing(self) -> None:
        if self._source is not None:
            self._source.resume_body()

    def stopProducing(self) -> None:
        if self._source is not None:
            self._source.stop_body()
