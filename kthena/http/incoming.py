"""
What the lean server knows of a request while it is parsed (L{Incoming}), and of one it
answers itself (L{Refusal}), until the requests before it on the connection are answered.
"""

from __future__ import annotations

from twisted.web.http_headers import Headers

from kthena.errors import ErrorType


class Incoming:
    """The request being parsed."""

    __slots__ = ("body", "body_size", "head_done", "head_size", "headers", "keep_alive",
                 "line_done", "method", "received", "started", "too_large", "url",
                 "version")  # fmt: skip

    def __init__(self, started: float) -> None:
        self.started = started
        self.method = b"-"
        self.url = b""
        self.version = b"1.1"
        self.headers = Headers()
        self.head_size = 0
        """Bytes of the request line and headers as the parser gave them."""
        self.received = 0
        """Bytes read while the head was coming, after the read it began in."""
        self.line_done = False
        self.head_done = False
        self.body: list[bytes] = []
        self.body_size = 0
        self.too_large = False
        self.keep_alive = True


class Refusal:
    """A request answered by the server itself, waiting for its turn on the connection."""

    __slots__ = ("error_type", "message", "method", "path", "protocol", "started", "status")

    def __init__(
        self, status: int, error_type: ErrorType, message: str, incoming: Incoming | None
    ) -> None:
        self.status, self.error_type, self.message = status, error_type, message
        self.method = incoming.method if incoming is not None else b"-"
        self.path = incoming.url.partition(b"?")[0] if incoming is not None else b"-"
        self.protocol = b"HTTP/" + incoming.version if incoming is not None else b"HTTP/1.1"
        self.started = incoming.started if incoming is not None else None


class StopParsingError(Exception):
    """Raised in a parser callback to stop parsing at a refusal."""
