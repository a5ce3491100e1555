"""
How the router answers a request itself: a whole JSON answer (an OpenAI error object, the
model list, health), an error event that ends a stream already under way, or, for a plain
body already under way, a dropped connection (it cannot say it is incomplete).
"""

from __future__ import annotations

from collections.abc import Sequence

from kthena.errors import ProxyError, error_object
from kthena.interfaces import IExchange
from kthena.record import RequestRecord
from kthena.webutil import json_bytes


def answer_json(
    exchange: IExchange,
    record: RequestRecord,
    status: int,
    value: object,
    headers: Sequence[tuple[bytes, bytes]] = (),
) -> None:
    """Answer C{value} with C{status}; the request id goes with every answer."""
    record.status = status
    exchange.answer(
        status, json_bytes(value), [(b"x-request-id", record.request_id.encode()), *headers]
    )


def answer_error(
    exchange: IExchange,
    record: RequestRecord,
    error: ProxyError,
    headers: Sequence[tuple[bytes, bytes]] = (),
) -> None:
    """Record C{error} as the outcome and answer its OpenAI error object."""
    record.fail(error.status, error.error_type, error.message)
    answer_json(
        exchange,
        record,
        error.status,
        error_object(error.status, error.error_type, error.message, error.code),
        (*error.headers, *headers),
    )


def end_with_error(
    exchange: IExchange, record: RequestRecord, error: ProxyError, sse: bool
) -> None:
    """
    The response broke after its head went out: a stream ends with an error event (OpenAI
    clients raise on it; no C{[DONE]}), a plain body with a dropped connection. Before
    anything went out the client still gets a proper error answer.
    """
    if not exchange.started:
        answer_error(exchange, record, error)
        return
    record.error_type = error.error_type
    record.error_message = error.message
    if sse:
        body = error_object(error.status, error.error_type, error.message, error.code)
        exchange.write(b"data: " + json_bytes(body) + b"\n\n")
        exchange.finish()
    else:
        exchange.abort()
