"""The proxy site: request bodies kept in memory, capped, through the real HTTPChannel."""

from __future__ import annotations

import tempfile
from io import BytesIO

import pytest
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.web.resource import Resource
from twisted.web.server import Request

from kthena.proxy.site import CappedRequest, ProxySite

CAP = 300_000


class Seen:
    """What the resource saw of one request."""

    def __init__(self, request: Request) -> None:
        content = request.content
        assert content is not None
        self.content = content
        self.body = content.getvalue() if isinstance(content, BytesIO) else None
        self.too_large = bool(getattr(request, "too_large", False))
        self.kind = type(request)
        self.args = dict(request.args or {})


class Recorder(Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[Seen] = []

    def render(self, request: Request) -> bytes:
        self.seen.append(Seen(request))
        return b"ok"


class Harness:
    def __init__(self, cap: int = CAP) -> None:
        self.resource = Recorder()
        self.site = ProxySite(self.resource, cap)
        self.site.reactor = MemoryReactorClock()
        self.transport = StringTransport()
        protocol = self.site.buildProtocol(None)
        assert protocol is not None
        self.protocol = protocol
        protocol.makeConnection(self.transport)

    def send(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def post(self, body: bytes, content_type: str = "application/json") -> None:
        self.send(
            b"POST /v1/completions HTTP/1.1\r\nHost: r\r\n"
            + f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body
        )

    def post_chunked(self, *chunks: bytes) -> None:
        self.send(b"POST /v1/completions HTTP/1.1\r\nHost: r\r\nTransfer-Encoding: chunked\r\n\r\n")
        for chunk in chunks:
            self.send(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        self.send(b"0\r\n\r\n")

    @property
    def last(self) -> Seen:
        assert self.resource.seen, self.transport.value()
        return self.resource.seen[-1]

    def responses(self) -> int:
        return int(self.transport.value().count(b"HTTP/1.1 200 OK"))


@pytest.fixture(autouse=True)
def no_temp_files(monkeypatch: pytest.MonkeyPatch) -> None:
    """twisted.web spools bodies of 100 kB and more to a temporary file: never here."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a request body went to a temporary file")

    monkeypatch.setattr(tempfile, "TemporaryFile", refuse)


def test_site_builds_capped_requests() -> None:
    h = Harness()
    h.post(b"{}")
    assert h.last.kind is CappedRequest


def test_small_body_in_memory() -> None:
    h = Harness()
    h.post(b'{"model": "m"}')
    assert isinstance(h.last.content, BytesIO)
    assert h.last.body == b'{"model": "m"}'
    assert not h.last.too_large
    assert h.responses() == 1


@pytest.mark.parametrize("size", [100_000, 250_000, CAP])
def test_large_body_under_the_cap_in_memory(size: int) -> None:
    h = Harness()
    body = b"x" * size
    h.post(body)
    assert isinstance(h.last.content, BytesIO)
    assert h.last.body == body
    assert not h.last.too_large


def test_chunked_body_under_the_cap_in_memory() -> None:
    h = Harness()
    parts = [b"a" * 120_000, b"b" * 120_000, b"c" * (CAP - 240_000)]
    h.post_chunked(*parts)
    assert isinstance(h.last.content, BytesIO)
    assert h.last.body == b"".join(parts)
    assert not h.last.too_large


def test_body_over_the_cap_by_content_length_is_dropped() -> None:
    h = Harness()
    h.post(b"y" * (CAP + 1))
    assert h.last.too_large
    assert h.last.body == b""
    assert h.responses() == 1


def test_body_over_the_cap_by_chunks_is_dropped() -> None:
    h = Harness()
    h.post_chunked(b"a" * 200_000, b"b" * 100_000, b"c")
    assert h.last.too_large
    assert h.last.body == b""
    assert h.responses() == 1


def test_chunked_body_dropped_at_once_when_one_chunk_is_over_the_cap() -> None:
    h = Harness(cap=10)
    h.post_chunked(b"0123456789A", b"more")
    assert h.last.too_large
    assert h.last.body == b""


def test_connection_usable_after_a_body_over_the_cap() -> None:
    h = Harness(cap=1000)
    h.post(b"z" * 5000)
    h.post(b'{"next": true}')
    assert [s.too_large for s in h.resource.seen] == [True, False]
    assert h.last.body == b'{"next": true}'
    assert h.responses() == 2


def test_cap_read_from_the_site_for_each_request() -> None:
    h = Harness(cap=100)
    h.post(b"q" * 150)
    h.site.max_body_bytes = 200
    h.post(b"q" * 150)
    first, second = h.resource.seen
    assert (first.too_large, first.body) == (True, b"")
    assert (second.too_large, second.body) == (False, b"q" * 150)


def test_form_bodies_not_parsed() -> None:
    h = Harness()
    h.post(b"a=1&b=2", content_type="application/x-www-form-urlencoded")
    assert h.last.args == {}
    assert h.last.body == b"a=1&b=2"
