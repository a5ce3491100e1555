#!/usr/bin/env python3
"""
The baseline the router is measured against: a bare Twisted reverse proxy with no logic
at all (twisted.web's server, one Agent over a persistent pool, the body relayed as it
comes), so that "N x a bare Twisted proxy" compares the router's own work with the least
a Twisted proxy can do on the same machine in the same run.

    python3 bench/bare_proxy.py --listen 18090 --backend http://127.0.0.20:8000

Loopback only; it runs until killed (bench/router_bench.py starts and stops it).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from twisted.internet import reactor
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kthena.podclient import BytesBody  # the in-memory body the router sends too

SKIP = {b"connection", b"transfer-encoding", b"content-length", b"keep-alive", b"host"}


class Relay(Protocol):
    def __init__(self, request: Request) -> None:
        self.request = request

    def dataReceived(self, data: bytes) -> None:
        self.request.write(data)

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:  # noqa: B008
        if not self.request.finished:
            self.request.finish()


class QuietSite(Site):
    def log(self, request: Request) -> None:
        """No access log: the baseline does nothing it does not need."""


class BareProxy(Resource):
    isLeaf = True

    def __init__(self, agent: Agent, backend: bytes) -> None:
        super().__init__()
        self.agent = agent
        self.backend = backend

    def render(self, request: Request) -> int:
        assert request.content is not None
        body = request.content.read()
        headers = Headers(
            {k: v for k, v in request.requestHeaders.getAllRawHeaders() if k.lower() not in SKIP}
        )
        d = self.agent.request(request.method, self.backend + request.uri, headers, BytesBody(body))

        def relay(response: IResponse) -> None:
            request.setResponseCode(response.code, response.phrase)
            for name, values in response.headers.getAllRawHeaders():
                if name.lower() not in SKIP:
                    request.responseHeaders.setRawHeaders(name, values)
            response.deliverBody(Relay(request))

        def failed(failure: Failure) -> None:
            request.setResponseCode(502)
            request.write(failure.getErrorMessage().encode())
            request.finish()

        d.addCallbacks(relay, failed)
        return NOT_DONE_YET


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--listen", type=int, required=True)
    parser.add_argument("--backend", required=True, help="http://host:port of the backend")
    args = parser.parse_args()
    if not args.backend.startswith("http://127."):
        sys.exit("loopback backends only")
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = 64
    agent = Agent(reactor, pool=pool)
    site = QuietSite(BareProxy(agent, args.backend.rstrip("/").encode()))
    site.displayTracebacks = False
    reactor.listenTCP(args.listen, site, interface="127.0.0.1", backlog=1024)  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]


if __name__ == "__main__":
    main()
