"""
The parent's admin site under C{--workers}: the config's admin listener(s), serving

  - the metrics path: every worker's exposition merged (L{kthena.workers.merge}), then the
    parent's own families (workers running, restarts), as Prometheus text 0.0.4 (gzip when
    accepted); a worker that does not answer in time counts with what it last reported;
  - C{/debug/workers}: each worker's slot (index, pid, state, when it started, restarts);
  - any other C{/debug/...}: the same request asked of every running worker, answered
    as C{{"workers": [{"worker", "pid", "status", "body"}]}}, behind the config's debug
    access rules (the workers' private admin sockets only take local clients).

Workers are asked on their private Unix sockets, concurrently, with a deadline
(L{ASK_TIMEOUT}).
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Callable, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import gzip_accepted
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool, readBody
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory, IRequest
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET
from zope.interface import implementer

from kthena.interfaces import IServerReactor
from kthena.webutil import READ_METHODS, client_gone, json_body, method_not_allowed
from kthena.workers.merge import Merger, parse
from kthena.workers.supervisor import Worker

log = Logger()

ASK_TIMEOUT = 10.0
TEXT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"

Answer = tuple[int, bytes, bytes]
"""A worker's answer: status, content type, body."""


@implementer(IAgentEndpointFactory)
class _WorkerSockets:
    """C{http://worker-N/...} goes to worker N's admin socket."""

    def __init__(self, reactor: IServerReactor, workers: Sequence[Worker]) -> None:
        self.reactor = reactor
        self.workers = workers

    def endpointForURI(self, uri: Any) -> IStreamClientEndpoint:
        index = int(uri.host.decode("ascii").removeprefix("worker-"))
        return UNIXClientEndpoint(self.reactor, self.workers[index].admin, timeout=ASK_TIMEOUT)


class WorkerAsker:
    """Asks workers' admin sockets (one persistent connection pool for all)."""

    def __init__(self, reactor: IServerReactor, workers: Sequence[Worker]) -> None:
        self.reactor = reactor
        pool = HTTPConnectionPool(reactor, persistent=True)
        self.agent = Agent.usingEndpointFactory(reactor, _WorkerSockets(reactor, workers), pool)
        self.pool = pool

    def ask(self, worker: Worker, target: bytes, headers: dict[bytes, bytes]) -> Deferred[Answer]:
        """GET C{target} (path and query) of C{worker}."""
        url = b"http://worker-%d%s" % (worker.index, target)
        d = self.agent.request(b"GET", url, Headers({k: [v] for k, v in headers.items()}))

        def read(response: Any) -> Deferred[Answer]:
            kind = response.headers.getRawHeaders(b"content-type", [b""])[0]
            body: Deferred[bytes] = readBody(response)
            return body.addCallback(lambda body: (response.code, kind, body))

        answer: Deferred[Answer] = d.addCallback(read)
        return answer.addTimeout(ASK_TIMEOUT, self.reactor)


class MergedMetrics(Resource):
    """The metrics path of the parent (see the module docstring)."""

    isLeaf = True

    def __init__(
        self,
        asker: WorkerAsker,
        workers: Callable[[], list[Worker]],
        merger: Merger,
        registry: CollectorRegistry,
        path: str,
    ) -> None:
        super().__init__()
        self.asker = asker
        self.workers = workers
        self.merger = merger
        self.registry = registry
        self.path = path.encode()

    def collect(self) -> Deferred[bytes]:
        """Ask every running worker, then merge (a failed one counts with its last)."""
        live = self.workers()
        asked = []
        for worker in live:
            generation = worker.generation
            d = self.asker.ask(worker, self.path, {b"accept": b"text/plain"})
            d.addCallback(self._keep, worker, generation)
            d.addErrback(self._failed, worker)
            asked.append(d)

        def merged(_: object) -> bytes:
            current = [w.last for w in self.workers() if w.process is not None and w.last]
            return self.merger.merge(current).encode() + generate_latest(self.registry)

        return DeferredList(asked).addCallback(merged)

    @staticmethod
    def _keep(answer: Answer, worker: Worker, generation: int) -> None:
        code, _, body = answer
        if code != 200:
            raise ValueError(f"status {code}")
        if worker.generation == generation and worker.process is not None:
            worker.last = parse(body.decode("utf-8"))

    @staticmethod
    def _failed(failure: Failure, worker: Worker) -> None:
        log.warn(
            "worker {index}'s metrics: {why}; counting what it last reported",
            index=worker.index,
            why=failure.getErrorMessage(),
        )

    def render(self, request: IRequest) -> bytes | int:
        if request.method not in READ_METHODS:
            return method_not_allowed(request)
        gone = client_gone(request)
        zipped = gzip_accepted((request.getHeader(b"accept-encoding") or b"").decode("latin-1"))

        def send(body: bytes) -> None:
            if gone:
                return
            if zipped:
                body = gzip.compress(body, compresslevel=6)
                request.setHeader(b"content-encoding", b"gzip")
            request.setHeader(b"content-type", TEXT_TYPE)
            request.setHeader(b"vary", b"Accept-Encoding")
            request.setHeader(b"content-length", b"%d" % len(body))
            request.write(body)
            request.finish()

        def failed(failure: Failure) -> None:
            log.failure("merging the workers' metrics failed", failure)
            if not gone:
                request.write(json_body(request, 500, {"error": "merging metrics failed"}))
                request.finish()

        self.collect().addCallbacks(send, failed)
        return NOT_DONE_YET


def _decoded(kind: bytes, body: bytes) -> object:
    if kind.startswith(b"application/json"):
        try:
            return json.loads(body)
        except ValueError:
            pass
    return body.decode("utf-8", "replace")


class WorkersDebug(Resource):
    """C{/debug/...} of the parent (see the module docstring); behind the debug gate."""

    isLeaf = True

    def __init__(self, asker: WorkerAsker, workers: Sequence[Worker]) -> None:
        super().__init__()
        self.asker = asker
        self.workers = workers

    def render(self, request: IRequest) -> bytes | int:
        if request.postpath == [b"workers"]:
            return json_body(request, 200, {"workers": [w.view() for w in self.workers]})
        gone = client_gone(request)
        live = [w for w in self.workers if w.process is not None]
        asked = [self._ask(worker, request.uri) for worker in live]

        def send(results: list[tuple[bool, dict[str, object]]]) -> None:
            if not gone:
                request.write(json_body(request, 200, {"workers": [r for _, r in results]}))
                request.finish()

        DeferredList(asked).addCallback(send)
        return NOT_DONE_YET

    def _ask(self, worker: Worker, target: bytes) -> Deferred[dict[str, object]]:
        entry: dict[str, object] = {"worker": worker.index, "pid": worker.pid}
        d = self.asker.ask(worker, target, {b"accept": b"application/json"})

        def answered(answer: Answer) -> dict[str, object]:
            code, kind, body = answer
            return {**entry, "status": code, "body": _decoded(kind, body)}

        def failed(failure: Failure) -> dict[str, object]:
            return {**entry, "status": None, "error": failure.getErrorMessage()}

        return d.addCallbacks(answered, failed)
