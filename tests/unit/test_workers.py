"""
C{--workers N} without processes or sockets: the merge of the workers' expositions, the
supervisor's restarts, signals and drain on a fake process reactor, the worker's config,
readiness from the notify socket, and the parent's admin resources over a fake asker.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
import signal
import socket
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.web.server import NOT_DONE_YET
from twisted.web.test.requesthelper import DummyRequest

from kthena.config.observability import LOOPBACK_NETWORKS
from kthena.config.router import RouterConfig, SimulatorSpec, parse_config
from kthena.tap import Options
from kthena.workers.admin import MergedMetrics, WorkersDebug
from kthena.workers.merge import Merger, merge, parse, render
from kthena.workers.notify import NotifyProtocol
from kthena.workers.sockets import NotShareableError, SharedPort, shareable
from kthena.workers.spec import ENVIRONMENT, WorkerSpec, worker_config
from kthena.workers.supervisor import (
    KILL_GRACE,
    RESTART_DELAY,
    STABLE_AFTER,
    WORKER_WATCHDOG,
    Supervisor,
    Worker,
    WorkerMetrics,
)


def _exposition(requests: float, active: float, health: float, latencies: list[float]) -> str:
    registry = CollectorRegistry()
    counter = Counter("kthena_router_requests", "r", ["model", "path"], registry=registry)
    counter.labels("m", '/v1/a "quoted" \\ path').inc(requests)
    Gauge("kthena_router_active_requests", "a", registry=registry).set(active)
    Gauge("kthena_lb_target_health", "h", ["target"], registry=registry).labels("p0").set(health)
    histogram = Histogram("kthena_router_x_seconds", "x", registry=registry, buckets=(0.1, 1.0))
    for value in latencies:
        histogram.observe(value)
    return generate_latest(registry).decode()


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


REQ = ("kthena_router_requests_total", (("model", "m"), ("path", '/v1/a "quoted" \\ path')))


def test_counters_histograms_and_counting_gauges_are_summed_mirrors_taken_once() -> None:
    one = _exposition(3, 2, 1, [0.05, 0.5])
    two = _exposition(4, 5, 0, [2.0])
    merged = _samples(render(merge([parse(one), parse(two)])))
    assert merged[REQ] == 7
    assert merged[("kthena_router_active_requests", ())] == 7
    assert merged[("kthena_lb_target_health", (("target", "p0"),))] == 1  # the first worker's
    assert merged[("kthena_router_x_seconds_count", ())] == 3
    assert merged[("kthena_router_x_seconds_bucket", (("le", "0.1"),))] == 1
    assert merged[("kthena_router_x_seconds_bucket", (("le", "1.0"),))] == 2
    assert merged[("kthena_router_x_seconds_bucket", (("le", "+Inf"),))] == 3
    assert merged[("kthena_router_x_seconds_sum", ())] == pytest.approx(2.55)
    created = ("kthena_router_requests_created", REQ[1])
    assert merged[created] == min(_samples(one)[created], _samples(two)[created])


def test_a_merge_of_one_exposition_is_that_exposition() -> None:
    one = _exposition(3, 2, 1, [0.05])
    assert render(merge([parse(one)])) == one


def test_series_only_some_workers_have_are_kept_in_their_family() -> None:
    first = 'label="a"'
    one = f"# HELP c_total c\n# TYPE c_total counter\nc_total{{{first}}} 1.0\n"
    two = '# HELP c_total c\n# TYPE c_total counter\nc_total{label="b"} 2.0\n'
    two += "# HELP g g\n# TYPE g gauge\ng 4.0\n"
    text = render(merge([parse(one), parse(two)]))
    assert text == (
        '# HELP c_total c\n# TYPE c_total counter\nc_total{label="a"} 1.0\n'
        'c_total{label="b"} 2.0\n# HELP g g\n# TYPE g gauge\ng 4.0\n'
    )


def test_a_series_before_any_type_line_is_refused() -> None:
    with pytest.raises(ValueError, match="not a series"):
        parse("orphan 1.0\n")


def test_totals_never_go_backwards_when_a_worker_ends() -> None:
    merger = Merger()
    first, second = parse(_exposition(10, 3, 1, [0.5])), parse(_exposition(5, 1, 1, [0.5]))
    before = _samples(merger.merge([first, second]))
    merger.retire(first)  # worker 0 died; its replacement starts from nothing
    replacement = parse(_exposition(1, 0, 1, []))
    after = _samples(merger.merge([replacement, second]))
    assert before[REQ] == 15 and after[REQ] == 16
    assert after[("kthena_router_x_seconds_count", ())] == 2
    # gauges are the live workers' only
    assert after[("kthena_router_active_requests", ())] == 1
    assert _samples(merger.merge([]))[REQ] == 10


def test_the_worker_spec_goes_through_the_environment() -> None:
    spec = WorkerSpec(2, 3, socket.AF_INET6, "/run/k,x/w2.admin")
    assert WorkerSpec.from_environment({ENVIRONMENT: spec.encode()}) == spec
    assert WorkerSpec.from_environment({}) is None
    with pytest.raises(ValueError):
        WorkerSpec.decode("index=x")


def _config(**top: Any) -> RouterConfig:
    spec: dict[str, Any] = {"listen": "tcp:8080", **top}
    return parse_config(spec, "t.yaml", Path("."), [])


def test_a_worker_serves_its_admin_on_its_private_socket_and_runs_no_simulators() -> None:
    config = dataclasses.replace(
        _config(
            adminListen="tcp:9000",
            debugListen="tcp:9001",
            observability={"debug": {"port": 9091, "token": "t" * 32, "allow": ["10.0.0.0/8"]}},
        ),
        simulators=(SimulatorSpec("vllm", "m", "tcp:8000"),),
    )
    spec = WorkerSpec(1, 3, socket.AF_INET, "/run/w1.admin")
    worker = worker_config(config, spec)
    assert worker.listen == "tcp:8080"
    assert worker.admin_listen == "unix:/run/w1.admin" and worker.debug_listen is None
    debug = worker.observability.debug
    assert debug.port == worker.observability.metrics.port  # one listener: metrics + debug
    assert debug.allow == LOOPBACK_NETWORKS and debug.token is None
    assert worker.simulators == ()
    assert worker_config(worker, spec) == worker  # a reload sees no change of its own


def test_only_tcp_endpoints_are_shared() -> None:
    for good in ("tcp:8080", "tcp6:8080:interface=\\:\\:1", "systemd:domain=INET:index=0"):
        shareable(good)
    for bad in ("unix:/run/k.sock", "ssl:443:privateKey=k.pem"):
        with pytest.raises(NotShareableError, match="--workers"):
            shareable(bad)


def test_a_shared_port_accepts_one_connection_per_wake_up() -> None:
    port = SharedPort(0, None)  # type: ignore[arg-type]
    port.numberAccepts = 21  # what Twisted sets after a busy wake-up
    assert port.numberAccepts == 1


def test_workers_option() -> None:
    options = Options()
    options.parseOptions(["--demo", "--workers", "2"])
    assert options["workers"] == 2
    with pytest.raises(Exception, match="--workers takes 0 to"):
        Options().parseOptions(["--demo", "--workers", "-1"])
    auto = Options()
    auto.parseOptions(["--demo", "--workers", "auto"])
    assert auto["workers"] == len(os.sched_getaffinity(0)) >= 1
    with pytest.raises(Exception, match="invalid literal"):
        Options().parseOptions(["--demo", "--workers", "many"])


class FakeProcess:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.signals: list[str] = []

    def signalProcess(self, name: str) -> None:
        self.signals.append(name)


class ProcessReactor(MemoryReactorClock):
    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[dict[str, Any]] = []

    def spawnProcess(self, protocol: Any, executable: str, args: list[str], **kw: Any) -> Any:
        process = FakeProcess(1000 + len(self.spawned))
        self.spawned.append({"protocol": protocol, "args": args, "process": process, **kw})
        return process

    def end(self, index: int, reason: Failure) -> None:
        self.spawned[index]["protocol"].processEnded(reason)


class FakePort:
    addressFamily = socket.AF_INET

    def __init__(self) -> None:
        self.stopped = False

    def fileno(self) -> int:
        return 17

    def getHost(self) -> str:
        return "127.0.0.1:8080"

    def stopListening(self) -> None:
        self.stopped = True


def _supervisor(count: int = 2) -> tuple[Supervisor, ProcessReactor, FakePort, CollectorRegistry]:
    reactor = ProcessReactor()
    port = FakePort()
    registry = CollectorRegistry()
    workers = [Worker(i, f"/none/w{i}.admin", f"/none/w{i}.notify") for i in range(count)]
    environ = {"LISTEN_FDS": "1", "WATCHDOG_USEC": "1000", "HOME": "/root"}
    supervisor = Supervisor(
        reactor,  # type: ignore[arg-type]
        "tcp:8080",
        "/etc/k.yaml",
        workers,
        WorkerMetrics(registry),
        drain_timeout=5.0,
        environ=environ,
        bind=lambda reactor, listen: port,  # type: ignore[arg-type,return-value]
    )
    supervisor.startService()
    return supervisor, reactor, port, registry


def _restarts(registry: CollectorRegistry, index: int) -> float | None:
    return registry.get_sample_value("kthena_router_worker_restarts_total", {"worker": str(index)})


def test_workers_start_on_the_shared_socket_with_their_spec() -> None:
    supervisor, reactor, _, registry = _supervisor()
    assert len(reactor.spawned) == 2
    first = reactor.spawned[0]
    assert first["childFDs"] == {0: 0, 1: 1, 2: "r", 3: 17}  # its log comes to the parent
    assert first["args"][-2:] == ["--config", "/etc/k.yaml"]
    env = first["env"]
    spec = WorkerSpec.decode(env[ENVIRONMENT])
    assert (spec.index, spec.fd, spec.admin) == (0, 3, "/none/w0.admin")
    assert env["NOTIFY_SOCKET"] == "/none/w0.notify"
    assert "LISTEN_FDS" not in env and env["HOME"] == "/root"
    assert env["WATCHDOG_USEC"] == str(int(WORKER_WATCHDOG * 1e6))  # its own, not the parent's
    assert registry.get_sample_value("kthena_router_workers") == 2
    assert _restarts(registry, 1) == 0
    assert [w.state for w in supervisor.workers] == ["starting", "starting"]


def test_a_worker_that_ends_is_started_again_and_counted() -> None:
    supervisor, reactor, _, registry = _supervisor()
    reactor.advance(1)
    reactor.end(0, Failure(ProcessTerminated(signal=signal.SIGKILL)))
    assert supervisor.workers[0].state == "exited"
    assert registry.get_sample_value("kthena_router_workers") == 1
    reactor.advance(RESTART_DELAY - 0.01)
    assert len(reactor.spawned) == 2
    reactor.advance(0.01)
    assert len(reactor.spawned) == 3
    assert supervisor.workers[0].pid == 1002 and supervisor.workers[0].restarts == 1
    assert _restarts(registry, 0) == 1 and _restarts(registry, 1) == 0
    # failing again at once: the pause doubles; after a stable run it is back to the first
    reactor.end(2, Failure(ProcessTerminated(exitCode=1)))
    reactor.advance(RESTART_DELAY)
    assert len(reactor.spawned) == 3
    reactor.advance(RESTART_DELAY)
    assert len(reactor.spawned) == 4
    reactor.advance(STABLE_AFTER)
    reactor.end(3, Failure(ProcessTerminated(exitCode=1)))
    reactor.advance(RESTART_DELAY)
    assert len(reactor.spawned) == 5 and _restarts(registry, 0) == 3


def test_what_an_ended_worker_counted_stays_in_the_totals() -> None:
    supervisor, reactor, _, _ = _supervisor(1)
    supervisor.workers[0].last = parse(_exposition(9, 1, 1, []))
    reactor.end(0, Failure(ProcessTerminated(exitCode=1)))
    assert supervisor.workers[0].last == []
    assert _samples(supervisor.merger.merge([]))[REQ] == 9


def test_signals_go_to_every_running_worker() -> None:
    supervisor, reactor, _, _ = _supervisor()
    reactor.end(1, Failure(ProcessDone(0)))
    supervisor.signal_all(signal.SIGHUP)
    assert reactor.spawned[0]["process"].signals == ["HUP"]
    assert reactor.spawned[1]["process"].signals == []


def test_stop_closes_the_socket_drains_every_worker_and_restarts_none() -> None:
    supervisor, reactor, port, _ = _supervisor()
    stopped = supervisor.stopService()
    assert port.stopped
    assert [s["process"].signals for s in reactor.spawned] == [["TERM"], ["TERM"]]
    assert [w.state for w in supervisor.workers] == ["stopping", "stopping"]
    done: list[object] = []
    stopped.addCallback(done.append)
    reactor.end(0, Failure(ProcessDone(0)))
    assert not done
    reactor.end(1, Failure(ProcessDone(0)))
    assert done
    reactor.advance(60)
    assert len(reactor.spawned) == 2  # nothing started again
    assert not reactor.getDelayedCalls()  # the SIGKILL timer is gone


def test_a_worker_that_does_not_stop_is_killed_after_the_drain() -> None:
    supervisor, reactor, _, _ = _supervisor(1)
    supervisor.stopService()
    reactor.advance(5.0 + KILL_GRACE)
    assert reactor.spawned[0]["process"].signals == ["TERM", "KILL"]


def test_a_worker_that_stops_answering_its_watchdog_is_killed() -> None:
    supervisor, reactor, _, _ = _supervisor()
    first, second = supervisor.workers
    first.state = second.state = "ready"
    supervisor.pinged(first)
    supervisor.pinged(second)
    for _ in range(8):  # the first pings every few seconds, the second has gone quiet
        reactor.advance(WORKER_WATCHDOG / 4)
        supervisor.pinged(first)
    assert reactor.spawned[0]["process"].signals == []
    assert reactor.spawned[1]["process"].signals == ["KILL"]


def test_the_watchdog_leaves_starting_and_stopping_workers_alone() -> None:
    supervisor, reactor, _, _ = _supervisor()
    supervisor.workers[1].state = "stopping"
    reactor.advance(WORKER_WATCHDOG * 3)  # worker 0 is still starting
    assert [s["process"].signals for s in reactor.spawned] == [[], []]


def test_a_worker_tells_its_state_on_its_notify_socket() -> None:
    worker = Worker(0, "a", "n", process=FakeProcess(5), state="starting")  # type: ignore[arg-type]
    changes: list[str] = []
    pings: list[int] = []
    protocol = NotifyProtocol(worker, lambda w: changes.append(w.state), lambda w: pings.append(1))
    protocol.datagramReceived(b"READY=1\nSTATUS=generation 1\nMAINPID=5")
    protocol.datagramReceived(b"RELOADING=1\nMONOTONIC_USEC=1")
    protocol.datagramReceived(b"WATCHDOG=1")
    protocol.datagramReceived(b"STOPPING=1\n")
    assert changes == ["ready", "reloading", "stopping"]
    assert len(pings) == 2  # READY=1 and WATCHDOG=1


class FakeAsker:
    def __init__(self, answers: dict[int, Any]) -> None:
        self.answers = answers
        self.asked: list[tuple[int, bytes, dict[bytes, bytes]]] = []

    def ask(self, worker: Worker, target: bytes, headers: dict[bytes, bytes]) -> Deferred[Any]:
        self.asked.append((worker.index, target, headers))
        answer = self.answers[worker.index]
        return fail(answer) if isinstance(answer, Exception) else succeed(answer)


def _live(count: int) -> list[Worker]:
    return [Worker(i, "a", "n", process=FakeProcess(100 + i), pid=100 + i) for i in range(count)]  # type: ignore[arg-type]


def _render(resource: Any, path: bytes = b"/metrics", **headers: bytes) -> DummyRequest:
    request = DummyRequest(path.strip(b"/").split(b"/"))
    request.uri = path
    for name, value in headers.items():
        request.requestHeaders.setRawHeaders(name.replace("_", "-").encode(), [value])
    assert resource.render(request) == NOT_DONE_YET
    assert request.finished
    return request


def test_the_parent_serves_the_merged_exposition_then_its_own_families() -> None:
    workers = _live(2)
    answers: dict[int, Any] = {
        0: (200, b"text/plain", _exposition(2, 1, 1, []).encode()),
        1: (200, b"text/plain", _exposition(3, 1, 0, []).encode()),
    }
    asker = FakeAsker(answers)
    registry = CollectorRegistry()
    WorkerMetrics(registry).running.set(2)
    resource = MergedMetrics(asker, lambda: workers, Merger(), registry, "/metrics")  # type: ignore[arg-type]
    request = _render(resource, accept_encoding=b"gzip")
    assert asker.asked[0] == (0, b"/metrics", {b"accept": b"text/plain"})
    body = gzip.decompress(b"".join(request.written)).decode()
    samples = _samples(body)
    assert samples[REQ] == 5 and samples[("kthena_router_workers", ())] == 2
    assert request.responseHeaders.getRawHeaders(b"content-type") == [
        b"text/plain; version=0.0.4; charset=utf-8"
    ]
    # worker 1 fails to answer: what it last reported still counts
    answers[1] = ConnectionRefusedError("no")
    answers[0] = (200, b"text/plain", _exposition(4, 1, 1, []).encode())
    again = _samples(b"".join(_render(resource).written).decode())
    assert again[REQ] == 7


def test_an_answer_from_an_earlier_process_of_a_slot_is_not_kept() -> None:
    workers = _live(1)
    pending: Deferred[Any] = Deferred()

    class Slow(FakeAsker):
        def ask(self, worker: Worker, target: bytes, headers: dict[bytes, bytes]) -> Deferred[Any]:
            return pending

    resource = MergedMetrics(Slow({}), lambda: workers, Merger(), CollectorRegistry(), "/metrics")  # type: ignore[arg-type]
    resource.collect()
    workers[0].generation += 1  # it died and a new process took the slot meanwhile
    pending.callback((200, b"text/plain", _exposition(2, 1, 1, []).encode()))
    assert workers[0].last == []


def test_debug_requests_go_to_every_worker() -> None:
    workers = [*_live(2), Worker(2, "a", "n")]  # the third is between two processes
    asker = FakeAsker(
        {0: (200, b"application/json", b'{"n": 1}'), 1: ConnectionRefusedError("refused")}
    )
    request = _render(WorkersDebug(asker, workers), b"/debug/routing/decisions?limit=2")  # type: ignore[arg-type]
    answer = json.loads(b"".join(request.written))
    assert [a[:2] for a in asker.asked] == [
        (0, b"/debug/routing/decisions?limit=2"),
        (1, b"/debug/routing/decisions?limit=2"),
    ]
    first, second = answer["workers"]
    assert first == {"worker": 0, "pid": 100, "status": 200, "body": {"n": 1}}
    assert second["worker"] == 1 and second["status"] is None and "refused" in second["error"]


def test_debug_workers_lists_every_slot() -> None:
    workers = [*_live(1), Worker(1, "a", "n", restarts=2)]
    request = DummyRequest([b"workers"])
    body = WorkersDebug(FakeAsker({}), workers).render(request)  # type: ignore[arg-type]
    assert isinstance(body, bytes)
    views = json.loads(body)["workers"]
    assert [(v["worker"], v["pid"], v["restarts"]) for v in views] == [(0, 100, 0), (1, None, 2)]


COUNTING_GAUGES = {
    "kthena_router_active_downstream_requests",
    "kthena_router_active_upstream_requests",
    "kthena_router_active_requests",
    "kthena_router_fairness_queue_size",
    "kthena_router_prefix_cache_entries",
    "kthena_lb_connection_pool_size",
}
"""Gauges of a worker's own state, which the parent sums (docs/operations.md says which)."""


def test_every_gauge_of_the_router_is_either_summed_or_mirrored() -> None:
    from kthena.service import load, makeRouterService
    from kthena.tap import demo_config_path
    from kthena.workers.merge import MIRRORED

    router = makeRouterService(load(demo_config_path()), MemoryReactorClock())  # type: ignore[arg-type]
    gauges = {m.name for m in router.registry.collect() if m.type == "gauge"}
    assert gauges == COUNTING_GAUGES | MIRRORED
    assert not COUNTING_GAUGES & MIRRORED


def test_a_worker_whose_parent_is_gone_stops() -> None:
    from kthena.workers.orphan import CHECK_INTERVAL, OrphanWatch

    reactor = MemoryReactorClock()
    reactor.running = True
    parents = [40]
    watch = OrphanWatch(reactor, lambda: parents[0])
    watch.startService()
    reactor.advance(CHECK_INTERVAL * 3)
    stopped = [reactor.hasStopped]
    parents[0] = 1  # handed to init
    reactor.advance(CHECK_INTERVAL)
    stopped.append(reactor.hasStopped)
    assert stopped == [False, True]
    assert not reactor.getDelayedCalls()


def test_a_workers_log_goes_on_in_the_parents() -> None:
    import io

    from twisted.logger import Logger, LogLevel, jsonFileLogObserver

    from kthena.workers.logs import WorkerLog

    stderr = io.StringIO()  # what the worker writes: twist --log-file + --log-format json
    Logger("kthena.listening", observer=jsonFileLogObserver(stderr)).info("up on {n}", n=8)
    data = stderr.getvalue().encode()
    events: list[dict[str, Any]] = []
    log = WorkerLog(1, events.append)
    log.received(data[:20])  # a line across reads
    assert events == []
    log.received(data[20:] + b"Traceback (most recent call last):\n  File x")
    log.ended()
    first, second, third = events
    assert first["log_format"] == "up on {n}" and first["n"] == 8
    assert first["log_system"] == "worker 1 kthena.listening#info"
    assert first["log_level"] is LogLevel.info
    assert second["line"] == "Traceback (most recent call last):"
    assert second["log_system"] == "worker 1 stderr#error"
    assert third["line"] == "File x"
