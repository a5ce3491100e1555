"""
The proxy's channel against slow and hostile clients: deadlines for the request head and
body (408), over-long request lines (414), oversized heads (431), malformed requests
(400); each answered with an OpenAI error object, closed, and recorded. On both HTTP
servers (the lean one and twisted.web's, C{downstream.server}): they promise the same.
"""

from __future__ import annotations

import json

import pytest

from kthena.errors import ErrorType
from tests.unit.proxyfixtures import BASE_MODEL, SERVER_OVERRIDE, RouterHarness
from tests.unit.test_proxy_resource import COMPLETION, HEX32, assert_error

HEAD = b"POST /v1/chat/completions HTTP/1.1\r\nHost: router\r\n"


@pytest.fixture(autouse=True, params=["lean", "twisted"])
def server(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test here, on each HTTP server."""
    monkeypatch.setenv(SERVER_OVERRIDE, request.param)
    return str(request.param)


def test_slowloris_gets_408_after_the_head_deadline() -> None:
    h = RouterHarness()
    client = h.client()
    client.send(HEAD)
    for _ in range(9):  # one header byte a second: each resets any idle timer
        h.clock.advance(1)
        client.send(b"X")
        assert client.response is None
    h.clock.advance(1)
    response = client.got()
    error = assert_error(response, 408, ErrorType.REQUEST_TIMEOUT)
    assert error["message"] == "the request head did not arrive within 10.0s"
    assert response.header("connection") == "close"
    assert client.transport.disconnecting
    ctx = h.context
    assert (ctx.method, ctx.path, ctx.status) == ("POST", "/v1/chat/completions", 408)
    assert ctx.finished is not None and ctx.finished - ctx.started == 10
    assert (
        h.metrics.requests.value(("unknown", "/v1/chat/completions", "408", "request_timeout")) == 1
    )
    client.send(b": more\r\n\r\n")  # after the answer: ignored
    assert len(h.contexts) == 1


def test_the_head_deadline_is_configurable() -> None:
    h = RouterHarness(downstream={"headerTimeout": "2s"})
    client = h.client()
    client.send(b"GET /healthz HTTP/1.1\r\n")
    h.clock.advance(2)
    assert client.got().status == 408


def test_a_body_that_never_arrives_gets_408() -> None:
    h = RouterHarness(downstream={"bodyTimeout": "30s"})
    client = h.client()
    client.send(HEAD + b"Content-Length: 100\r\n\r\n" + b"{" * 10)
    h.clock.advance(29)
    client.send(b"{" * 10)
    assert client.response is None
    h.clock.advance(1)
    error = assert_error(client.got(), 408, ErrorType.REQUEST_TIMEOUT)
    assert error["message"] == "the request body did not arrive within 30.0s"
    assert h.upstream.calls == []
    assert h.context.status == 408


def test_a_request_in_time_leaves_no_deadline_behind() -> None:
    h = RouterHarness()
    client = h.chat()
    h.clock.advance(100)  # the pod takes its time: no client deadline applies
    h.upstream.last.respond_json(COMPLETION)
    assert client.got().status == 200
    assert len(h.contexts) == 1
    # Keep-alive: the next request on the connection has its own deadline.
    client.send(b"GET /healthz HTTP/1.1\r\n")
    h.clock.advance(10)
    assert client.transport.disconnecting
    assert b"408 Request Timeout" in client.transport.value()


def test_an_idle_keep_alive_connection_is_closed() -> None:
    h = RouterHarness(downstream={"idleTimeout": "5s"})
    client = h.client()
    h.clock.advance(5)
    assert client.transport.disconnecting
    assert h.contexts == []  # no request, nothing to record


def test_an_over_long_request_line_is_414() -> None:
    h = RouterHarness()
    client = h.client()
    client.send(b"GET /v1/models/" + b"x" * 20_000 + b" HTTP/1.1\r\n")
    response = client.got()
    assert_error(response, 414, ErrorType.URI_TOO_LONG)
    assert client.transport.disconnecting
    ctx = h.context
    assert ctx.method == "GET"
    assert ctx.path.startswith("/v1/models/xxx") and len(ctx.path) == 256
    assert h.metrics.path_label(ctx.path) == "/v1/models/{model}"


def test_oversized_headers_are_431() -> None:
    h = RouterHarness()
    client = h.client()
    client.send(HEAD + b"".join(b"X-Pad-%d: %s\r\n" % (i, b"y" * 100) for i in range(200)))
    assert_error(client.got(), 431, ErrorType.HEADERS_TOO_LARGE)
    assert (h.context.status, h.context.path) == (431, "/v1/chat/completions")


def test_one_huge_header_line_is_431() -> None:
    h = RouterHarness()
    client = h.client()
    client.send(HEAD + b"X-Big: " + b"y" * 20_000)
    assert_error(client.got(), 431, ErrorType.HEADERS_TOO_LARGE)


def test_a_malformed_request_is_400_with_a_json_error() -> None:
    h = RouterHarness()
    client = h.client()
    client.send(HEAD + b"no colon here\r\n\r\n")
    error = assert_error(client.got(), 400, ErrorType.BAD_REQUEST)
    assert error["message"] == "malformed HTTP request"
    assert h.context.status == 400


def test_pipelined_requests_are_answered_in_order() -> None:
    h = RouterHarness()
    client = h.client()
    body = json.dumps({"model": BASE_MODEL, "messages": []}).encode()
    one = HEAD + b"Content-Length: %d\r\n\r\n" % len(body) + body
    client.send(one + b"GET /healthz HTTP/1.1\r\nHost: router\r\n\r\n")
    h.clock.advance(30)  # the second head is complete: its deadline does not apply
    h.upstream.last.respond_json(COMPLETION)
    raw = client.transport.value()
    assert raw.count(b"HTTP/1.1 200 OK") == 2
    assert raw.index(b"cmpl-1") < raw.index(b'{"message":"ok"}')
    assert sorted(c.path for c in h.contexts) == ["/healthz", "/v1/chat/completions"]
    assert all(HEX32.match(c.request_id) for c in h.contexts)
