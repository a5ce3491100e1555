"""
A request the HTTP layer answers itself (408, 414, 431, 400): its record and the bytes
of its answer, shared by both servers (twisted.web's L{kthena.proxy.channel} and the lean
one) so that clients, metrics and access logs see the same thing from either.
"""

from __future__ import annotations

from http import HTTPStatus

from kthena.errors import ErrorType, error_object
from kthena.record import RequestRecord, request_id
from kthena.webutil import json_bytes

HEAD_LIMIT = 16 * 1024
"""Bytes a request line, or a whole head, may take (twisted.web's C{totalHeadersSize})."""

SHOWN_PATH = 256
"""Characters of an over-long request target kept in its record."""


def refusal(
    status: int,
    error_type: ErrorType,
    message: str,
    *,
    method: bytes,
    path: bytes,
    protocol: bytes,
    started: float | None,
    now: float,
) -> tuple[RequestRecord, bytes]:
    """
    The record of a refused request and its whole answer: an OpenAI error object, and
    C{connection: close} (the server closes after writing it).

    @param started: when the head's first byte came, if it did.
    """
    record = RequestRecord(
        request_id=request_id(None),
        method=method.decode("latin-1"),
        path=path.decode("latin-1"),
        started=started if started is not None else now,
        protocol=protocol.decode("latin-1"),
    )
    record.fail(status, error_type, message)
    record.finished = now
    body = json_bytes(error_object(status, error_type, message))
    head = (
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n"
        "content-type: application/json\r\n"
        f"content-length: {len(body)}\r\n"
        "connection: close\r\n"
        f"x-request-id: {record.request_id}\r\n\r\n"
    )
    return record, head.encode("ascii") + body
