"""
In-memory harness for the simulator's unit tests: a L{SimAPI} built the way
L{kthena.sim.service.SimService} builds it, but on a L{Clock}, with a fake SGLang room
fetcher, and an in-memory HTTP client (L{RequestTraversalAgent}: no sockets).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from treq.testing import RequestTraversalAgent
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse

from kthena.podclient import BytesBody
from kthena.sim import metrics
from kthena.sim.api import SimAPI
from kthena.sim.engine import EngineConfig, SimEngine, SimSequence
from kthena.sim.faults import FaultDice, Faults
from kthena.sim.identity import SimIdentity
from kthena.sim.pd import BootstrapRooms, Role

MODEL = "sim-model"
ENGINE_ID = "engine-under-test"
HOST = "10.1.2.3"
PORT = 8123


@dataclass(slots=True)
class RoomCall:
    """One call of the fake room fetcher, with the Deferred the test fires."""

    host: str
    port: int
    room: int
    timeout: float
    result: Deferred[int] = field(default_factory=Deferred)
    cancelled: bool = False


class FakeRoomFetcher:
    """A L{kthena.sim.pd.RoomFetcher} whose answers the test gives by hand."""

    def __init__(self) -> None:
        self.calls: list[RoomCall] = []

    def __call__(self, host: str, port: int, room: int, timeout: float) -> Deferred[int]:
        call = RoomCall(host, port, room, timeout)

        def cancel(d: Deferred[int]) -> None:
            call.cancelled = True

        call.result = Deferred(cancel)
        self.calls.append(call)
        return call.result


@dataclass(eq=False)
class Reply:
    """A response as it arrives: status and headers, body chunks, then the end."""

    response: Deferred[IResponse]
    code: int | None = None
    headers: Headers | None = None
    chunks: list[bytes] = field(default_factory=list)
    done: bool = False
    reason: Failure | None = None
    failure: Failure | None = None
    transport: IPushProducer | None = None

    @property
    def body(self) -> bytes:
        return b"".join(self.chunks)

    @property
    def complete(self) -> bool:
        """The whole body arrived and the response ended normally."""
        return self.done and self.reason is not None and self.reason.check(ResponseDone) is not None

    def json(self) -> Any:
        assert self.complete, (self.code, self.body, self.reason, self.failure)
        return json.loads(self.body)

    def text(self) -> str:
        return self.body.decode()

    def header(self, name: str) -> str | None:
        assert self.headers is not None, self.failure
        values = self.headers.getRawHeaders(name)
        return values[0] if values else None

    def events(self) -> list[str]:
        """The C{data:} payloads of the SSE events received so far, in order."""
        text = self.body.decode()
        assert text.endswith("\n\n") or not text, text
        payloads = []
        for event in text.split("\n\n"):
            if not event:
                continue
            assert event.startswith("data: "), event
            payloads.append(event[len("data: ") :])
        return payloads

    def abort(self) -> None:
        """The client goes away in the middle of the body."""
        assert self.transport is not None
        self.transport.stopProducing()


class _Collector(Protocol):
    def __init__(self, reply: Reply) -> None:
        self.reply = reply

    def connectionMade(self) -> None:
        self.reply.transport = IPushProducer(self.transport)

    def dataReceived(self, data: bytes) -> None:
        self.reply.chunks.append(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.reply.done = True
        self.reply.reason = reason


class SimHarness:
    """
    One simulated model server in memory: C{clock} drives the engine and the bootstrap
    rooms; L{request} talks HTTP to the L{SimAPI} through an in-memory connection.
    """

    def __init__(
        self,
        *,
        engine: str = "vllm",
        model: str = MODEL,
        role: Role = Role.BOTH,
        engine_config: EngineConfig | None = None,
        loras: dict[str, str] | None = None,
        output_tokens: int = 16,
        gpus: int = 0,
        gpu_memory_mib: int = 81_920,
        faults: Faults | None = None,
        bootstrap_timeout: float = 30.0,
        seed: int = 1,
    ) -> None:
        self.clock = Clock()
        self.dialect = metrics.DIALECTS[engine]
        self.faults = faults or Faults()
        config = engine_config or EngineConfig()
        config.slowdown = self.faults.slowdown
        self.engine = SimEngine(self.clock, config)
        for name, path in (loras or {}).items():
            self.engine.load_lora(name, path)
        self.registry = metrics.build_registry(
            self.engine, self.dialect, model, gpus, gpu_memory_mib
        )
        self.identity = SimIdentity(
            model=model,
            dialect=self.dialect,
            role=role,
            engine_id=ENGINE_ID,
            host=HOST,
            port=PORT,
            output_tokens=output_tokens,
            bootstrap_timeout=bootstrap_timeout,
            created=1_700_000_000,
        )
        self.rooms = BootstrapRooms(self.clock)
        self.fetcher = FakeRoomFetcher()
        self.api = SimAPI(
            self.engine,
            self.identity,
            self.registry,
            self.faults,
            FaultDice(self.faults, seed),
            self.rooms,
            self.fetcher,
        )
        self.agent = RequestTraversalAgent(self.api)

    # -- HTTP

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> Reply:
        raw = Headers({k: [v] for k, v in (headers or {}).items()})
        producer = BytesBody(body) if body is not None else None
        d = self.agent.request(method.encode(), f"http://sim{path}".encode(), raw, producer)
        reply = Reply(d)

        def arrived(response: IResponse) -> None:
            reply.code = response.code
            reply.headers = response.headers
            response.deliverBody(_Collector(reply))

        def failed(failure: Failure) -> None:
            reply.failure = failure

        d.addCallbacks(arrived, failed)
        self.flush()
        return reply

    def post(self, path: str, value: object, headers: dict[str, str] | None = None) -> Reply:
        return self.request("POST", path, json.dumps(value).encode(), headers)

    def get(self, path: str) -> Reply:
        return self.request("GET", path)

    def flush(self) -> None:
        self.agent.flush()

    # -- time

    def step_to(self, when: float) -> None:
        """Run the clock to exactly C{when} (no float drift) and pump the connections."""
        self.clock.rightNow = max(self.clock.rightNow, when)
        self.clock.advance(0)
        self.flush()

    def advance(self, seconds: float) -> None:
        """Let C{seconds} pass, running every timer due on the way at its own time."""
        target = self.clock.seconds() + seconds
        self.flush()
        while True:
            due = [c.getTime() for c in self.clock.getDelayedCalls() if c.getTime() <= target]
            if not due:
                break
            self.step_to(min(due))
        self.step_to(target)

    def run(self, limit: float = 30.0) -> None:
        """Run until the engine has nothing running or waiting (at most C{limit} s)."""
        deadline = self.clock.seconds() + limit
        self.flush()
        while self.engine.num_running or self.engine.num_waiting:
            pending = [c.getTime() for c in self.clock.getDelayedCalls()]
            assert pending, "the engine is busy but nothing is scheduled"
            when = min(pending)
            assert when <= deadline, "the engine did not finish in time"
            self.step_to(when)

    # -- tokens

    def prompt_count(self, prompt: str) -> int:
        reply = self.post("/tokenize", {"model": MODEL, "prompt": prompt})
        assert reply.code == 200, reply.body
        count = reply.json()["count"]
        assert isinstance(count, int)
        return count

    def chat_count(self, messages: list[dict[str, str]]) -> int:
        reply = self.post("/tokenize", {"model": MODEL, "messages": messages})
        assert reply.code == 200, reply.body
        count = reply.json()["count"]
        assert isinstance(count, int)
        return count


class RecordingListener:
    """A L{kthena.sim.engine.SequenceListener} that keeps what the engine tells it."""

    def __init__(self) -> None:
        self.tokens: list[tuple[SimSequence, int]] = []
        self.done: list[SimSequence] = []

    def token(self, seq: SimSequence, index: int) -> None:
        self.tokens.append((seq, index))

    def finished(self, seq: SimSequence) -> None:
        self.done.append(seq)


def parse_metrics(text: bytes) -> dict[str, Metric]:
    """The metric families of a text exposition, by family name (counters lose _total)."""
    families: dict[str, Metric] = {}
    for family in text_string_to_metric_families(text.decode()):
        assert family.name not in families, f"{family.name} exposed twice"
        families[family.name] = family
    return families
