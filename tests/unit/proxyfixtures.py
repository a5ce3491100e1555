"""
In-memory harness for the proxy's unit tests: a L{RouterCore} on a L{MemoryReactorClock}
whose upstream client is a fake the test answers by hand, a L{ProxySite} driven through
its real L{HTTPChannel} over a L{StringTransport}, and a small HTTP/1.1 response parser
for what the client received.

The harness serves through the HTTP server its config names (C{downstream.server}: the lean
one, L{LeanSite}, by default); C{KTHENA_TEST_SERVER=twisted} (or C{lean}) in the
environment overrides it, so that the same tests check both HTTP layers.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from prometheus_client import CollectorRegistry
from twisted.application.service import Service
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import CancelledError, Deferred, maybeDeferred, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IProtocol, IPushProducer
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone, ResponseNeverReceived
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IResponse
from twisted.web.server import Request, Site
from zope.interface import implementer

from kthena.config.router import RouterConfig, parse_config
from kthena.fairness.service import FairQueues
from kthena.http.server import LeanSite
from kthena.identity.identity import build_identity
from kthena.interfaces import IReconfigurable, IScheduler, IServerReactor, IUpstream
from kthena.lifecycle import SequentialMultiService
from kthena.observability.metrics import RouterMetrics
from kthena.pipeline.pipeline import Pipeline
from kthena.pipeline.plane import DataPlane
from kthena.pipeline.settle import Observer
from kthena.pods import PodEndpoint
from kthena.proxy.resource import ProxyResource
from kthena.proxy.site import ProxySite
from kthena.ratelimit.service import RateLimits
from kthena.record import RequestRecord
from kthena.scheduler.framework import Decision, SchedulingRequest
from kthena.store import Datastore
from tests.unit.routerfixtures import Doc, pod, route, server

BASE_MODEL = "m"
LORA = "m-lora"
UPSTREAM_MODEL = "org/real-model"
PLAIN_MODEL = "plain"
"""Routed to a server without C{model}: the body goes out as received."""
EMPTY_MODEL = "lonely"
"""Routed to a server without pods."""
CLIENT_IP = "10.9.8.7"


@implementer(IScheduler)
class OrderedScheduler:
    """Candidates by pod name, so tests know which pod each attempt goes to."""

    def __init__(self) -> None:
        self.refuse = False

    def schedule(self, request: SchedulingRequest) -> Decision:
        if self.refuse:
            return Decision(candidates=[], failed_filter="test-refusal", request=request)
        return Decision(candidates=sorted(request.pods, key=lambda p: p.name), request=request)

    def scheduled(self, decision: Decision, pod: PodEndpoint) -> None:
        pass

    def forget_pods(self, keys: set[str]) -> None:
        pass

    def prefix_entries(self) -> int:
        return 0


@implementer(IPushProducer)
class BodyTransport:
    """The transport a response body protocol is connected to; records flow control."""

    def __init__(self) -> None:
        self.paused = 0
        self.resumed = 0
        self.stopped = 0

    def pauseProducing(self) -> None:
        self.paused += 1

    def resumeProducing(self) -> None:
        self.resumed += 1

    def stopProducing(self) -> None:
        self.stopped += 1


@implementer(IResponse)
class FakeResponse:
    """An upstream response whose body the test feeds chunk by chunk."""

    def __init__(
        self,
        code: int = 200,
        headers: dict[str, list[str]] | None = None,
        phrase: bytes = b"OK",
        body: bytes = b"",
    ) -> None:
        self.body = body
        """The whole body, for L{UpstreamCall.respond} to send."""
        self.version = (b"HTTP", 1, 1)
        self.code = code
        self.phrase = phrase
        self.headers = Headers({k: list(v) for k, v in (headers or {}).items()})
        # As Agent: the Content-Length, else unknown (chunked or ended by the close).
        declared = self.headers.getRawHeaders(b"content-length")
        self.length = int(declared[0]) if declared else UNKNOWN_LENGTH
        self.request = None
        self.previousResponse: IResponse | None = None
        self.transport = BodyTransport()
        self.protocol: IProtocol | None = None

    def deliverBody(self, protocol: IProtocol) -> None:
        self.protocol = protocol
        protocol.makeConnection(self.transport)  # type: ignore[arg-type]

    def setPreviousResponse(self, response: IResponse) -> None:
        self.previousResponse = response

    def send(self, data: bytes) -> None:
        assert self.protocol is not None, "nobody took the body"
        self.protocol.dataReceived(data)

    def end(self, reason: Failure | None = None) -> None:
        assert self.protocol is not None, "nobody took the body"
        self.protocol.connectionLost(reason or Failure(ResponseDone()))


def json_response(value: object, code: int = 200, **headers: list[str]) -> FakeResponse:
    body = json.dumps(value).encode()
    return FakeResponse(
        code,
        {"content-type": ["application/json"], "content-length": [str(len(body))], **headers},
        body=body,
    )


def sse_response(**headers: list[str]) -> FakeResponse:
    return FakeResponse(200, {"content-type": ["text/event-stream"], **headers})


@dataclass(eq=False)
class UpstreamCall:
    """One request the proxy sent to a pod, with the Deferred the test fires."""

    pod: PodEndpoint
    scheme: str
    method: bytes
    uri: bytes
    headers: Headers
    body: bytes | None
    result: Deferred[IResponse] = field(default_factory=Deferred)
    cancelled: bool = False

    def json(self) -> Any:
        assert self.body is not None
        return json.loads(self.body)

    def header(self, name: str) -> list[str] | None:
        values = self.headers.getRawHeaders(name)
        return None if values is None else list(values)

    def answer(self, response: FakeResponse) -> FakeResponse:
        self.result.callback(response)
        return response

    def respond(self, response: FakeResponse) -> FakeResponse:
        """Answer with C{response} and its whole body."""
        self.result.callback(response)
        if response.protocol is not None:
            response.send(response.body)
            response.end()
        return response

    def respond_json(self, value: object, code: int = 200) -> FakeResponse:
        return self.respond(json_response(value, code))

    def fail(self, error: Exception) -> None:
        self.result.errback(Failure(error))


@implementer(IUpstream)
class FakeUpstream(Service):
    """Stands in for L{kthena.proxy.upstream.Upstream}: records every request."""

    def __init__(self) -> None:
        self.calls: list[UpstreamCall] = []
        self.closed = 0
        self.idle: dict[str, int] = {}

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return self.close()

    def configure(self, config: Any) -> None:
        pass

    def idle_connections(self, pod: PodEndpoint) -> int:
        return self.idle.get(pod.key, 0)

    def request(
        self,
        pod: PodEndpoint,
        scheme: str,
        method: bytes,
        uri: bytes,
        headers: Headers,
        body: bytes | None,
    ) -> Deferred[IResponse]:
        call = UpstreamCall(pod, scheme, method, uri, headers, body)

        def cancel(d: Deferred[IResponse]) -> None:
            # As Agent does once the request is written: it aborts the connection and
            # the request fails with ResponseNeverReceived, not CancelledError.
            call.cancelled = True
            d.errback(Failure(ResponseNeverReceived([Failure(CancelledError())])))

        call.result = Deferred(cancel)
        self.calls.append(call)
        return call.result

    def close(self) -> Deferred[None]:
        self.closed += 1
        return succeed(None)

    @property
    def last(self) -> UpstreamCall:
        assert self.calls, "nothing was sent upstream"
        return self.calls[-1]


class RecordingResource(ProxyResource):
    """The proxy resource, keeping each request it rendered."""

    def __init__(self, pipeline: Pipeline) -> None:
        super().__init__(pipeline)
        self.requests: list[Request] = []

    def render(self, request: Request) -> int:
        self.requests.append(request)
        return super().render(request)


class Ended(Observer):
    """An observer calling C{hook} with each record at its end."""

    def __init__(self, hook: Callable[[RequestRecord], object]) -> None:
        self.hook = hook

    def ended(self, record: RequestRecord) -> None:
        self.hook(record)


@dataclass
class WireResponse:
    """An HTTP/1.1 response as the client received it."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes
    complete: bool

    def header(self, name: str) -> str | None:
        values = self.values(name)
        return values[-1] if values else None

    def values(self, name: str) -> list[str]:
        return [v for n, v in self.headers if n == name.lower()]

    def json(self) -> Any:
        assert self.complete, self
        return json.loads(self.body)

    def events(self) -> list[str]:
        """The C{data:} payloads of the SSE events received so far."""
        text = self.body.decode()
        return [e[len("data: ") :] for e in text.split("\n\n") if e.startswith("data: ")]


def parse_response(raw: bytes) -> WireResponse | None:
    """Parse one response (C{None} until its headers arrived)."""
    head, sep, rest = raw.partition(b"\r\n\r\n")
    if not sep:
        return None
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = []
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers.append((name.strip().lower(), value.strip()))
    names = dict(headers)
    if names.get("transfer-encoding") == "chunked":
        body = b""
        complete = False
        while True:
            size_line, sep, after = rest.partition(b"\r\n")
            if not sep:
                break
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                complete = after.startswith(b"\r\n")
                break
            if len(after) < size + 2:
                body += after[:size]
                break
            body += after[:size]
            rest = after[size + 2 :]
        return WireResponse(status, headers, body, complete)
    if "content-length" in names:
        length = int(names["content-length"])
        return WireResponse(status, headers, rest[:length], len(rest) >= length)
    return WireResponse(status, headers, rest, False)


CLIENT_PEER = IPv4Address("TCP", CLIENT_IP, 40000)
SERVER_OVERRIDE = "KTHENA_TEST_SERVER"
"""The environment variable naming the HTTP server every harness serves through."""


class Client:
    """One client connection to a site (the proxy's, or the admin one), in memory."""

    def __init__(
        self, site: Site | LeanSite, peer: IPv4Address | IPv6Address = CLIENT_PEER
    ) -> None:
        self.transport = StringTransport(peerAddress=peer)
        protocol = site.buildProtocol(None)
        assert protocol is not None
        self.protocol = protocol
        protocol.makeConnection(self.transport)

    def send(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: Iterable[tuple[str, str]] = (),
    ) -> None:
        lines = [f"{method} {path} HTTP/1.1", "Host: router"]
        lines += [f"{k}: {v}" for k, v in headers]
        names = {k.lower() for k, _ in headers}
        if body is not None and "content-length" not in names and "transfer-encoding" not in names:
            lines.append(f"Content-Length: {len(body)}")
        self.send("\r\n".join(lines).encode("latin-1") + b"\r\n\r\n" + (body or b""))

    @property
    def response(self) -> WireResponse | None:
        return parse_response(self.transport.value())

    def got(self) -> WireResponse:
        response = self.response
        assert response is not None, self.transport.value()
        return response

    def disconnect(self) -> None:
        self.protocol.connectionLost(Failure(ConnectionDone()))

    @property
    def aborted(self) -> bool:
        return bool(self.transport.disconnected)


def resources(
    traffic_policy: Doc | None = None,
    pods: int = 2,
    rate_limit: Doc | None = None,
) -> list[Doc]:
    """@param rate_limit: the C{rateLimit} of the routes of C{m} and C{lonely}."""
    spec: Doc = {"trafficPolicy": traffic_policy} if traffic_policy is not None else {}
    limit: Doc = {"rateLimit": rate_limit} if rate_limit is not None else {}
    return [
        route(
            "m",
            {
                "modelName": BASE_MODEL,
                "loraAdapters": [LORA],
                "rules": [{"name": "default", "targetModels": [{"modelServerName": "base"}]}],
                **limit,
            },
            created="2025-01-02T03:04:05Z",
        ),
        route(
            "plain",
            {
                "modelName": PLAIN_MODEL,
                "rules": [{"name": "default", "targetModels": [{"modelServerName": "plain"}]}],
            },
        ),
        route(
            "lonely",
            {
                "modelName": EMPTY_MODEL,
                "rules": [{"name": "default", "targetModels": [{"modelServerName": "empty"}]}],
                **limit,
            },
        ),
        server("base", {"app": "m"}, model=UPSTREAM_MODEL, **spec),
        server("plain", {"app": "plain"}),
        server("empty", {"app": "nothing"}),
        *(pod(f"p{i}", f"10.0.0.{i + 1}", {"app": "m"}) for i in range(pods)),
        pod("q0", "10.0.1.1", {"app": "plain"}),
    ]


def router_config(
    traffic_policy: Doc | None = None, pods: int = 2, rate_limit: Doc | None = None, **top: Any
) -> RouterConfig:
    raw = {"resources": resources(traffic_policy, pods, rate_limit), **top}
    return parse_config(raw, "t.yaml", Path("."), [])


class RouterHarness:
    """
    A router's data plane in memory, as the router's tree holds it: the upstream (a fake
    the test answers) then the data plane, whose stop is the drain; its metrics, and an
    observer recording every request's record (C{contexts}).
    """

    def __init__(
        self,
        traffic_policy: Doc | None = None,
        pods: int = 2,
        *,
        configured_scheduler: bool = False,
        rate_limit: Doc | None = None,
        **top: Any,
    ) -> None:
        """
        @param configured_scheduler: schedule with the config's plugins (Kthena's
            defaults unless C{scheduler} is given), not by pod name.
        """
        self.clock = MemoryReactorClock()
        self.config = router_config(traffic_policy, pods, rate_limit, **top)
        self.scheduler = OrderedScheduler()
        self.upstream = FakeUpstream()
        self.metrics = RouterMetrics(CollectorRegistry(), self.clock, self.config)
        self.contexts: list[RequestRecord] = []
        self.store = Datastore()
        self.store.replace(self.config.resources)
        # Tokenizer work runs at once here (a thread in the router).
        self.limits = RateLimits(self.clock, self.config, self.metrics.backend_error, maybeDeferred)
        reactor = cast(IServerReactor, self.clock)
        self.identifier, self.jwks = build_identity(self.config.identity, reactor)
        self.fairness = FairQueues(
            reactor,
            self.config,
            self.metrics.fairness_queue_size,
            self.metrics.fairness_queue_duration,
        )
        self.metrics.scrape_hooks.append(self.fairness.before_scrape)
        self.plane = DataPlane(
            self.config,
            reactor,
            self.store,
            self.upstream,
            self.limits,
            self.identifier,
            self.fairness.fairness,
            [
                self.metrics,
                self.limits.limiter,
                self.fairness.observer,
                Ended(self.contexts.append),
            ],
            self.metrics.plugin_timer,
            self.metrics.ejected,
            None if configured_scheduler else self.scheduler,
        )
        self.tree = SequentialMultiService()
        self.upstream.setServiceParent(self.tree)
        for part in (self.jwks, self.limits, self.fairness, self.plane):
            part.setServiceParent(self.tree)
        self.resource = RecordingResource(self.plane.pipeline)
        self.site: ProxySite | LeanSite
        if os.environ.get(SERVER_OVERRIDE, self.config.downstream.server) == "lean":
            self.site = LeanSite(
                self.plane.pipeline.handle,
                self.config.max_body_bytes,
                self.clock,
                self.config.downstream,
                self.plane.pipeline.refused,
            )
        else:
            self.site = ProxySite(
                self.resource,
                self.config.max_body_bytes,
                self.clock,
                self.config.downstream,
                self.plane.pipeline.refused,
            )

    def pod(self, name: str) -> PodEndpoint:
        return self.store.pods[f"default/{name}"]

    def reload(self, config: RouterConfig) -> None:
        """A new config generation, as the router's tree hands it on."""
        self.store.replace(config.resources)
        for child in self.tree:
            if IReconfigurable.providedBy(child):
                child.reconfigure(config)
        self.config = config

    def in_flight(self) -> dict[str, int]:
        return {p.name: p.in_flight for p in self.store.pods.values()}

    def client(self) -> Client:
        return Client(self.site)

    def post(
        self,
        path: str,
        body: object,
        headers: Iterable[tuple[str, str]] = (),
    ) -> Client:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        client = self.client()
        client.request("POST", path, raw, [("Content-Type", "application/json"), *headers])
        return client

    def chat(self, headers: Iterable[tuple[str, str]] = (), **body: Any) -> Client:
        value = {"model": BASE_MODEL, "messages": [{"role": "user", "content": "hi"}], **body}
        return self.post("/v1/chat/completions", value, headers)

    def get(self, path: str) -> Client:
        client = self.client()
        client.request("GET", path)
        return client

    @property
    def context(self) -> RequestRecord:
        assert len(self.contexts) == 1, self.contexts
        return self.contexts[0]
