"""
The access log: the specification's JSON and text records from a request's context,
timings that add up, sampling, the bounded buffer and its writer thread (drops, reopen,
flush on stop), its config keys and its wiring into the router service.
"""

from __future__ import annotations

import json
import os
import queue
import random
import signal
import threading
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import pytest
from prometheus_client import CollectorRegistry
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import ILogObserver, LogEvent, globalLogPublisher
from zope.interface import implementer
from zope.interface.verify import verifyObject

from kthena.config.observability import AccessLogConfig
from kthena.config.router import parse_config
from kthena.config.validate import ConfigError
from kthena.errors import ErrorType
from kthena.interfaces import IAccessLogSink, IServerReactor
from kthena.lifecycle import SignalService
from kthena.observability.accesslog import (
    DROPPED_METRIC,
    AccessLog,
    FileSink,
    StreamSink,
    access_log_for,
    sink_for,
)
from kthena.observability.records import (
    durations,
    format_json,
    format_text,
    json_record,
    timestamp,
)
from kthena.pods import PodEndpoint
from kthena.record import RequestRecord
from kthena.service import RouterService
from kthena.store import Datastore, RouteMatch
from tests.unit.proxyfixtures import RouterHarness, sse_response
from tests.unit.routerfixtures import pod, server, simple_route

# The specification's example: 2024-01-15T10:30:45.123456Z.
T0 = datetime(2024, 1, 15, 10, 30, 45, 123456, tzinfo=UTC).timestamp()
REQUEST_ID = "550e8400-e29b-41d4-a716-446655440000"
POD = "llama2-deployment-5f7b8c9d-xk2p4"
CHAT = "/v1/chat/completions"
WAIT = 10.0
"""Seconds a test waits for the writer thread before failing (never reached when green)."""

SPEC_FIELDS = [
    "timestamp",
    "method",
    "path",
    "protocol",
    "status_code",
    "model_name",
    "model_route",
    "model_server",
    "selected_pod",
    "request_id",
    "input_tokens",
    "output_tokens",
    "duration_total",
    "duration_request_processing",
    "duration_upstream_processing",
    "duration_response_processing",
]
"""The spec's JSON access-log fields, in its order (the error object comes last, when any)."""

KTHENA_FIELDS = [
    "backend_type",
    "backend_name",
    "upstream_model",
    "upstream_status_code",
    "upstream_attempts",
]
"""Current Kthena's destination fields, between the request id and the tokens."""

RECORD_FIELDS = [*SPEC_FIELDS[:10], *KTHENA_FIELDS, *SPEC_FIELDS[10:], "error"]
"""Every field a record may hold, in order; unknown ones are left out, as Kthena does."""


def in_record_order(record: dict[str, Any]) -> bool:
    keys = list(record)
    return keys == [k for k in RECORD_FIELDS if k in record] and set(keys) <= set(RECORD_FIELDS)


# -- building contexts


def spec_store() -> Datastore:
    """The specification's example objects: a route, a server, a pod."""
    raw = {
        "resources": [
            simple_route("llama2-route-v1", "llama2-7b", "llama2-server"),
            server("llama2-server", {"app": "llama2"}),
            pod(POD, "10.244.2.20", {"app": "llama2"}),
        ]
    }
    store = Datastore()
    store.replace(parse_config(raw, "t.yaml", Path("."), []).resources)
    return store


def spec_match() -> tuple[RouteMatch, PodEndpoint]:
    store = spec_store()
    match = store.match("llama2-7b", lambda name: "", CHAT)
    assert match is not None
    return match, store.server_pods(match.server)[0]


def proxied(**changes: Any) -> RequestRecord:
    """The specification's successful request: 45 ms + 2180 ms + 5 ms, 150/75 tokens."""
    match, endpoint = spec_match()
    ctx = RequestRecord(REQUEST_ID, "POST", CHAT, T0, model="llama2-7b")
    ctx.match = match
    ctx.pod = endpoint
    ctx.attempts = 1
    ctx.upstream_status = 200
    ctx.status = 200
    ctx.upstream_started = T0 + 0.045
    ctx.first_byte = T0 + 0.5
    ctx.upstream_ended = T0 + 2.225
    ctx.finished = T0 + 2.230
    ctx.input_estimate = 140
    ctx.prompt_tokens = 150
    ctx.completion_tokens = 75
    for name, value in changes.items():
        setattr(ctx, name, value)
    return ctx


def timed_out() -> RequestRecord:
    """The specification's error example: the pod's answer timed out after 30 s."""
    ctx = RequestRecord(REQUEST_ID, "POST", CHAT, T0, model="llama2-7b")
    ctx.upstream_started = T0 + 0.045
    ctx.upstream_ended = T0 + 29.995
    ctx.finished = T0 + 30.0
    ctx.fail(500, ErrorType.TIMEOUT, "Model inference timeout after 30s")
    return ctx


def refused() -> RequestRecord:
    ctx = RequestRecord("abc", "POST", CHAT, T0 + 1, model="nope")
    ctx.fail(404, ErrorType.ROUTE_NOT_FOUND, "the model `nope` does not exist")
    ctx.finished = T0 + 1.0021
    return ctx


# -- the JSON record


def test_timestamp_is_rfc3339_utc_with_microseconds() -> None:
    assert timestamp(T0) == "2024-01-15T10:30:45.123456Z"
    assert timestamp(0.5) == "1970-01-01T00:00:00.500000Z"
    assert timestamp(1) == "1970-01-01T00:00:01.000000Z"


def test_json_record_of_a_proxied_request_field_for_field() -> None:
    line = format_json(proxied())
    assert "\n" not in line
    record = json.loads(line)
    assert list(record) == [f for f in RECORD_FIELDS if f != "error"]
    assert record == {
        "timestamp": "2024-01-15T10:30:45.123456Z",
        "method": "POST",
        "path": "/v1/chat/completions",
        "protocol": "HTTP/1.1",
        "status_code": 200,
        "model_name": "llama2-7b",
        "model_route": "default/llama2-route-v1",
        "model_server": "default/llama2-server",
        "selected_pod": POD,
        "request_id": REQUEST_ID,
        "backend_type": "model_server",
        "backend_name": "default/llama2-server",
        "upstream_model": "llama2-7b",
        "upstream_status_code": 200,
        "upstream_attempts": 1,
        "input_tokens": 150,
        "output_tokens": 75,
        "duration_total": 2230,
        "duration_request_processing": 45,
        "duration_upstream_processing": 2180,
        "duration_response_processing": 5,
    }
    durations_ = [k for k in record if k.startswith("duration_")]
    for key in ["status_code", "input_tokens", "output_tokens", *durations_]:
        assert type(record[key]) is int, key
    # The specification's grep examples find what they look for.
    assert '"duration_upstream_processing": 2180' in line


def test_json_record_of_an_error_has_type_and_message() -> None:
    record = json.loads(format_json(timed_out()))
    assert record["status_code"] == 500
    assert record["error"] == {"type": "timeout", "message": "Model inference timeout after 30s"}
    assert list(record)[-1] == "error"
    assert in_record_order(record)
    assert record["model_name"] == "llama2-7b"
    # Unknown, so left out as Kthena does: no route, pod, attempt or token.
    for absent in ("model_route", "selected_pod", "upstream_attempts", "input_tokens"):
        assert absent not in record
    assert [record[f"duration_{p}"] for p in ("total", "request_processing")] == [30000, 45]
    assert '"type": "timeout"' in format_json(timed_out())


def test_a_json_line_is_what_json_dumps_writes_of_it() -> None:
    """Written piece by piece, a line has json.dumps' own bytes: separators, escapes,
    non-ASCII as is, whatever the strings hold."""
    hostile = 'a "quoted" \\ back\nslash\t\x00\x1f \u00e9\u4e2d\U0001f600 \u2028'
    records = [proxied(), timed_out(), refused()]
    records.append(proxied(model=hostile, request_id=hostile, method='PO"ST', path="/v1/\n"))
    records.append(proxied(user=hostile, identified=True, upstream_status=None, attempts=0))
    failed = timed_out()
    failed.error_message = hostile
    records.append(failed)
    for ctx in records:
        line = format_json(ctx)
        assert line == json.dumps(json.loads(line), ensure_ascii=False), line
        assert "\n" not in line
    assert json_record(records[3])["model_name"] == hostile
    assert json_record(records[4])["user_id"] == hostile
    assert json_record(records[5])["error"] == {"type": "timeout", "message": hostile}


def test_json_record_of_a_refused_request() -> None:
    record = json_record(refused())
    assert record["error"] == {
        "type": "route_not_found",
        "message": "the model `nope` does not exist",
    }
    assert record["model_name"] == "nope"
    assert not {"model_route", "model_server", "selected_pod", "backend_type"} & set(record)
    assert in_record_order(record)
    assert record["timestamp"] == "2024-01-15T10:30:46.123456Z"
    # No upstream phase: all of it is the router's own processing.
    assert [record[k] for k in record if k.startswith("duration_")] == [2, 2, 0, 0]


def test_json_record_without_a_model() -> None:
    ctx = RequestRecord("id", "GET", "/nowhere", T0)
    ctx.fail(404, ErrorType.NOT_FOUND, "no such path")
    ctx.finished = T0
    record = json_record(ctx)
    assert "model_name" not in record
    assert "error" in record


def test_success_has_no_error_field() -> None:
    assert "error" not in json_record(proxied())
    assert "error" not in format_text(proxied())


# -- the text line


def test_text_line_of_a_success_is_the_specification_shape() -> None:
    assert format_text(proxied()) == (
        '[2024-01-15T10:30:45.123456Z] "POST /v1/chat/completions HTTP/1.1" 200 '
        "model_name=llama2-7b model_route=default/llama2-route-v1 "
        f"model_server=default/llama2-server selected_pod={POD} "
        f"request_id={REQUEST_ID} upstream=200/1 tokens=150/75 timings=2230ms(45+2180+5)"
    )


def test_text_line_says_when_no_pod_answered() -> None:
    line = format_text(proxied(upstream_status=None, attempts=3))
    assert " upstream=-/3 tokens=" in line


def test_text_line_of_an_error_puts_it_after_the_status() -> None:
    assert format_text(timed_out()) == (
        '[2024-01-15T10:30:45.123456Z] "POST /v1/chat/completions HTTP/1.1" 500 '
        'error=timeout:"Model inference timeout after 30s" model_name=llama2-7b '
        f"request_id={REQUEST_ID} timings=30000ms(45+29950+5)"
    )


def test_text_line_leaves_out_what_is_not_known() -> None:
    ctx = RequestRecord("r1", "GET", "/nowhere", T0)
    ctx.fail(404, ErrorType.NOT_FOUND, "no such path")
    ctx.finished = T0 + 0.001
    assert format_text(ctx) == (
        '[2024-01-15T10:30:45.123456Z] "GET /nowhere HTTP/1.1" 404 '
        'error=not_found:"no such path" request_id=r1 timings=1ms(1+0+0)'
    )


def test_text_values_with_spaces_or_quotes_are_quoted_and_escaped() -> None:
    ctx = proxied(request_id='my "id" 1', model="a b\\c", path='/v1/x"y')
    ctx.fail(502, ErrorType.STREAM_INTERRUPTED, 'cut: "reset"\nby peer')
    line = format_text(ctx)
    assert "\n" not in line
    assert '"POST /v1/x\\"y HTTP/1.1" 502 ' in line
    assert 'error=stream_interrupted:"cut: \\"reset\\"\\nby peer" ' in line
    assert ' model_name="a b\\\\c" ' in line
    assert ' request_id="my \\"id\\" 1" ' in line
    assert f" selected_pod={POD} " in line  # plain values stay bare
    # Quoted values read back as JSON strings.
    assert json.loads(line.split("request_id=")[1].split(" upstream=")[0]) == 'my "id" 1'


# -- timings add up


def test_durations_round_each_phase_and_sum_them() -> None:
    ctx = proxied(
        upstream_started=T0 + 0.0004,
        upstream_ended=T0 + 0.0008,
        finished=T0 + 0.0012,
    )
    assert durations(ctx) == (0, 0, 0, 0)  # 0.4 ms each: the total says 0, like its parts
    ctx = proxied(
        upstream_started=T0 + 0.0006,
        upstream_ended=T0 + 0.0012,
        finished=T0 + 0.0018,
    )
    assert durations(ctx) == (3, 1, 1, 1)
    rng = random.Random(3)
    for _ in range(500):
        a, b, c = (rng.uniform(0, 5) for _ in range(3))
        ctx = proxied(upstream_started=T0 + a, upstream_ended=T0 + a + b, finished=T0 + a + b + c)
        total, request, upstream, response = durations(ctx)
        assert total == request + upstream + response
        assert abs(total - (a + b + c) * 1000) <= 2
        assert min(request, upstream, response) >= 0


def test_durations_when_the_upstream_phase_did_not_end() -> None:
    # Cancelled while the attempt was in flight: the rest counts as upstream.
    ctx = proxied(upstream_ended=None, finished=T0 + 1.0)
    assert durations(ctx) == (1000, 45, 955, 0)
    # Not finished through the usual paths: the latest time known ends it.
    ctx = proxied(finished=None)
    assert durations(ctx) == (2225, 45, 2180, 0)


def _record(h: RouterHarness) -> dict[str, Any]:
    ctx = h.context
    record = json_record(ctx)
    parts = [record[f"duration_{p}_processing"] for p in ("request", "upstream", "response")]
    assert record["duration_total"] == sum(parts), record
    return record


COMPLETION = {
    "id": "c",
    "object": "chat.completion",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}}],
    "usage": {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12},
}


def _event(value: object) -> bytes:
    return b"data: " + json.dumps(value).encode() + b"\n\n"


def test_durations_of_a_proxied_request() -> None:
    h = RouterHarness()
    h.clock.advance(T0)
    h.chat()
    h.clock.advance(0.25)
    h.upstream.last.respond_json(COMPLETION)
    record = _record(h)
    assert [record[k] for k in record if k.startswith("duration_")] == [250, 0, 250, 0]
    assert (record["input_tokens"], record["output_tokens"]) == (9, 3)
    assert record["selected_pod"] == "p0"


def test_durations_of_a_refused_request() -> None:
    h = RouterHarness()
    h.post(CHAT, {"model": "nope", "messages": []})
    record = _record(h)
    assert record["status_code"] == 404
    assert record["duration_upstream_processing"] == 0
    assert record["duration_response_processing"] == 0


def test_durations_of_a_stream_cover_the_relay() -> None:
    h = RouterHarness()
    h.chat(stream=True)
    response = h.upstream.last.answer(sse_response())
    for text in ("a", "b", "c"):
        h.clock.advance(0.1)
        response.send(_event({"id": "c", "choices": [{"index": 0, "delta": {"content": text}}]}))
    h.clock.advance(0.1)
    response.send(
        _event({"id": "c", "choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 3}})
    )
    response.send(b"data: [DONE]\n\n")
    response.end()
    record = _record(h)
    assert [record[k] for k in record if k.startswith("duration_")] == [400, 0, 400, 0]
    assert (record["input_tokens"], record["output_tokens"]) == (4, 3)


def test_durations_of_a_retried_request_include_the_failed_attempt_and_interval() -> None:
    h = RouterHarness({"retry": {"attempts": 1, "retryInterval": "100ms"}})
    h.chat()
    h.clock.advance(0.05)
    h.upstream.last.fail(ConnectionRefusedError())
    h.clock.advance(0.1)
    assert [c.pod.name for c in h.upstream.calls] == ["p0", "p1"]
    h.clock.advance(0.2)
    h.upstream.last.respond_json(COMPLETION)
    record = _record(h)
    assert [record[k] for k in record if k.startswith("duration_")] == [350, 0, 350, 0]
    assert record["selected_pod"] == "p1"
    assert "error" not in record


def test_durations_of_requests_failing_upstream() -> None:
    h = RouterHarness({"retry": {"attempts": 1, "retryInterval": "0s"}})
    h.chat()
    h.clock.advance(0.01)
    h.upstream.last.fail(ConnectionRefusedError())
    h.clock.advance(0.02)
    h.upstream.last.fail(ConnectionRefusedError())
    record = _record(h)
    assert record["status_code"] == 503
    assert record["error"]["type"] == "proxy"
    assert [record[k] for k in record if k.startswith("duration_")] == [30, 0, 30, 0]


# -- the writer: fakes


@implementer(IReactorFromThreads)
class ThreadedClock(MemoryReactorClock):
    """A test clock whose C{callFromThread} queues calls for the test to run."""

    def __init__(self) -> None:
        super().__init__()
        self.from_threads: queue.SimpleQueue[
            tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]
        ]
        self.from_threads = queue.SimpleQueue()

    def callFromThread(self, callable: Callable[..., Any], *args: object, **kwargs: object) -> None:
        self.from_threads.put((callable, args, kwargs))

    def run_until(self, done: Callable[[], bool], what: str) -> None:
        """Run the calls the writer thread sent until C{done()}."""
        deadline = time.monotonic() + WAIT
        while not done():
            try:
                f, args, kwargs = self.from_threads.get(
                    timeout=max(0.0, deadline - time.monotonic())
                )
            except queue.Empty:
                pytest.fail(f"timed out waiting for {what}")
            f(*args, **kwargs)


@implementer(IAccessLogSink)
class ListSink:
    """Keeps every batch; may be held (blocking the writer) until released."""

    def __init__(self, held: bool = False) -> None:
        self.batches: list[list[str]] = []
        self.reopened = 0
        self.closed = False
        self.fail_next = 0
        self.entered = threading.Event()
        self.release = threading.Event()
        if not held:
            self.release.set()

    def write(self, lines: Sequence[str]) -> None:
        self.entered.set()
        self.release.wait()
        if self.fail_next:
            self.fail_next -= 1
            raise OSError(28, "No space left on device")
        self.batches.append(list(lines))

    def reopen(self) -> None:
        self.reopened += 1

    def close(self) -> None:
        self.closed = True

    @property
    def lines(self) -> list[str]:
        return [line for batch in self.batches for line in batch]


def wait_until(done: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not done():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.002)


def make_log(
    sink: IAccessLogSink,
    clock: ThreadedClock | None = None,
    registry: CollectorRegistry | None = None,
    rng: random.Random | None = None,
    **config: Any,
) -> AccessLog:
    return AccessLog(
        AccessLogConfig(**config),
        sink,
        registry if registry is not None else CollectorRegistry(),
        clock if clock is not None else ThreadedClock(),
        rng=rng,
    )


def stop(access_log: AccessLog, clock: ThreadedClock) -> None:
    """Stop it and wait until the writer flushed and closed the sink."""
    d = access_log.stopService()
    assert isinstance(d, Deferred)
    results: list[object] = []
    d.addBoth(results.append)
    clock.run_until(lambda: bool(results), "the access log to stop")
    assert results == [None]


def dropped(registry: CollectorRegistry, reason: str) -> float | None:
    return registry.get_sample_value(DROPPED_METRIC, {"reason": reason})


def numbered(i: int, error: bool = False) -> RequestRecord:
    ctx = RequestRecord(f"r{i}", "POST", CHAT, T0, status=200)
    ctx.finished = T0
    if error:
        ctx.fail(503, ErrorType.NO_PODS, "no pod")
    return ctx


# -- the writer


def test_sinks_provide_the_interface(tmp_path: Path) -> None:
    assert verifyObject(IAccessLogSink, StreamSink(1))
    file_sink = FileSink(str(tmp_path / "a.log"))
    assert verifyObject(IAccessLogSink, file_sink)
    file_sink.close()
    assert verifyObject(IAccessLogSink, ListSink())


def test_lines_reach_the_sink_in_order_in_the_configured_format() -> None:
    clock = ThreadedClock()
    sink = ListSink()
    access_log = make_log(sink, clock, format="text")
    access_log.record(numbered(0))  # before start: waits in the buffer
    access_log.startService()
    for i in range(1, 50):
        access_log.record(numbered(i))
    stop(access_log, clock)
    assert [line.split("request_id=")[1].split(" ")[0] for line in sink.lines] == [
        f"r{i}" for i in range(50)
    ]
    assert sink.lines[0] == format_text(numbered(0))
    assert sink.closed
    assert access_log.written == 50
    access_log.record(numbered(99))  # after the stop: not taken
    assert access_log.pending == 0


def test_sampling_keeps_every_error_and_the_configured_share_of_successes() -> None:
    clock = ThreadedClock()
    sink = ListSink()
    access_log = make_log(sink, clock, rng=random.Random(1234), sample_rate=0.2)
    access_log.startService()
    for i in range(6000):
        access_log.record(numbered(i, error=i % 10 == 0))
    stop(access_log, clock)
    records = [json.loads(line) for line in sink.lines]
    errors = [r for r in records if "error" in r]
    successes = [r for r in records if "error" not in r]
    assert len(errors) == 600
    assert 0.17 * 5400 <= len(successes) <= 0.23 * 5400, len(successes)


def test_sampling_edges_and_upstream_4xx_count_as_errors() -> None:
    clock = ThreadedClock()
    sink = ListSink()
    access_log = make_log(sink, clock, sample_rate=0.0)
    access_log.startService()
    for i in range(100):
        access_log.record(numbered(i))
    client_error = numbered(7)
    client_error.status = 400
    access_log.record(client_error)
    hung_up = numbered(8)  # a 200 whose client left mid-stream is an error too
    hung_up.error_type = ErrorType.CLIENT_DISCONNECT
    access_log.record(hung_up)
    stop(access_log, clock)
    assert [json.loads(line)["request_id"] for line in sink.lines] == ["r7", "r8"]


def test_full_buffer_drops_and_counts_without_waiting_for_the_writer() -> None:
    clock = ThreadedClock()
    registry = CollectorRegistry()
    sink = ListSink(held=True)
    access_log = make_log(sink, clock, registry, buffer_size=5)
    assert dropped(registry, "buffer_full") == 0
    assert dropped(registry, "write_failed") == 0
    access_log.startService()
    access_log.record(numbered(0))
    assert sink.entered.wait(WAIT)  # the writer took line 0 and is stuck in the sink

    def record_more() -> None:
        for i in range(1, 9):
            access_log.record(numbered(i))

    recorder = threading.Thread(target=record_more, daemon=True)
    recorder.start()
    recorder.join(WAIT)
    # record() came back while the sink still blocks the writer: it never waits for it.
    assert not recorder.is_alive()
    assert not sink.release.is_set()
    assert access_log.pending == 5
    assert dropped(registry, "buffer_full") == 3

    sink.release.set()
    stop(access_log, clock)
    assert [json.loads(line)["request_id"] for line in sink.lines] == [f"r{i}" for i in range(6)]
    assert dropped(registry, "buffer_full") == 3


def test_failed_writes_are_counted_and_reported_once() -> None:
    clock = ThreadedClock()
    registry = CollectorRegistry()
    sink = ListSink()
    sink.fail_next = 2
    events: list[LogEvent] = []
    observer = cast(ILogObserver, events.append)
    globalLogPublisher.addObserver(observer)
    try:
        access_log = make_log(sink, clock, registry)
        access_log.startService()
        access_log.record(numbered(0))
        wait_until(lambda: sink.fail_next == 1, "the first write to fail")
        access_log.record(numbered(1))
        wait_until(lambda: sink.fail_next == 0, "the second write to fail")
        access_log.record(numbered(2))
        wait_until(lambda: access_log.written == 1, "the third line written")
        stop(access_log, clock)
    finally:
        globalLogPublisher.removeObserver(observer)
    assert dropped(registry, "write_failed") == 2
    assert [json.loads(line)["request_id"] for line in sink.lines] == ["r2"]
    formats = [str(e.get("log_format")) for e in events]
    assert formats.count("access log: writing failed; lines are being lost") == 1
    assert formats.count("access log: writing works again; {count} lines were lost") == 1


def test_stop_flushes_what_is_buffered_and_closes_the_sink() -> None:
    clock = ThreadedClock()
    sink = ListSink(held=True)
    access_log = make_log(sink, clock)
    access_log.startService()
    access_log.record(numbered(0))
    assert sink.entered.wait(WAIT)
    for i in range(1, 200):
        access_log.record(numbered(i))
    assert access_log.pending == 199
    d = access_log.stopService()
    assert isinstance(d, Deferred)
    assert not d.called
    assert not sink.closed
    sink.release.set()
    stop_results: list[object] = []
    d.addBoth(stop_results.append)
    clock.run_until(lambda: bool(stop_results), "the flush")
    assert stop_results == [None]
    assert len(sink.lines) == 200
    assert sink.closed


def test_stop_gives_up_on_a_blocked_sink_after_the_timeout() -> None:
    clock = ThreadedClock()
    sink = ListSink(held=True)
    access_log = make_log(sink, clock)
    access_log.startService()
    access_log.record(numbered(0))
    access_log.record(numbered(1))
    assert sink.entered.wait(WAIT)
    d = access_log.stopService()
    assert isinstance(d, Deferred)
    clock.advance(access_log.stop_timeout)
    results: list[object] = []
    d.addBoth(results.append)
    assert results == [None]  # the router's shutdown goes on
    sink.release.set()  # let the thread end
    assert access_log._thread is not None
    access_log._thread.join(WAIT)
    assert not access_log._thread.is_alive()


def test_stop_before_start_closes_the_sink() -> None:
    sink = ListSink()
    access_log = make_log(sink)
    assert access_log.stopService() is None
    assert sink.closed


def test_reopen_after_rename_writes_a_new_file(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    clock = ThreadedClock()
    access_log = make_log(FileSink(str(path)), clock, format="text")
    access_log.startService()
    access_log.record(numbered(0))
    access_log.record(numbered(1))
    wait_until(lambda: access_log.written == 2, "two lines written")
    rotated = tmp_path / "access.log.1"
    path.rename(rotated)  # logrotate
    access_log.record(numbered(2))  # not reopened yet: still the renamed file
    wait_until(lambda: access_log.written == 3, "a third line written")
    assert not path.exists()
    access_log.reopen()
    access_log.record(numbered(3))
    access_log.record(numbered(4))
    stop(access_log, clock)
    assert _ids(rotated) == ["r0", "r1", "r2"]
    assert _ids(path) == ["r3", "r4"]


def _ids(path: Path) -> list[str]:
    return [line.split("request_id=")[1].split(" ")[0] for line in path.read_text().splitlines()]


def test_a_failed_reopen_keeps_the_old_file(tmp_path: Path) -> None:
    directory = tmp_path / "logs"
    directory.mkdir()
    path = directory / "access.log"
    clock = ThreadedClock()
    access_log = make_log(FileSink(str(path)), clock, format="text")
    access_log.startService()
    moved = tmp_path / "moved"
    directory.rename(moved)  # the path cannot be opened again
    access_log.reopen()
    access_log.record(numbered(0))
    stop(access_log, clock)
    assert _ids(moved / "access.log") == ["r0"]


def test_sigusr1_reopens_on_the_reactor_thread() -> None:
    clock = ThreadedClock()
    sink = ListSink()
    access_log = make_log(sink, clock)
    access_log.startService()
    before = signal.getsignal(signal.SIGUSR1)
    reopener = SignalService(clock, signal.SIGUSR1, access_log.reopen)
    reopener.startService()
    try:
        assert signal.getsignal(signal.SIGUSR1) != before
        os.kill(os.getpid(), signal.SIGUSR1)
        # The handler only hops to the reactor thread; the reopen happens from there.
        f, args, kwargs = clock.from_threads.get(timeout=WAIT)
        assert (f, args, kwargs) == (access_log.reopen, (), {})  # one service for both signals
        assert sink.reopened == 0
        f()
        wait_until(lambda: sink.reopened == 1, "the writer to reopen")
    finally:
        reopener.stopService()
    assert signal.getsignal(signal.SIGUSR1) == before
    stop(access_log, clock)


def test_stream_sink_writes_to_its_descriptor() -> None:
    read_end, write_end = os.pipe()
    try:
        StreamSink(write_end).write(["one", 'two "2"', "é"])
        assert os.read(read_end, 100) == 'one\ntwo "2"\né\n'.encode()
    finally:
        os.close(read_end)
        os.close(write_end)


# -- config and wiring


def _parse(access_log: object) -> AccessLogConfig:
    raw = {"observability": {"accessLog": access_log}}
    return parse_config(raw, "router.yaml", Path("."), []).observability.access_log


def test_config_defaults_and_values() -> None:
    assert _parse({}) == AccessLogConfig(True, "json", "stdout", 1.0, 10000)
    assert _parse(
        {"format": "text", "output": "/var/log/a.log", "sampleRate": 0.1, "bufferSize": 50}
    ) == AccessLogConfig(True, "text", "/var/log/a.log", 0.1, 50)
    assert _parse({"sampleRate": 0}).sample_rate == 0.0
    assert _parse({"sampleRate": 1}).sample_rate == 1.0


BAD_ACCESS_LOG: list[tuple[object, str]] = [
    (
        {"sampleRate": 1.5},
        "router.yaml: observability.accessLog.sampleRate: must be a share from 0 to 1, not 1.5",
    ),
    ({"sampleRate": -0.1}, "observability.accessLog.sampleRate: must be at least 0, not -0.1"),
    ({"sampleRate": float("nan")}, "observability.accessLog.sampleRate: must be a share from 0"),
    ({"sampleRate": "10%"}, "observability.accessLog.sampleRate: must be a number, not a string"),
    ({"bufferSize": 0}, "observability.accessLog.bufferSize: must be at least 1, not 0"),
    ({"bufferSize": 1.5}, "observability.accessLog.bufferSize: must be a whole number"),
    ({"output": ""}, "observability.accessLog.output: must not be empty"),
    ({"sample_rate": 1}, "observability.accessLog.sample_rate: unknown field"),
]


@pytest.mark.parametrize(("access_log", "message"), BAD_ACCESS_LOG)
def test_bad_config_names_the_field(access_log: object, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        _parse(access_log)
    assert message in str(e.value)


def test_sink_for_outputs(tmp_path: Path) -> None:
    stdout, stderr = sink_for("stdout"), sink_for("stderr")
    assert isinstance(stdout, StreamSink)
    assert stdout.fd == 1
    assert isinstance(stderr, StreamSink)
    assert stderr.fd == 2
    file_sink = sink_for(str(tmp_path / "a.log"))
    assert isinstance(file_sink, FileSink)
    file_sink.close()
    with pytest.raises(ConfigError) as e:
        sink_for(str(tmp_path / "missing" / "a.log"), "router.yaml")
    assert str(e.value) == (
        f"router.yaml: observability.accessLog.output: cannot open "
        f"{str(tmp_path / 'missing' / 'a.log')!r}: No such file or directory"
    )


def test_disabled_access_log_is_not_built(tmp_path: Path) -> None:
    config = AccessLogConfig(enabled=False, output=str(tmp_path / "a.log"))
    assert access_log_for(config, CollectorRegistry(), ThreadedClock()) is None
    assert not (tmp_path / "a.log").exists()


def _router(tmp_path: Path, **access_log: Any) -> RouterService:
    raw = {"observability": {"accessLog": {"output": str(tmp_path / "a.log"), **access_log}}}
    config = parse_config(raw, "router.yaml", Path("."), [])
    return RouterService(config, cast(IServerReactor, ThreadedClock()), CollectorRegistry())


def test_router_service_wires_the_access_log(tmp_path: Path) -> None:
    router = _router(tmp_path)
    access_log = router.access_log
    assert access_log is not None
    assert access_log.parent is router
    assert access_log in router.plane.observers.observers
    assert isinstance(access_log.sink, FileSink)
    assert router.registry.get_sample_value(DROPPED_METRIC, {"reason": "buffer_full"}) == 0
    assert not any(isinstance(s, SignalService) for s in router)  # not unless asked
    access_log.sink.close()

    off = _router(tmp_path, enabled=False)
    assert off.access_log is None
    assert not any(isinstance(o, AccessLog) for o in off.plane.observers.observers)


def test_router_service_handles_sigusr1_when_asked(tmp_path: Path) -> None:
    raw = {"observability": {"accessLog": {"output": str(tmp_path / "a.log")}}}
    config = parse_config(raw, "router.yaml", Path("."), [])
    router = RouterService(
        config,
        cast(IServerReactor, ThreadedClock()),
        CollectorRegistry(),
        install_signal_handlers=True,
    )
    assert router.access_log is not None
    (reopener,) = [s for s in router if isinstance(s, SignalService)]
    assert reopener.signum == signal.SIGUSR1
    assert reopener.callback == router.access_log.reopen
    children = list(router)
    assert children.index(reopener) == children.index(router.access_log) + 1
    router.access_log.sink.close()


def test_every_request_through_the_harness_is_recorded_once() -> None:
    h = RouterHarness()
    clock = ThreadedClock()
    sink = ListSink()
    access_log = make_log(sink, clock)
    h.plane.observers.add(access_log)
    access_log.startService()
    h.chat()
    h.upstream.last.respond_json(COMPLETION)
    h.post(CHAT, {"model": "nope", "messages": []})
    client = h.chat(stream=True)
    h.upstream.last.answer(sse_response())
    client.disconnect()
    stop(access_log, clock)
    records = [json.loads(line) for line in sink.lines]
    assert [r["request_id"] for r in records] == [c.request_id for c in h.contexts]
    assert [(r["status_code"], r.get("error", {}).get("type")) for r in records] == [
        (200, None),
        (404, "route_not_found"),
        (200, "client_disconnect"),
    ]


def test_stream_lines_go_out_in_whole_pipe_writes() -> None:
    """Workers share standard output: each write is at most PIPE_BUF bytes, cut between
    lines, so that no line from one process lands inside another's."""
    import select

    from kthena.observability.accesslog import line_chunks

    lines = [f"line {i} " + "x" * (i * 37 % 900) for i in range(60)]
    long_line = "y" * (select.PIPE_BUF + 10)
    chunks = list(line_chunks([*lines, long_line, "after"]))
    assert (
        b"".join(chunks) == "".join(f"{line}\n" for line in [*lines, long_line, "after"]).encode()
    )
    assert all(c.endswith(b"\n") for c in chunks)
    assert len(chunks) > 5
    assert [len(c) > select.PIPE_BUF for c in chunks].count(True) == 1  # the long line alone
    assert chunks[-2] == long_line.encode() + b"\n"
