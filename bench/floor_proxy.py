#!/usr/bin/env python3
"""
The floor under any proxy on this stack: Twisted transports and httptools on both sides,
keep-alive connections to the backend, and nothing else (no limits, no timeouts, no
chunked bodies, no errors handled: bodies are whole and sized, as nginx's are in
bench/router_bench.py). What the router spends above this is its own work; what this
spends is the interpreter, the reactor and the parser, which no Python router avoids.

    python3 bench/floor_proxy.py --listen 18095 --backend 127.0.0.20:8000

Loopback only; it runs until killed (bench/router_bench.py --floor starts and stops it).
"""

from __future__ import annotations

import argparse

from httptools import HttpRequestParser, HttpResponseParser
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import Factory, Protocol

HOP = {b"connection", b"content-length", b"transfer-encoding", b"keep-alive", b"host"}


class Backend(Protocol):
    """One keep-alive connection to the backend; answers go to the client that asked."""

    def __init__(self, idle: list[Backend]) -> None:
        self.idle = idle
        self.client: Front | None = None
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []
        self.complete = False

    def connectionMade(self) -> None:
        self.transport.setTcpNoDelay(True)  # type: ignore[union-attr]
        self.parser = HttpResponseParser(self)

    def send(self, request: bytes, client: Front) -> None:
        self.client, self.headers, self.body, self.complete = client, [], [], False
        self.transport.write(request)  # type: ignore[union-attr]

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        self.complete = True

    def dataReceived(self, data: bytes) -> None:
        self.parser.feed_data(data)
        if not self.complete or self.client is None:
            return
        body = b"".join(self.body)
        head = [b"HTTP/1.1 %d OK\r\n" % self.parser.get_status_code()]
        head += [n + b": " + v + b"\r\n" for n, v in self.headers if n.lower() not in HOP]
        head.append(b"content-length: %d\r\n\r\n" % len(body))
        client, self.client = self.client, None
        self.idle.append(self)
        client.transport.write(b"".join(head) + body)  # type: ignore[union-attr]


class Front(Protocol):
    """One client connection: each request goes to an idle backend connection (or a new one)."""

    def __init__(self, backend: tuple[str, int], idle: list[Backend]) -> None:
        self.backend = backend
        self.idle = idle

    def connectionMade(self) -> None:
        self.transport.setTcpNoDelay(True)  # type: ignore[union-attr]
        self.parser = HttpRequestParser(self)

    def on_message_begin(self) -> None:
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        body = b"".join(self.body)
        host, port = self.backend
        head = [self.parser.get_method() + b" " + self.url + b" HTTP/1.1\r\n"]
        head += [n + b": " + v + b"\r\n" for n, v in self.headers if n.lower() not in HOP]
        head.append(b"host: %s:%d\r\ncontent-length: %d\r\n\r\n" % (host.encode(), port, len(body)))
        request = b"".join(head) + body
        if self.idle:
            self.idle.pop().send(request, self)
            return
        connecting = TCP4ClientEndpoint(reactor, host, port).connect(
            Factory.forProtocol(lambda: Backend(self.idle))
        )
        connecting.addCallback(lambda backend: backend.send(request, self))

    def dataReceived(self, data: bytes) -> None:
        self.parser.feed_data(data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--listen", type=int, required=True)
    parser.add_argument("--backend", required=True, help="host:port")
    args = parser.parse_args()
    host, port = args.backend.rsplit(":", 1)
    idle: list[Backend] = []
    factory = Factory.forProtocol(lambda: Front((host, int(port)), idle))
    factory.noisy = False
    reactor.listenTCP(args.listen, factory, interface="127.0.0.1")  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]


if __name__ == "__main__":
    main()
