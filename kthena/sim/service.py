"""
Builds a simulated model server: the engine, its metrics, its HTTP API and its listener,
as one service that twistd (C{kthena-sim}) or the router's demo mode can run.
"""

from __future__ import annotations

import re
import time
import uuid
from dataclasses import dataclass, field

import treq
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred

from kthena.interfaces import IServerReactor
from kthena.listening import ListeningService
from kthena.sim import metrics
from kthena.sim.api import SimAPI
from kthena.sim.engine import EngineConfig, SimEngine
from kthena.sim.faults import FaultDice, Faults
from kthena.sim.identity import ApiError, SimIdentity
from kthena.sim.pd import BootstrapRooms, Role, RoomFetcher
from kthena.webutil import QuietSite

DEFAULT_PORTS = {"vllm": 8000, "sglang": 30000}


@dataclass(slots=True)
class SimConfig:
    """Everything that makes one simulated model server."""

    engine: str = "vllm"
    model: str = "sim-model"
    listen: str | None = None
    engine_config: EngineConfig = field(default_factory=EngineConfig)
    role: Role = Role.BOTH
    engine_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    advertise_host: str | None = None
    advertise_port: int | None = None
    output_tokens: int = 16
    loras: dict[str, str] = field(default_factory=dict)
    gpus: int = 0
    gpu_memory_mib: int = 81_920
    bootstrap_timeout: float = 30.0
    bootstrap_listen: str | None = None
    seed: int | None = None
    faults: Faults = field(default_factory=Faults)

    @property
    def listen_endpoint(self) -> str:
        return self.listen or f"tcp:{DEFAULT_PORTS[self.engine]}"

    def advertised(self) -> tuple[str, int]:
        """Host and port the server gives out (NIXL C{remote_host}/C{remote_port})."""
        description = self.listen_endpoint
        interface = re.search(r"interface=([^:]+)", description)
        port = re.search(r"^tcp6?:(?:port=)?(\d+)", description) or re.search(
            r"port=(\d+)", description
        )
        host = self.advertise_host or (interface.group(1) if interface else "127.0.0.1")
        if host in ("0.0.0.0", "::"):
            host = "127.0.0.1"
        return host, self.advertise_port or (int(port.group(1)) if port else 0)


def make_room_fetcher(reactor: IServerReactor) -> RoomFetcher:
    """
    Fetch SGLang bootstrap rooms from prefill simulators with treq (control plane:
    one long poll per decode leg, not on the token path).
    """

    async def fetch(host: str, port: int, room: int, timeout: float) -> int:
        authority = f"[{host}]" if ":" in host else host
        url = f"http://{authority}:{port}/sim/bootstrap/{room}?timeout={timeout}"
        # treq names its own reactor interface; any real reactor provides it.
        wait = timeout + 5
        response = await treq.get(url, reactor=reactor, timeout=wait)  # type: ignore[arg-type]
        body = await response.json()
        if response.code != 200:
            raise ApiError(500, f"bootstrap server answered {response.code}: {body}")
        return int(body["prompt_tokens"])

    def fetcher(host: str, port: int, room: int, timeout: float) -> Deferred[int]:
        return Deferred.fromCoroutine(fetch(host, port, room, timeout))

    return fetcher


class SimService(MultiService):
    """One simulated model server; C{api} and C{engine} are there for tests and the demo."""

    def __init__(self, config: SimConfig, reactor: IServerReactor) -> None:
        super().__init__()
        self.config = config
        dialect = metrics.DIALECTS[config.engine]
        config.engine_config.slowdown = config.faults.slowdown
        self.engine = SimEngine(reactor, config.engine_config)
        for name, path in config.loras.items():
            self.engine.load_lora(name, path)
        registry = metrics.build_registry(
            self.engine, dialect, config.model, config.gpus, config.gpu_memory_mib
        )
        host, port = config.advertised()
        identity = SimIdentity(
            model=config.model,
            dialect=dialect,
            role=config.role,
            engine_id=config.engine_id,
            host=host,
            port=port,
            output_tokens=config.output_tokens,
            bootstrap_timeout=config.bootstrap_timeout,
            created=int(time.time()),
        )
        self.api = SimAPI(
            self.engine,
            identity,
            registry,
            config.faults,
            FaultDice(config.faults, config.seed),
            BootstrapRooms(reactor),
            make_room_fetcher(reactor),
        )
        site = QuietSite(self.api, reactor)
        self.listener = ListeningService(reactor, config.listen_endpoint, site)
        self.listener.setServiceParent(self)
        if config.bootstrap_listen:
            ListeningService(reactor, config.bootstrap_listen, site).setServiceParent(self)
