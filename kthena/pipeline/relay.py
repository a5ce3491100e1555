"""
The byte-pushing relay: an upstream response body to the client, as it arrives.

It is the client's push producer, so a slow client pauses the pod's connection
and memory stays bounded; an idle timer, reset on every chunk, runs only while the relay
reads (a client that paused it is not the pod stalling); for server-sent events it
forwards whole events only, takes the C{usage} from the pod's usage chunk and hides that
chunk when the router, not the client, asked for it.

A JSON body of unknown length is held until it ends: a pod that closes the connection
early (no C{Content-Length}, no chunking: the close ends the body) would otherwise look
like a clean answer with half a document. Held whole, it is checked, and an incomplete
one fails the relay with L{IncompleteBodyError} while the client can still get an error.
"""

from __future__ import annotations

import json
import re
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from zope.interface import implementer

from kthena.deferreds import stopping
from kthena.failures import IncompleteBodyError
from kthena.interfaces import IExchange
from kthena.webutil import json_loads

_USAGE = re.compile(rb'"usage"\s*:\s*\{')
_EVENT_END = re.compile(rb"\r?\n\r?\n")
_MAX_USAGE_SCAN = 8 * 1024 * 1024
"""Non-streamed bodies longer than this are relayed but not parsed for usage."""


def _usage_of(data: bytes) -> dict[str, Any] | None:
    """A JSON document carrying a C{usage} object, or None."""
    try:
        value = json_loads(data)
    except ValueError:
        return None
    if isinstance(value, dict) and isinstance(value.get("usage"), dict):
        return value
    return None


_DECODER = json.JSONDecoder()


def _trailing_usage(body: bytes) -> dict[str, Any] | None:
    """
    The C{usage} object of a completion body, decoded alone: engines write it last, so
    only the tail is decoded, not the whole (possibly long) completion.
    """
    match = _USAGE.match(body, max(0, body.rfind(b'"usage"')))
    if match is None:
        return None
    try:
        tail = body[match.end() - 1 :].decode("utf-8")
        value, _ = _DECODER.raw_decode(tail)
    except (UnicodeDecodeError, ValueError):
        return None
    return value if isinstance(value, dict) else None


@implementer(IPushProducer)
class Relay(Protocol):
    """
    Relays one response body; C{done} fires with C{None} when the body ended whole, or
    fails with the L{Failure} that cut it (upstream lost, idle timeout, L{stop}).

    @ivar usage: the pod's C{usage} object, once seen.
    @ivar deltas: the stream's C{delta} objects relayed (each carries at least one
        generated token): what a stream cut before its usage generated, at least.
    @ivar idle_expired: the body stalled longer than the idle timeout.
    """

    def __init__(
        self,
        exchange: IExchange,
        clock: IReactorTime,
        idle_timeout: float,
        sse: bool,
        hide_usage: bool,
        hold: bool = False,
    ) -> None:
        """
        @param hold: write the body only once it ended and parsed as JSON (a JSON body of
            unknown length; see the module docstring).
        """
        self.exchange = exchange
        self.clock = clock
        self.idle_timeout = idle_timeout
        self.sse = sse
        self.hide_usage = hide_usage
        self.hold = hold and not sse
        self.usage: dict[str, Any] | None = None
        self.deltas = 0
        self.idle_expired = False
        self.stopped = False
        self.done: Deferred[None] = stopping(self.stop)
        self._pending = b""
        self._body: list[bytes] | None = None if sse else []
        self._body_size = 0
        self._idle: IDelayedCall | None = None

    # -- IProtocol (upstream side)

    def connectionMade(self) -> None:
        self.exchange.register_producer(self)
        self._idle = self.clock.callLater(self.idle_timeout, self._idle_timeout)

    def dataReceived(self, data: bytes) -> None:
        if self.stopped:  # abandoned; the pod's connection may still deliver what it read
            return
        if self._idle is not None:
            self._idle.reset(self.idle_timeout)
        if self.sse:
            data = self._complete_events(data)
            if not data:
                return
        elif self._body is not None:
            self._body_size += len(data)
            if self._body_size <= _MAX_USAGE_SCAN:
                self._body.append(data)
                if self.hold:
                    return
            else:
                if self.hold:  # too long to hold: relay it as it comes after all
                    self.hold = False
                    data = b"".join(self._body) + data
                self._body = None
        self.exchange.write(data)

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:  # noqa: B008
        self._stop_idle_timer()
        if self.done.called:  # cancelled: nobody waits for the body any more
            return
        # isinstance, not Failure.check: check walks the class hierarchy on every call.
        whole = isinstance(reason.value, ResponseDone | PotentialDataLoss) and not self.stopped
        if not whole:
            self.done.errback(reason)
            return
        if self._pending:
            tail = self._scan_events(self._pending)
            if tail:
                self.exchange.write(tail)
            self._pending = b""
        if self._body is not None:
            body = b"".join(self._body)
            self.usage = _trailing_usage(body)
            if self.hold:
                if isinstance(reason.value, PotentialDataLoss) and not _parses(body):
                    self.done.errback(IncompleteBodyError())
                    return
                self.exchange.write(body)
        self.done.callback(None)

    def _stop_idle_timer(self) -> None:
        if self._idle is not None and self._idle.active():
            self._idle.cancel()
        self._idle = None

    # -- IPushProducer (client side)

    def pauseProducing(self) -> None:
        """The client cannot keep up: stop reading from the pod, and stop blaming it."""
        self._stop_idle_timer()
        if self.transport is not None:
            self.transport.pauseProducing()  # type: ignore[attr-defined]

    def resumeProducing(self) -> None:
        if self.transport is not None:
            self.transport.resumeProducing()  # type: ignore[attr-defined]
        if self._idle is None and not self.stopped and not self.done.called:
            self._idle = self.clock.callLater(self.idle_timeout, self._idle_timeout)

    def stopProducing(self) -> None:
        self.stop()

    def stop(self) -> None:
        """Abandon the body: close the pod's connection (it stops generating)."""
        if self.stopped:
            return
        self.stopped = True
        if self.transport is not None:
            self.transport.stopProducing()  # type: ignore[attr-defined]

    # -- server-sent events

    def _idle_timeout(self) -> None:
        self._idle = None
        self.idle_expired = True
        self.stop()

    def _complete_events(self, data: bytes) -> bytes:
        """Keep a trailing partial event back; return the complete ones to forward."""
        if self._pending:
            data = self._pending + data
        end = _last_event_end(data)
        complete, self._pending = data[:end], data[end:]
        if complete:
            self.deltas += complete.count(b'"delta"')
            complete = self._scan_events(complete)
        return complete

    def _scan_events(self, events: bytes) -> bytes:
        """
        Record usage from events that carry it; drop the usage-only one when hidden. Only
        the events from the first one carrying a usage object are split and read (the
        usage chunk comes last, before C{[DONE]}; an engine's continuous usage stats put
        one in every event); those before it pass as they are. One scan of the bytes.
        """
        first = _USAGE.search(events)
        if first is None:
            return events
        start = _last_event_end(events, first.start())
        return events[:start] + self._scan_each(events[start:])

    def _scan_each(self, events: bytes) -> bytes:
        kept: list[bytes] = []
        for event in _split_events(events):
            if _USAGE.search(event):
                chunk = _usage_of(_event_data(event))
                if chunk is not None:
                    self.usage = chunk["usage"]
                    if self.hide_usage and chunk.get("choices") == []:
                        continue
            kept.append(event)
        return b"".join(kept)


def _parses(body: bytes) -> bool:
    try:
        json_loads(body)
    except ValueError:
        return False
    return True


def _last_event_end(data: bytes, before: int | None = None) -> int:
    """Where the last complete event (before offset C{before}) ends (0: none is complete)."""
    lf = data.rfind(b"\n\n", 0, before)
    # A CRLF end beyond the LF one starts at most one byte before it: look only there.
    crlf = data.rfind(b"\r\n\r\n", lf - 1 if lf > 0 else 0, before)
    return max(lf + 2 if lf >= 0 else 0, crlf + 4 if crlf >= 0 else 0)


def _split_events(data: bytes) -> list[bytes]:
    if b"\r" not in data:  # LF only, as engines write: split in C
        parts = data.split(b"\n\n")
        events = [part + b"\n\n" for part in parts[:-1]]
        if parts[-1]:
            events.append(parts[-1])
        return events
    events = []
    start = 0
    for match in _EVENT_END.finditer(data):
        events.append(data[start : match.end()])
        start = match.end()
    if start < len(data):
        events.append(data[start:])
    return events


def _event_data(event: bytes) -> bytes:
    lines = [line[5:].lstrip(b" ") for line in event.splitlines() if line.startswith(b"data:")]
    return b"\n".join(lines)
