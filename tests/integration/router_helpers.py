"""
Helpers for the router's integration and system tests (a plain module, imported).

In-process (L{Cluster}): routers and simulated pods as services of the test's own reactor,
on real loopback sockets, with an L{Agent} client; everything it starts is stopped by
L{Cluster.close}.  Out of process (L{RouterProcess}): C{twistd kthena-router} with a config
file written by the test, its port read from its own log line.

Nothing here imports the global reactor: the in-process fixture takes it inside.
"""

from __future__ import annotations

import http.client
import itertools
import json
import os
import re
import socket
import statistics
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, cast

import pytest
import pytest_twisted  # type: ignore[import-untyped]
import yaml
from openai import OpenAI
from prometheus_client import CollectorRegistry
from twisted.internet.defer import Deferred, DeferredSemaphore, gatherResults, succeed
from twisted.internet.interfaces import IConsumer
from twisted.internet.protocol import Protocol
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool, ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer, IResponse
from zope.interface import implementer

from kthena.config.router import parse_config
from kthena.interfaces import IServerReactor
from kthena.podclient import BytesBody
from kthena.record import RequestRecord
from kthena.service import RouterService, makeRouterService
from kthena.sim.engine import EngineConfig
from kthena.sim.service import SimConfig, SimService
from tests.integration.conftest import spawn_twistd, stop_process
from tests.unit.proxyfixtures import Ended
from tests.unit.routerfixtures import Doc, pod
from tests.unit.samples import sample_sum

F = TypeVar("F", bound=Callable[..., Any])

LOOPBACK = "127.0.0.1"
LISTEN = f"tcp:0:interface={LOOPBACK}"
ADMIN_LISTEN = f"tcp:port=0:interface={LOOPBACK}"
"""The admin listener (/metrics, /debug) on any free port; spelled unlike L{LISTEN} so that
the proxy's "listening on" log line stays the only one with that description."""
REQUEST_ID = re.compile(r"^[0-9a-f]{32}$")


# -- pytest-twisted, typed (the package ships no type information)


def inline(test: F) -> F:
    """C{pytest_twisted.ensureDeferred}: run an C{async def} test on the reactor."""
    return cast(F, pytest_twisted.ensureDeferred(test))


def async_yield_fixture(fixture: F) -> F:
    """C{pytest_twisted.async_yield_fixture}, function scope."""
    return cast(F, pytest_twisted.async_yield_fixture(fixture))


# -- small things


def closed_port(host: str = LOOPBACK) -> int:
    """A port nothing listens on (bound then released): connections to it are refused."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
    return port


free_port = closed_port
"""A port free to listen on (the same trick: bound then released)."""


def chat_body(model: str, text: str = "alpha beta gamma delta", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": text}], **extra}


def completion_body(
    model: str, prompt: str = "alpha beta gamma delta", **extra: Any
) -> dict[str, Any]:
    return {"model": model, "prompt": prompt, **extra}


def median_gap(arrivals: list[float]) -> float:
    return statistics.median(b - a for a, b in itertools.pairwise(arrivals))


def assert_error_object(body: object, status: int, code: str) -> dict[str, Any]:
    """The router's OpenAI error object: C{{"error": {"message", "type", "code"}}}."""
    assert isinstance(body, dict), body
    assert set(body) == {"error"}, body
    error = body["error"]
    assert isinstance(error, dict), body
    assert set(error) == {"message", "type", "code"}, body
    assert isinstance(error["message"], str)
    assert error["message"]
    assert isinstance(error["type"], str)
    assert error["type"]
    assert error["code"] == code, (status, body)
    return error


# -- in-process: the client side


@dataclass
class Reply:
    status: int
    headers: Headers
    body: bytes

    def header(self, name: str) -> str | None:
        values = self.headers.getRawHeaders(name)
        return values[-1] if values else None

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class StreamReply:
    """A streamed response as the client saw it: each SSE event's data, when it came."""

    status: int
    headers: Headers
    events: list[bytes] = field(default_factory=list)
    arrivals: list[float] = field(default_factory=list)
    reason: Failure | None = None

    def header(self, name: str) -> str | None:
        values = self.headers.getRawHeaders(name)
        return values[-1] if values else None

    @property
    def chunks(self) -> list[dict[str, Any]]:
        """The JSON events, [DONE] left out."""
        return [json.loads(e) for e in self.events if e != b"[DONE]"]

    @property
    def done(self) -> bool:
        return bool(self.events) and self.events[-1] == b"[DONE]"

    def token_times(self) -> list[float]:
        """Arrival time of every event carrying generated text."""
        return [t for e, t in zip(self.events, self.arrivals, strict=True) if _text_of(e)]

    @property
    def text(self) -> str:
        return "".join(_text_of(e) for e in self.events)


def _text_of(event: bytes) -> str:
    if event == b"[DONE]":
        return ""
    chunk = json.loads(event)
    pieces = []
    for choice in chunk.get("choices") or []:
        delta = choice.get("delta")
        pieces.append((delta or {}).get("content") or choice.get("text") or "")
    return "".join(pieces)


class _EventCollector(Protocol):
    """Splits a body into SSE events as bytes arrive; may hang up after some tokens."""

    def __init__(self, reply: StreamReply, hang_up_after: int | None) -> None:
        self.reply = reply
        self.hang_up_after = hang_up_after
        self.finished: Deferred[None] = Deferred()
        self._buffer = b""
        self._tokens = 0

    def dataReceived(self, data: bytes) -> None:
        now = time.monotonic()
        self._buffer += data
        while b"\n\n" in self._buffer:
            event, self._buffer = self._buffer.split(b"\n\n", 1)
            payload = b"\n".join(
                line[5:].lstrip(b" ") for line in event.splitlines() if line.startswith(b"data:")
            )
            self.reply.events.append(payload)
            self.reply.arrivals.append(now)
            if _text_of(payload):
                self._tokens += 1
                if self.hang_up_after is not None and self._tokens == self.hang_up_after:
                    assert self.transport is not None
                    self.transport.stopProducing()  # type: ignore[attr-defined]

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:  # noqa: B008
        self.reply.reason = reason
        self.finished.callback(None)


class _BodyCollector(Protocol):
    """A whole response body (C{readBody} without its warning about our transports)."""

    def __init__(self) -> None:
        self.finished: Deferred[bytes] = Deferred()
        self._data: list[bytes] = []

    def dataReceived(self, data: bytes) -> None:
        self._data.append(data)

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:  # noqa: B008
        if reason.check(ResponseDone, PotentialDataLoss):
            self.finished.callback(b"".join(self._data))
        else:
            self.finished.errback(reason)


@implementer(IBodyProducer)
class ChunkedBody(BytesBody):
    """A body of unknown length: sent with chunked transfer coding."""

    def __init__(self, body: bytes) -> None:
        super().__init__(body)
        self.length = UNKNOWN_LENGTH  # type: ignore[assignment]  # IBodyProducer allows it

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        for i in range(0, len(self.body), 4096):
            consumer.write(self.body[i : i + 4096])
        return succeed(None)


def _encode(body: object) -> bytes | None:
    if body is None:
        return None
    if isinstance(body, bytes):
        return body
    return json.dumps(body).encode()


# -- in-process: routers and pods in the test's reactor


class Cluster:
    """Routers, simulated pods and an HTTP client, all on one reactor; L{close} stops them."""

    def __init__(self, reactor: IServerReactor) -> None:
        self.reactor = reactor
        self.sims: list[SimService] = []
        self.routers: list[RouterService] = []
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.pool.maxPersistentPerHost = 64
        self.agent = Agent(reactor, pool=self.pool)

    # pods

    def sim(
        self,
        model: str,
        *,
        engine: str = "vllm",
        itl: float = 0.001,
        output_tokens: int = 4,
        prefill_per_token: float = 0.0,
        loras: Iterable[str] = (),
        gpus: int = 0,
    ) -> SimService:
        """A started simulator on 127.0.0.1, on a port of its own (C{tcp:0})."""
        config = SimConfig(
            engine=engine,
            model=model,
            listen=LISTEN,
            engine_config=EngineConfig(itl=itl, prefill_per_token=prefill_per_token),
            output_tokens=output_tokens,
            loras={name: f"/adapters/{name}" for name in loras},
            gpus=gpus,
            seed=0,
        )
        service = SimService(config, self.reactor)
        service.startService()
        self.sims.append(service)
        return service

    @staticmethod
    def pod(name: str, sim: SimService | int, labels: Mapping[str, str], **kw: Any) -> Doc:
        """A Running, Ready pod document for C{sim} (or a bare port) on 127.0.0.1."""
        port = sim if isinstance(sim, int) else sim.listener.bound_port
        return pod(name, LOOPBACK, dict(labels), port=port, **kw)

    # routers

    def router(
        self,
        resources: list[Doc],
        registry: CollectorRegistry | None = None,
        **settings: Any,
    ) -> RouterService:
        """A started router (config built with C{parse_config}) on 127.0.0.1:<any>."""
        raw = {
            "listen": LISTEN,
            "adminListen": ADMIN_LISTEN,
            "drainTimeout": "3s",
            **settings,
            "resources": resources,
        }
        config = parse_config(raw, "<test config>", Path.cwd(), [])
        service = makeRouterService(
            config, self.reactor, registry or CollectorRegistry(), config_path=None
        )
        service.startService()
        self.routers.append(service)
        return service

    @staticmethod
    def hook(router: RouterService) -> list[RequestRecord]:
        """Every request's record, as the router ends it."""
        records: list[RequestRecord] = []
        router.plane.observers.add(Ended(records.append))
        return records

    async def close(self) -> None:
        await self.pool.closeCachedConnections()
        for router in reversed(self.routers):
            await router.stopService()
        for sim in reversed(self.sims):
            await sim.stopService()

    # the client

    @staticmethod
    def url(target: RouterService | SimService, path: str) -> bytes:
        listener = target.proxy if isinstance(target, RouterService) else target.listener
        return f"http://{LOOPBACK}:{listener.bound_port}{path}".encode()

    def _send(
        self,
        target: RouterService | SimService,
        method: str,
        path: str,
        body: object,
        headers: Mapping[str, str] | None,
        chunked: bool,
    ) -> Deferred[IResponse]:
        raw = _encode(body)
        h = Headers({"content-type": ["application/json"]} if raw is not None else {})
        for name, value in (headers or {}).items():
            h.setRawHeaders(name, [value])
        producer: IBodyProducer | None = None
        if raw is not None:
            producer = ChunkedBody(raw) if chunked else BytesBody(raw)
        d: Deferred[IResponse] = self.agent.request(
            method.encode(), self.url(target, path), h, producer
        )
        d.addTimeout(20, self.reactor)
        return d

    async def request(
        self,
        target: RouterService | SimService,
        method: str,
        path: str,
        body: object = None,
        headers: Mapping[str, str] | None = None,
        *,
        chunked: bool = False,
    ) -> Reply:
        response = await self._send(target, method, path, body, headers, chunked)
        collector = _BodyCollector()
        response.deliverBody(collector)
        data = await collector.finished
        return Reply(response.code, response.headers, data)

    async def post(
        self,
        target: RouterService | SimService,
        path: str,
        body: object,
        headers: Mapping[str, str] | None = None,
    ) -> Reply:
        return await self.request(target, "POST", path, body, headers)

    async def stream(
        self,
        target: RouterService | SimService,
        path: str,
        body: object,
        headers: Mapping[str, str] | None = None,
        *,
        hang_up_after: int | None = None,
    ) -> StreamReply:
        """POST and collect the SSE events; hang up after C{hang_up_after} text tokens."""
        response = await self._send(target, "POST", path, body, headers, False)
        reply = StreamReply(response.code, response.headers)
        collector = _EventCollector(reply, hang_up_after)
        response.deliverBody(collector)
        finished = collector.finished
        finished.addTimeout(30, self.reactor)
        await finished
        return reply

    async def many(
        self, count: int, concurrency: int, send: Callable[[int], Awaitable[Reply]]
    ) -> list[Reply]:
        """C{send(i)} for i in range(count), at most C{concurrency} at once."""
        semaphore = DeferredSemaphore(concurrency)

        async def one(i: int) -> Reply:
            await semaphore.acquire()
            try:
                return await send(i)
            finally:
                semaphore.release()

        replies: list[Reply] = await gatherResults(
            [Deferred.fromCoroutine(one(i)) for i in range(count)], consumeErrors=True
        )
        return replies

    async def wait_for(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        """Poll C{predicate} on the reactor; fail the test after C{timeout} seconds."""
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                pytest.fail(f"timed out after {timeout} s waiting for {what}")
            await deferLater(self.reactor, 0.01, lambda: None)

    async def sleep(self, seconds: float) -> None:
        await deferLater(self.reactor, seconds, lambda: None)


def sim_sample(sim: SimService, name: str) -> float:
    """A simulator's metric (e.g. C{vllm:request_success_total}), summed over label sets."""
    return sample_sum(sim.api.registry, name)


def served(sim: SimService) -> int:
    """Requests the simulator generated a complete answer for (SGLang has no success
    count: its end-to-end latency histogram counts them)."""
    if sim.config.engine == "vllm":
        return int(sim_sample(sim, "vllm:request_success_total"))
    return int(sim_sample(sim, "sglang:e2e_request_latency_seconds_count"))


# -- out of process: twistd kthena-router

START_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0
_LISTENING = re.compile(
    r"listening on (?P<description>\S+) \(IPv4Address\(type='TCP', "
    r"host='(?P<host>[^']+)', port=(?P<port>\d+)\)\)"
)


@dataclass
class HttpResult:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def http_request(
    host: str,
    port: int,
    method: str,
    path: str,
    body: object = None,
    headers: Mapping[str, str] | None = None,
    timeout: float = 10.0,
) -> HttpResult:
    """One blocking HTTP/1.1 request on a connection of its own."""
    connection = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        raw = _encode(body)
        h = {"content-type": "application/json"} if raw is not None else {}
        h.update(headers or {})
        connection.request(method, path, body=raw, headers=h)
        response = connection.getresponse()
        data = response.read()
        return HttpResult(response.status, {k.lower(): v for k, v in response.getheaders()}, data)
    finally:
        connection.close()


@dataclass
class RouterProcess:
    """One running C{twistd -n kthena-router}."""

    process: subprocess.Popen[bytes]
    log_path: Path
    config_path: Path | None
    host: str = LOOPBACK
    port: int = 0

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def client(self, timeout: float = 15.0) -> OpenAI:
        """The official client, without retries so that every failure shows."""
        return OpenAI(base_url=self.base_url, api_key="router", max_retries=0, timeout=timeout)

    def request(
        self,
        method: str,
        path: str,
        body: object = None,
        headers: Mapping[str, str] | None = None,
    ) -> HttpResult:
        return http_request(self.host, self.port, method, path, body, headers)

    def signal(self, signum: int) -> None:
        assert self.process.poll() is None, self.log()
        self.process.send_signal(signum)

    def stop(self) -> None:
        stop_process(self.process, STOP_TIMEOUT)


def write_config(path: Path, config: Mapping[str, Any]) -> None:
    """Write atomically, so a polling router never reads half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(dict(config), sort_keys=False))
    os.replace(tmp, path)


def spawn_router(workdir: Path, *args: str) -> RouterProcess:
    """Start C{twistd -n --pidfile= kthena-router ARGS}; its output goes to a log file."""
    process, log_path = spawn_twistd(workdir, "kthena-router", *args)
    config = Path(args[args.index("--config") + 1]) if "--config" in args else None
    return RouterProcess(process, log_path, config)


def bound_port(router: RouterProcess, description: str) -> int:
    """The port a running router's listener C{description} bound (from its log)."""
    for match in _LISTENING.finditer(router.log()):
        if match["description"] == description:
            return int(match["port"])
    pytest.fail(f"no listener {description} in the log:\n{router.log()}")


def wait_listening(router: RouterProcess, description: str, host: str = LOOPBACK) -> None:
    """Wait for the router's proxy listener line and a C{/healthz} answer (or fail)."""
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        for match in _LISTENING.finditer(router.log()):
            if match["description"] == description:
                router.port = int(match["port"])
        if router.port:
            break
        if router.process.poll() is not None:
            pytest.fail(f"kthena-router exited with {router.process.returncode}:\n{router.log()}")
        if time.monotonic() > deadline:
            pytest.fail(f"kthena-router did not listen in {START_TIMEOUT} s:\n{router.log()}")
        time.sleep(0.02)
    router.host = host
    while True:
        try:
            if router.request("GET", "/healthz").status == 200:
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"kthena-router /healthz did not answer:\n{router.log()}")
        time.sleep(0.02)


def start_router(workdir: Path, config: Mapping[str, Any]) -> RouterProcess:
    """Write C{config} to C{workdir/router.yaml} and run a router on it; the caller stops it."""
    path = workdir / "router.yaml"
    config = {"adminListen": ADMIN_LISTEN, **config}
    write_config(path, config)
    router = spawn_router(workdir, "--config", str(path))
    try:
        wait_listening(router, str(config["listen"]))
    except BaseException:
        router.stop()
        raise
    return router


def wait_for_log(router: RouterProcess, text: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while True:
        log = router.log()
        if text in log:
            return log
        if time.monotonic() > deadline:
            pytest.fail(f"{text!r} not logged within {timeout} s:\n{log}")
        time.sleep(0.02)


@dataclass
class Message:
    fields: dict[str, str]
    at: float

    @property
    def kind(self) -> str:
        return next(iter(self.fields))


class NotifySocket:
    """What systemd listens on (a datagram socket the test reads): every datagram the
    router sends, as a L{Message}."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.socket.bind(str(path))

    def next(self, timeout: float, router: RouterProcess) -> Message:
        self.socket.settimeout(timeout)
        try:
            data = self.socket.recv(4096)
        except TimeoutError:
            pytest.fail(f"nothing from the router in {timeout} s:\n{router.log()}")
        lines = data.decode().splitlines()
        return Message(dict(line.split("=", 1) for line in lines), time.monotonic())

    def until(self, kind: str, router: RouterProcess) -> tuple[Message, list[Message]]:
        """The next C{kind} message, and the ones before it."""
        before: list[Message] = []
        deadline = time.monotonic() + START_TIMEOUT
        while (message := self.next(max(0.01, deadline - time.monotonic()), router)).kind != kind:
            before.append(message)
        return message, before

    def close(self) -> None:
        self.socket.close()
