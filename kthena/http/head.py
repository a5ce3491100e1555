"""
Response heads and chunked framing, as bytes: the few facts of HTTP/1.1 framing the lean
server needs, kept apart from connection state so they can be checked byte by byte.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from email.utils import formatdate
from http import HTTPStatus

CRLF = b"\r\n"
LAST_CHUNK = b"0\r\n\r\n"
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"

_PHRASES = {s.value: s.phrase.encode("ascii") for s in HTTPStatus}


def phrase(status: int) -> bytes:
    """The reason phrase of C{status} (twisted.web's word for one it does not know)."""
    return _PHRASES.get(status, b"Unknown Status")


def bodyless(status: int, method: bytes) -> bool:
    """A response that never carries a body (RFC 9112 6.3): nothing to frame."""
    return method == b"HEAD" or status < 200 or status in (204, 304)


def chunk(data: bytes) -> Sequence[bytes]:
    """One chunk of a chunked body (as a sequence, so a large C{data} is not copied)."""
    return (b"%x\r\n" % len(data), data, CRLF)


class DateCache:
    """
    The C{Date} header's value, formatted once a second: formatting it for every response
    would cost more than the rest of the head.
    """

    def __init__(self) -> None:
        self._second = -1
        self._value = b""

    def value(self, now: float) -> bytes:
        second = int(now)
        if second != self._second:
            self._second = second
            self._value = formatdate(second, usegmt=True).encode("ascii")
        return self._value


def head(
    status: int,
    reason: bytes,
    headers: Iterable[tuple[bytes, Sequence[bytes]]],
    extra: Iterable[tuple[bytes, bytes]],
) -> bytes:
    """
    A response head: the status line, C{headers} (each name with its values) and the
    server's own C{extra} ones (framing, C{Date}, C{Connection}), then the blank line.
    """
    lines = [b"HTTP/1.1 %d %s\r\n" % (status, reason)]
    for name, values in headers:
        for value in values:
            lines.append(b"%s: %s\r\n" % (name, value))
    for name, value in extra:
        lines.append(b"%s: %s\r\n" % (name, value))
    lines.append(CRLF)
    return b"".join(lines)
