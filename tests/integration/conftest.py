"""
Fixtures that run C{kthena-sim} as real C{twistd} processes on loopback.

Every simulator listens on C{tcp:0} on a loopback address, so tests never fight over
ports; the bound port is read from the process's own log line, then C{GET /health} is
polled until it answers.  Every process started through L{sim_factory} is terminated in
the fixture's teardown, whatever the test did.

The tests talk to the simulators with blocking clients (the official C{openai} client,
C{urllib}): the server is another process, so no reactor is needed here.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted  # type: ignore[import-untyped]
from openai import OpenAI
from prometheus_client.parser import text_string_to_metric_families

REPO_ROOT = Path(__file__).resolve().parents[2]
TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")
START_TIMEOUT = 20.0
STOP_TIMEOUT = 5.0
HTTP_TIMEOUT = 10.0

_LISTENING = re.compile(
    r"listening on (?P<description>\S+) \(IPv4Address\(type='TCP', "
    r"host='(?P<host>[^']+)', port=(?P<port>\d+)\)\)"
)


def stop_process(process: subprocess.Popen[bytes], timeout: float = STOP_TIMEOUT) -> None:
    """SIGTERM, then SIGKILL after C{timeout}; always reaped."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout)


def twistd_env() -> dict[str, str]:
    """The environment for a child C{twistd}: the checkout's code comes first."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    )
    env["PYTHONUNBUFFERED"] = "1"
    return env


def twistd_command(*args: str) -> list[str]:
    return [TWISTD, "-n", "--pidfile=", *args]


@dataclass
class HttpReply:
    status: int
    body: bytes

    def json(self) -> object:
        return json.loads(self.body)


@dataclass
class SimProcess:
    """One running C{twistd kthena-sim} and the ways to reach it."""

    process: subprocess.Popen[bytes]
    log_path: Path
    host: str
    port: int
    engine: str = "vllm"
    ports: dict[str, int] = field(default_factory=dict)
    """Bound port of every listening endpoint, by its description."""

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def client(self, timeout: float = HTTP_TIMEOUT) -> OpenAI:
        """The official client, without retries so that every failure shows."""
        return OpenAI(base_url=self.base_url + "/v1", api_key="sim", max_retries=0, timeout=timeout)

    def request(
        self, method: str, path: str, body: object = None, timeout: float = HTTP_TIMEOUT
    ) -> HttpReply:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base_url + path, data=data, method=method)
        if data is not None:
            req.add_header("content-type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as response:
                return HttpReply(response.status, response.read())
        except urllib.error.HTTPError as e:
            with e:
                return HttpReply(e.code, e.read())

    def json(self, method: str, path: str, body: object = None) -> dict[str, object]:
        reply = self.request(method, path, body)
        assert reply.status == 200, (method, path, reply)
        value = reply.json()
        assert isinstance(value, dict)
        return value

    def tokenize(self, body: dict[str, object]) -> int:
        count = self.json("POST", "/tokenize", body)["count"]
        assert isinstance(count, int)
        return count

    def metrics(self) -> dict[str, float]:
        """Every sample of C{/metrics} by name, summed over label sets."""
        reply = self.request("GET", "/metrics")
        assert reply.status == 200
        values: dict[str, float] = {}
        for family in text_string_to_metric_families(reply.body.decode()):
            for sample in family.samples:
                values[sample.name] = values.get(sample.name, 0.0) + sample.value
        return values

    def terminate(self) -> None:
        stop_process(self.process)


def wait_until(
    predicate: Callable[[], bool], timeout: float, interval: float = 0.02, what: str = ""
) -> None:
    """Poll C{predicate} until it holds; fail the test after C{timeout} seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what or predicate}")
        time.sleep(interval)


def _healthy(sim: SimProcess) -> bool:
    try:
        return sim.request("GET", "/health", timeout=1.0).status == 200
    except OSError:
        return False


def spawn_twistd(workdir: Path, plugin: str, *args: str) -> tuple[subprocess.Popen[bytes], Path]:
    """Start C{twistd -n --pidfile= PLUGIN ARGS} in C{workdir}, its output in a log file."""
    log_path = workdir / f"{plugin}-{time.monotonic_ns()}.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            twistd_command(plugin, *args),
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=workdir,
            env=twistd_env(),
        )
    return process, log_path


def start_sim(log_dir: Path, *args: str, host: str = "127.0.0.1") -> SimProcess:
    """
    Start C{twistd kthena-sim} listening on C{tcp:0} on C{host} (unless C{args} has a
    C{--listen}), wait for its port and its C{/health}, and return it.  The caller stops it.
    """
    if "--listen" not in args:
        args = (*args, "--listen", f"tcp:0:interface={host}")
    process, log_path = spawn_twistd(log_dir, "kthena-sim", *args)
    engine = args[args.index("--engine") + 1] if "--engine" in args else "vllm"
    sim = SimProcess(process, log_path, host, 0, engine)
    try:
        listen = args[args.index("--listen") + 1]
        expected = {listen}
        if "--bootstrap-listen" in args:
            expected.add(args[args.index("--bootstrap-listen") + 1])
            assert len(expected) == 2, "give --listen and --bootstrap-listen different endpoints"
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            for match in _LISTENING.finditer(sim.log()):
                sim.ports[match["description"]] = int(match["port"])
            if expected <= sim.ports.keys():
                break
            if process.poll() is not None:
                pytest.fail(f"kthena-sim exited with {process.returncode}:\n{sim.log()}")
            if time.monotonic() > deadline:
                pytest.fail(f"kthena-sim did not listen in {START_TIMEOUT} s:\n{sim.log()}")
            time.sleep(0.02)
        sim.port = sim.ports[listen]
        wait_until(lambda: _healthy(sim), START_TIMEOUT, what="GET /health")
    except BaseException:
        sim.terminate()
        raise
    return sim


SimFactory = Callable[..., SimProcess]


@pytest.fixture
def sim_factory(tmp_path: Path) -> Iterator[SimFactory]:
    """C{sim_factory(*twistd_args, host=...)} starts a simulator stopped at teardown."""
    started: list[SimProcess] = []

    def factory(*args: str, host: str = "127.0.0.1") -> SimProcess:
        sim = start_sim(tmp_path, *args, host=host)
        started.append(sim)
        return sim

    yield factory
    for sim in started:
        sim.terminate()


ENGINE_HOSTS = {"vllm": "127.0.0.2", "sglang": "127.0.0.3"}
SHARED_ITL = 0.02
SHARED_OUTPUT_TOKENS = 12


@pytest.fixture(scope="module", params=sorted(ENGINE_HOSTS))
def engine_sim(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SimProcess]:
    """
    One well-behaved simulator per engine (vLLM, SGLang), shared by the tests of a module
    that do not change it: a test taking this fixture runs once for each engine.
    """
    engine: str = request.param
    sim = start_sim(
        tmp_path_factory.mktemp(f"{engine}-sim"),
        "--engine",
        engine,
        "--model",
        "sim-model",
        "--itl",
        str(SHARED_ITL),
        "--output-tokens",
        str(SHARED_OUTPUT_TOKENS),
        host=ENGINE_HOSTS[engine],
    )
    yield sim
    sim.terminate()


@pytest_twisted.async_yield_fixture  # type: ignore[untyped-decorator]
async def cluster() -> AsyncIterator[Any]:
    """
    Routers and simulated pods in this reactor (L{router_helpers.Cluster}), all stopped
    after the test.
    """
    from twisted.internet import reactor

    from tests.integration.router_helpers import Cluster

    running = Cluster(reactor)  # type: ignore[arg-type]
    try:
        yield running
    finally:
        await running.close()


@pytest_twisted.async_yield_fixture  # type: ignore[untyped-decorator]
async def kube() -> AsyncIterator[tuple[Any, int]]:
    """A fake Kubernetes API server (L{fake_kube.FakeKube}) and its port, for the test."""
    from twisted.internet import reactor

    from tests.integration.fake_kube import serve

    fake, port = serve(reactor)
    try:
        yield fake, port.getHost().port
    finally:
        fake.drop()
        await port.stopListening()
