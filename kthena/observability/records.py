"""
The access log's records, field for field as the specification lists them: a JSON
object (the default) or a text line, formatted on the reactor thread.

Timings (milliseconds), from the phases of L{RequestRecord}:

  - C{duration_request_processing}: from the request complete at the router to the first
    upstream attempt sent (parsing, routing, scheduling); for requests the router answers
    itself, the whole of it.
  - C{duration_upstream_processing}: from the first attempt sent to the end of the last
    attempt's body; it covers failed attempts, retry intervals and, for streams, the
    whole stream relayed event by event.
  - C{duration_response_processing}: from then to the end of the response (the last
    write, an error event or an error answer after the attempts failed).
  - C{duration_total}: the sum of the three, each rounded to whole milliseconds, so that
    they always add up.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from typing import Any

from kthena.errors import ErrorType
from kthena.record import RequestRecord

_second: tuple[float, str] = (math.nan, "")
"""The last whole second formatted (strftime costs more than the rest of a record)."""


def timestamp(seconds: float) -> str:
    """RFC 3339 UTC with microseconds: C{2024-01-15T10:30:45.123456Z}."""
    global _second  # noqa: PLW0603 (a one-entry cache; a race only recomputes it)
    fraction, whole = math.modf(seconds)
    micros = round(fraction * 1e6)  # as datetime.fromtimestamp rounds
    if micros >= 1_000_000:
        whole, micros = whole + 1, micros - 1_000_000
    cached, prefix = _second
    if whole != cached:
        prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))
        _second = (whole, prefix)
    return f"{prefix}.{micros:06d}Z"


def _ms(seconds: float) -> int:
    return int(seconds * 1000 + 0.5) if seconds > 0 else 0


def durations(ctx: RequestRecord) -> tuple[int, int, int, int]:
    """
    @return: total, request, upstream and response processing, in whole milliseconds;
        the total is the sum of the three others.
    """
    started = ctx.started
    end = ctx.finished
    if end is None:  # not ended through the usual paths: take the latest time known
        end = max(t for t in (started, ctx.upstream_started, ctx.upstream_ended) if t is not None)
    upstream_started = ctx.upstream_started
    if upstream_started is None:
        request, upstream, response = _ms(end - started), 0, 0
    else:
        upstream_ended = ctx.upstream_ended if ctx.upstream_ended is not None else end
        request = _ms(upstream_started - started)
        upstream = _ms(upstream_ended - upstream_started)
        response = _ms(end - upstream_ended)
    return request + upstream + response, request, upstream, response


def _error(ctx: RequestRecord) -> tuple[str, str] | None:
    if ctx.error_type is ErrorType.SUCCESS:
        return None
    return ctx.error_type.value, ctx.error_message or ""


_string: Callable[[str], str] = json.encoder.encode_basestring
"""A JSON string of a str, escaped as C{json.dumps(..., ensure_ascii=False)} escapes (C)."""


def format_json(ctx: RequestRecord) -> str:
    """
    The JSON record, one object on one line: the specification's fields in its order,
    then current Kthena's destination fields, and ours (C{user_id}, only when the config
    identifies callers); as Kthena, a field that is not known (no model, no route, no
    pod, no tokens, no attempt) is left out rather than written as C{null} or C{0}.
    C{": "} and C{", "} separators, so that the specification's C{grep '"type":
    "timeout"'} finds what it looks for.

    Written out piece by piece, each string escaped by the standard library's own C
    escaper: the same bytes as C{json.dumps} of the record, at a third of the cost of
    building a dict and encoding it (the access log formats on the reactor thread).
    """
    total, request, upstream, response = durations(ctx)
    match = ctx.match
    parts = [
        f'{{"timestamp": "{timestamp(ctx.started)}", "method": {_string(ctx.method)}, '
        f'"path": {_string(ctx.path)}, "protocol": {_string(ctx.protocol)}, '
        f'"status_code": {ctx.status:d}'
    ]
    append = parts.append
    strings: tuple[tuple[str, str | None], ...] = (
        ("model_name", ctx.model),
        ("model_route", match.model_route if match is not None else None),
        ("model_server", match.model_server if match is not None else None),
        ("selected_pod", ctx.pod.name if ctx.pod is not None else None),
        ("request_id", ctx.request_id),
        ("user_id", ctx.user if ctx.identified else None),
        ("backend_type", match.server.backend_type if match is not None else None),
        ("backend_name", match.server.meta.key if match is not None else None),
        ("upstream_model", match.upstream_model(ctx.model or "") if match is not None else None),
    )
    for key, text in strings:
        if text:
            append(f', "{key}": {_string(text)}')
    for key, number in (("upstream_status_code", ctx.upstream_status),
                        ("upstream_attempts", ctx.attempts)):  # fmt: skip
        if number:
            append(f', "{key}": {number:d}')
    if match is not None and match.via is not None:  # Kthena's Gateway API fields
        for key, text in (("gateway", match.via.key), ("http_route", match.http_route),
                          ("inference_pool", match.inference_pool)):  # fmt: skip
            if text:
                append(f', "{key}": {_string(text)}')
    for key, number in (("input_tokens", ctx.input_tokens),
                        ("output_tokens", ctx.output_tokens)):  # fmt: skip
        if number:
            append(f', "{key}": {number:d}')
    append(
        f', "duration_total": {total:d}, "duration_request_processing": {request:d}, '
        f'"duration_upstream_processing": {upstream:d}, '
        f'"duration_response_processing": {response:d}'
    )
    prefill, decode = ctx.leg("prefill"), ctx.leg("decode")
    if prefill is not None:
        append(
            f', "prefill_pod": {_string(prefill.pod)}, "duration_prefill": {_ms(prefill.seconds):d}'
        )
    if decode is not None:
        append(f', "duration_decode": {_ms(decode.seconds):d}')
    error = _error(ctx)
    if error is not None:
        append(f', "error": {{"type": {_string(error[0])}, "message": {_string(error[1])}}}')
    append("}")
    return "".join(parts)


def json_record(ctx: RequestRecord) -> dict[str, Any]:
    """The JSON record as a reader of the log gets it."""
    record: dict[str, Any] = json.loads(format_json(ctx))
    return record


_NEEDS_QUOTES = frozenset(' "\\=')


def _bare_or_string(value: str) -> str:
    """As is when it reads unambiguously in C{key=value}; quoted otherwise."""
    if value and value.isprintable() and _NEEDS_QUOTES.isdisjoint(value):
        return value
    return _string(value)


def _in_quotes(value: str) -> str:
    """A piece of the quoted request line, escaped like a quoted value."""
    if value.isprintable() and '"' not in value and "\\" not in value:
        return value
    return _string(value)[1:-1]


def format_text(ctx: RequestRecord) -> str:
    """
    C{[ts] "METHOD /path PROTO" status [error=type:"message"] key=value ...
    [upstream=status/attempts] [tokens=in/out] timings=Tms(request+upstream+response)}:
    keys only when known, C{upstream} when a pod was tried (the last pod's status, C{-}
    when none answered), tokens only when any were counted, values quoted when they hold
    spaces, quotes or control characters.
    """
    total, request, upstream, response = durations(ctx)
    parts = [
        f"[{timestamp(ctx.started)}] "
        f'"{_in_quotes(ctx.method)} {_in_quotes(ctx.path)} {_in_quotes(ctx.protocol)}" '
        f"{ctx.status}"
    ]
    error = _error(ctx)
    if error is not None:
        parts.append(f"error={_bare_or_string(error[0])}:{_string(error[1])}")
    match = ctx.match
    known = (
        ("model_name", ctx.model),
        ("model_route", match.model_route if match is not None else None),
        ("model_server", match.model_server if match is not None else None),
        ("inference_pool", match.inference_pool if match is not None else None),
        ("selected_pod", ctx.pod.name if ctx.pod is not None else None),
        ("request_id", ctx.request_id),
        ("user_id", ctx.user if ctx.identified else None),
        ("prefill_pod", prefill.pod if (prefill := ctx.leg("prefill")) is not None else None),
    )
    parts.extend(f"{key}={_bare_or_string(value)}" for key, value in known if value)
    if ctx.attempts:
        parts.append(f"upstream={ctx.upstream_status or '-'}/{ctx.attempts}")
    inputs, outputs = ctx.input_tokens, ctx.output_tokens
    if inputs or outputs:
        parts.append(f"tokens={inputs}/{outputs}")
    parts.append(f"timings={total}ms({request}+{upstream}+{response})")
    return " ".join(parts)


FORMATTERS: dict[str, Callable[[RequestRecord], str]] = {"json": format_json, "text": format_text}
