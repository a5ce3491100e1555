"""
Stage 1, parse: the body, capped in memory, parsed once; the model named; the prompt in
a shape the OpenAI API allows. Anything else is answered here, before any routing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kthena import prompt
from kthena.errors import ErrorType, ProxyError
from kthena.interfaces import IExchange
from kthena.record import RequestRecord
from kthena.webutil import json_loads


@dataclass(slots=True)
class Parsed:
    """
    @ivar raw: the body as received (sent on as is unless the router changes it).
    @ivar body: the parsed JSON object.
    """

    raw: bytes
    body: dict[str, Any]
    model: str
    stream: bool


def loads(raw: bytes) -> Any:
    """
    The body's JSON, parsed once (L{json_loads}).

    @raise ProxyError: 400, not JSON (with the standard library's message).
    """
    try:
        return json_loads(raw)
    except ValueError as e:
        raise ProxyError(400, ErrorType.INVALID_REQUEST, f"invalid JSON body: {e}") from e


def parse(exchange: IExchange, record: RequestRecord, max_body_bytes: int) -> Parsed:
    """
    @raise ProxyError: 413 over the cap, 400 for JSON that is not an object or a prompt
        of a shape the API does not allow, 404 when no model is named (as Kthena).
    """
    if exchange.too_large:
        raise ProxyError(413, ErrorType.TOO_LARGE, f"request body over {max_body_bytes} bytes")
    raw = exchange.body()
    exchange.release_body()  # Parsed has it now, and the exchange lives as long as a stream
    body = loads(raw)
    if not isinstance(body, dict):
        raise ProxyError(400, ErrorType.INVALID_REQUEST, "the body must be a JSON object")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise ProxyError(400, ErrorType.INVALID_REQUEST, "`model` must be a string")
    if not model:
        raise ProxyError(404, ErrorType.ROUTE_NOT_FOUND, "the request names no model")
    record.model = model
    record.stream = body.get("stream") is True
    try:
        prompt.check(body, record.path)
    except prompt.PromptError as e:
        raise ProxyError(400, ErrorType.INVALID_REQUEST, str(e)) from e
    return Parsed(raw, body, model, record.stream)
