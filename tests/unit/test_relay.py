"""The byte-pushing relay: whole SSE events, usage capture and hiding, idle timer, flow."""

from __future__ import annotations

import json
from typing import Any, cast

import pytest
from twisted.internet.defer import CancelledError
from twisted.internet.error import ConnectionLost
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone, ResponseFailed
from twisted.web.http import PotentialDataLoss

from kthena.failures import IncompleteBodyError
from kthena.interfaces import IExchange
from kthena.pipeline.relay import Relay
from tests.unit.proxyfixtures import BodyTransport

IDLE = 10.0


class FakeRequest:
    """The client side of the relay: records what the relay does to it."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.finished = 0
        self.producers: list[tuple[object, bool]] = []
        self.unregistered = 0

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def finish(self) -> None:
        self.finished += 1

    def register_producer(self, producer: object) -> None:
        self.producers.append((producer, True))

    def unregister_producer(self) -> None:
        self.unregistered += 1

    @property
    def body(self) -> bytes:
        return b"".join(self.writes)


class Harness:
    def __init__(self, sse: bool = True, hide_usage: bool = False, hold: bool = False) -> None:
        self.clock = Clock()
        self.request = FakeRequest()
        self.transport = BodyTransport()
        self.relay = Relay(cast(IExchange, self.request), self.clock, IDLE, sse, hide_usage, hold)
        self.results: list[Failure | None] = []
        self.errors: list[Failure] = []
        self.relay.done.addCallbacks(self.results.append, self.errors.append)
        self.relay.makeConnection(self.transport)

    def feed(self, *chunks: bytes) -> None:
        for chunk in chunks:
            self.relay.dataReceived(chunk)

    def end(self, reason: Failure | None = None) -> None:
        self.relay.connectionLost(reason or Failure(ResponseDone()))

    @property
    def result(self) -> Failure | None:
        assert len(self.results) == 1, (self.results, self.errors)
        return self.results[0]

    def usage(self) -> dict[str, Any] | None:
        """The relay's usage (a call, so that mypy does not narrow it across steps)."""
        return self.relay.usage

    @property
    def error(self) -> Failure:
        assert (self.results, len(self.errors)) == ([], 1), (self.results, self.errors)
        return self.errors[0]


def event(value: object) -> bytes:
    return b"data: " + json.dumps(value, separators=(",", ":")).encode() + b"\n\n"


def chunk(text: str, index: int = 0) -> dict[str, Any]:
    return {
        "id": "cmpl-1",
        "object": "chat.completion.chunk",
        "choices": [{"index": index, "delta": {"content": text}, "finish_reason": None}],
    }


USAGE = {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}
USAGE_ONLY = {"id": "cmpl-1", "object": "chat.completion.chunk", "choices": [], "usage": USAGE}
DONE = b"data: [DONE]\n\n"


# -- wiring


def test_registers_as_streaming_producer_of_the_request() -> None:
    h = Harness()
    assert h.request.producers == [(h.relay, True)]
    assert cast(object, h.relay.transport) is h.transport


# -- server-sent events


def test_event_split_across_chunks_is_forwarded_once_complete() -> None:
    h = Harness()
    whole = event(chunk("Hello"))
    h.feed(whole[:17])
    assert h.request.writes == []
    h.feed(whole[17:-1])
    assert h.request.writes == []
    h.feed(whole[-1:])
    assert h.request.writes == [whole]


def test_several_events_in_one_chunk_are_forwarded_together() -> None:
    h = Harness()
    one, two, three = event(chunk("a")), event(chunk("b")), event(chunk("c"))
    h.feed(one + two + three[:10])
    assert h.request.writes == [one + two]
    h.feed(three[10:])
    assert h.request.writes == [one + two, three]


def test_crlf_event_separators() -> None:
    h = Harness()
    h.feed(b"data: a\r\n\r\ndata: b\r\n\r")
    assert h.request.writes == [b"data: a\r\n\r\n"]
    h.feed(b"\ndata: c")
    assert h.request.writes == [b"data: a\r\n\r\n", b"data: b\r\n\r\n"]
    h.feed(b"\r\n\r\n")
    assert h.request.body == b"data: a\r\n\r\ndata: b\r\n\r\ndata: c\r\n\r\n"


def test_multiline_event_is_one_event() -> None:
    h = Harness()
    h.feed(b"event: message\ndata: one\n")
    assert h.request.writes == []
    h.feed(b"data: two\n\n")
    assert h.request.writes == [b"event: message\ndata: one\ndata: two\n\n"]


def test_trailing_partial_event_is_flushed_when_the_body_ends_whole() -> None:
    h = Harness()
    h.feed(event(chunk("a")) + b"data: [DONE]")
    assert h.request.writes == [event(chunk("a"))]
    h.end()
    assert h.request.body == event(chunk("a")) + b"data: [DONE]"
    assert h.result is None


def test_trailing_partial_event_is_not_flushed_when_the_body_is_cut() -> None:
    h = Harness()
    h.feed(event(chunk("a")) + b'data: {"partial')
    h.end(Failure(ResponseFailed([Failure(ConnectionLost())])))
    assert h.request.body == event(chunk("a"))


# -- usage


def test_usage_is_captured_and_the_usage_only_chunk_hidden() -> None:
    h = Harness(hide_usage=True)
    h.feed(event(chunk("Hi")), event(USAGE_ONLY), DONE)
    h.end()
    assert h.relay.usage == USAGE
    assert h.request.body == event(chunk("Hi")) + DONE
    assert b"usage" not in h.request.body


def test_usage_only_chunk_kept_when_the_client_asked_for_it() -> None:
    h = Harness(hide_usage=False)
    h.feed(event(chunk("Hi")), event(USAGE_ONLY), DONE)
    h.end()
    assert h.relay.usage == USAGE
    assert h.request.body == event(chunk("Hi")) + event(USAGE_ONLY) + DONE


def test_usage_only_chunk_hidden_within_a_chunk_of_several_events() -> None:
    h = Harness(hide_usage=True)
    h.feed(event(chunk("a")) + event(USAGE_ONLY) + DONE)
    assert h.request.writes == [event(chunk("a")) + DONE]
    assert h.relay.usage == USAGE


def test_usage_only_chunk_split_across_reads_is_hidden() -> None:
    h = Harness(hide_usage=True)
    usage = event(USAGE_ONLY)
    h.feed(usage[:30])
    h.feed(usage[30:])
    assert h.request.writes == []
    h.feed(DONE)
    assert h.request.writes == [DONE]
    assert h.relay.usage == USAGE


def test_usage_only_chunk_alone_in_a_read_writes_nothing() -> None:
    h = Harness(hide_usage=True)
    h.feed(event(USAGE_ONLY))
    assert h.request.writes == []
    assert h.relay.usage == USAGE


def test_trailing_usage_only_event_without_blank_line_is_hidden() -> None:
    h = Harness(hide_usage=True)
    h.feed(event(chunk("a")), event(USAGE_ONLY)[:-2])
    h.end()
    assert h.relay.usage == USAGE
    assert h.request.body == event(chunk("a"))


def test_usage_with_spaces_is_recognised() -> None:
    h = Harness(hide_usage=True)
    spaced = (
        b'data: {"id": "cmpl-1", "choices": [], "usage": {"prompt_tokens": 3, '
        b'"completion_tokens": 4}}\n\n'
    )
    h.feed(event(chunk("x")) + spaced + DONE)
    assert h.relay.usage == {"prompt_tokens": 3, "completion_tokens": 4}
    assert h.request.body == event(chunk("x")) + DONE


def test_usage_in_chunks_with_choices_is_recorded_and_never_hidden() -> None:
    h = Harness(hide_usage=True)
    first = {**chunk("a"), "usage": {"prompt_tokens": 5, "completion_tokens": 1}}
    second = {**chunk("b"), "usage": {"prompt_tokens": 5, "completion_tokens": 2}}
    h.feed(event(first), event(second))
    assert h.request.body == event(first) + event(second)
    assert h.relay.usage == {"prompt_tokens": 5, "completion_tokens": 2}


def test_continuous_usage_stats_and_the_usage_chunk_in_one_read() -> None:
    """Only the tail from the last usage event is split and read: every usage object
    before it still counts in order, and the usage-only chunk is still the one hidden."""
    h = Harness(hide_usage=True)
    stats = [{**chunk(t), "usage": {"completion_tokens": i}} for i, t in enumerate("ab", 1)]
    null_after = {**chunk("c"), "usage": None}
    h.feed(event(stats[0]) + event(stats[1]) + event(USAGE_ONLY) + event(null_after) + DONE)
    assert h.request.body == event(stats[0]) + event(stats[1]) + event(null_after) + DONE
    assert h.relay.usage == USAGE


def test_events_before_the_usage_chunk_pass_as_they_came() -> None:
    h = Harness(hide_usage=True)
    crlf = event(chunk("a")).replace(b"\n\n", b"\r\n\r\n")
    h.feed(crlf + event(chunk("b")) + event(USAGE_ONLY) + DONE)
    assert h.request.body == crlf + event(chunk("b")) + DONE
    assert h.relay.usage == USAGE


def test_null_usage_is_not_usage() -> None:
    h = Harness(hide_usage=True)
    empty: dict[str, Any] = {"id": "cmpl-1", "choices": [], "usage": None}
    h.feed(event(empty), DONE)
    h.end()
    assert h.relay.usage is None
    assert h.request.body == event(empty) + DONE


def test_event_mentioning_usage_in_text_is_kept() -> None:
    h = Harness(hide_usage=True)
    sneaky = chunk('"usage": {')
    h.feed(event(sneaky))
    assert h.request.body == event(sneaky)
    assert h.relay.usage is None


# -- plain bodies


def test_json_body_relayed_unchanged_and_usage_parsed_at_the_end() -> None:
    h = Harness(sse=False)
    body = json.dumps(
        {"id": "cmpl-1", "choices": [{"text": "a\n\nb"}], "usage": USAGE}, indent=1
    ).encode()
    parts = [body[:7], body[7:40], body[40:]]
    h.feed(*parts)
    assert h.request.writes == parts
    assert h.usage() is None
    h.end()
    assert h.request.writes == parts
    assert h.relay.usage == USAGE
    assert h.result is None


def test_json_body_that_is_not_json_has_no_usage() -> None:
    h = Harness(sse=False)
    h.feed(b"<html>oops</html>")
    h.end()
    assert h.request.body == b"<html>oops</html>"
    assert h.relay.usage is None


def test_json_usage_not_parsed_from_a_cut_body() -> None:
    h = Harness(sse=False)
    h.feed(json.dumps({"usage": USAGE}).encode())
    h.end(Failure(ResponseFailed([Failure(ConnectionLost())])))
    assert h.relay.usage is None


# -- the end


@pytest.mark.parametrize("reason", [ResponseDone(), PotentialDataLoss()])
def test_done_fires_none_when_the_body_ends_whole(reason: Exception) -> None:
    h = Harness()
    h.feed(event(chunk("a")))
    h.end(Failure(reason))
    assert h.result is None
    assert h.errors == []


def test_done_fails_with_the_failure_when_the_body_is_cut() -> None:
    h = Harness()
    failure = Failure(ResponseFailed([Failure(ConnectionLost())]))
    h.end(failure)
    assert h.error is failure


def test_stopped_body_is_cut_even_if_it_then_ends_cleanly() -> None:
    h = Harness()
    h.relay.stop()
    h.end()
    assert h.error.check(ResponseDone)


def test_the_relay_never_finishes_or_unregisters_the_request() -> None:
    h = Harness()
    h.feed(event(chunk("a")))
    h.end()
    assert (h.request.finished, h.request.unregistered) == (0, 0)


# -- idle timer


def test_idle_timeout_stops_the_upstream() -> None:
    h = Harness()
    h.clock.advance(IDLE - 0.01)
    assert (h.transport.stopped, h.relay.idle_expired) == (0, False)
    h.clock.advance(0.01)
    assert h.transport.stopped == 1
    assert h.relay.idle_expired
    assert h.relay.stopped
    h.end(Failure(ResponseFailed([Failure(ConnectionLost())])))
    assert h.error.check(ResponseFailed)


def test_data_resets_the_idle_timer() -> None:
    h = Harness()
    h.clock.advance(IDLE * 0.9)
    h.feed(b"data: a\n")
    h.clock.advance(IDLE * 0.9)
    h.feed(b"\n")
    h.clock.advance(IDLE * 0.9)
    assert h.transport.stopped == 0
    assert not h.relay.idle_expired
    assert h.request.body == b"data: a\n\n"
    h.clock.advance(IDLE * 0.1)
    assert h.transport.stopped == 1
    assert h.relay.idle_expired


def test_idle_timer_cancelled_when_the_body_ends() -> None:
    h = Harness()
    h.end()
    assert h.clock.getDelayedCalls() == []
    h.clock.advance(IDLE * 2)
    assert not h.relay.idle_expired
    assert h.transport.stopped == 0


def test_a_client_pausing_the_relay_is_not_the_pod_stalling() -> None:
    """The client stops reading for 75 s: its pause is not the pod's idle time."""
    h = Harness()
    h.feed(b"data: a\n\n")
    h.relay.pauseProducing()
    h.clock.advance(75)
    assert (h.transport.stopped, h.relay.idle_expired) == (0, False)
    h.relay.resumeProducing()  # reading again: the pod gets the whole idle time
    h.clock.advance(IDLE - 0.01)
    assert h.transport.stopped == 0
    h.clock.advance(0.01)
    assert h.relay.idle_expired  # the pod itself stalled
    assert h.transport.stopped == 1


def test_resuming_after_the_end_starts_no_timer() -> None:
    h = Harness()
    h.relay.pauseProducing()
    h.end()
    h.relay.resumeProducing()
    assert h.clock.getDelayedCalls() == []


# -- JSON bodies of unknown length


def test_a_held_json_body_is_written_once_whole() -> None:
    h = Harness(sse=False, hold=True)
    h.feed(b'{"usage": {"prompt_tokens": 1,', b' "completion_tokens": 2}}')
    assert h.request.writes == []
    h.end(Failure(PotentialDataLoss()))  # ended by the close, and whole
    assert h.request.body == b'{"usage": {"prompt_tokens": 1, "completion_tokens": 2}}'
    assert h.result is None
    assert h.usage() == {"prompt_tokens": 1, "completion_tokens": 2}


def test_a_held_json_body_cut_by_the_close_fails() -> None:
    h = Harness(sse=False, hold=True)
    h.feed(b'{"choices": [{"message": {"content": "hel')
    h.end(Failure(PotentialDataLoss()))
    assert h.error.check(IncompleteBodyError)
    assert h.request.writes == []  # the client can still get a proper error


def test_a_held_body_too_long_to_hold_is_relayed_as_it_comes() -> None:
    h = Harness(sse=False, hold=True)
    big = b"x" * (8 * 1024 * 1024)
    h.feed(b"[", big)
    assert h.request.body == b"[" + big
    h.feed(b"]")
    assert h.request.body.endswith(b"]")


# -- flow control


def test_pause_and_resume_reach_the_upstream_transport() -> None:
    h = Harness()
    h.relay.pauseProducing()
    assert (h.transport.paused, h.transport.resumed) == (1, 0)
    h.relay.resumeProducing()
    assert (h.transport.paused, h.transport.resumed) == (1, 1)


def test_stop_is_idempotent() -> None:
    h = Harness()
    h.relay.stop()
    h.relay.stop()
    h.relay.stopProducing()
    assert h.transport.stopped == 1


def test_data_after_stop_is_not_written() -> None:
    h = Harness(sse=False)
    h.feed(b"{")
    h.relay.stop()
    h.feed(b'"late": 1}')
    assert h.request.writes == [b"{"]


def test_stop_producing_from_the_client_stops_the_upstream() -> None:
    h = Harness()
    h.relay.stopProducing()
    assert h.transport.stopped == 1
    assert h.relay.stopped


def test_cancelling_done_stops_the_upstream() -> None:
    h = Harness()
    h.relay.done.cancel()
    assert h.transport.stopped == 1
    assert h.error.check(CancelledError)
    # The pod's connection then ends; the relay takes that quietly (no AlreadyCalledError).
    h.end(Failure(ResponseFailed([Failure(ConnectionLost())])))
    assert h.error.check(CancelledError)
    assert h.request.writes == []


def test_any_stream_cut_anywhere_is_relayed_whole_minus_the_hidden_usage_chunk() -> None:
    """Random streams (LF, CRLF or mixed ends, usage objects in any event, continuous stats or a
    final chunk, text that names usage), cut into random reads: the client gets every
    event in order but the usage-only ones when hidden, and the usage is the last one."""
    import random

    rng = random.Random(5)
    for _ in range(300):
        ends = rng.choice([[b"\n\n"], [b"\r\n\r\n"], [b"\n\n", b"\r\n\r\n", b"\r\n\n"]])
        events: list[tuple[bytes, dict[str, int] | None, bool]] = []
        for i in range(rng.randint(0, 12)):
            end = rng.choice(ends)
            kind = rng.random()
            if kind < 0.2:
                usage = {"prompt_tokens": i, "completion_tokens": i + 1}
                chunk = {"choices": [{"delta": {"content": "x"}}], "usage": usage}
                events.append((b"data: " + json.dumps(chunk).encode() + end, usage, False))
            elif kind < 0.3:
                usage = {"prompt_tokens": 9, "completion_tokens": i}
                body = json.dumps({"choices": [], "usage": usage}, separators=(",", ":"))
                events.append((b"data: " + body.encode() + end, usage, True))
            else:
                text = rng.choice(['"usage": null', 'the "usage" word', "tok", "a\\nb"])
                plain = {"choices": [{"delta": {"content": text}}], "usage": None}
                events.append((b"data: " + json.dumps(plain).encode() + end, None, False))
        events.append((b"data: [DONE]" + rng.choice(ends), None, False))
        stream = b"".join(e for e, _, _ in events)
        hide = rng.random() < 0.5
        h = Harness(hide_usage=hide)
        cuts = sorted(rng.sample(range(1, len(stream)), min(len(stream) - 1, rng.randint(0, 6))))
        for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True):
            h.feed(stream[a:b])
        h.end()
        assert h.result is None
        expected = b"".join(e for e, _, usage_only in events if not (hide and usage_only))
        assert h.request.body == expected
        usages = [u for _, u, _ in events if u is not None]
        assert h.usage() == (usages[-1] if usages else None)
