"""
The router tells systemd its state (sd_notify), without sockets: the sender is injected
and time is a test clock. READY=1 waits for the first scrape round, a reload is bracketed
by RELOADING=1 (with CLOCK_MONOTONIC) and READY=1, STOPPING=1 comes before the proxy's port
closes, the watchdog pings every half WATCHDOG_USEC and leaves no timer behind, and the
environment decides all of it. Also the process's own words: C{--version} and the lines
it logs once started.
"""

from __future__ import annotations

import os
import time
from importlib import metadata
from pathlib import Path
from typing import Any, cast

import pytest
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import capturedLogs, formatEvent

from kthena.config.router import parse_config
from kthena.interfaces import IServerReactor
from kthena.service import RouterService
from kthena.systemd import Systemd, SystemdNotifier, socket_address, watchdog_interval
from kthena.tap import Options
from tests.unit.routerfixtures import Doc, pod, server, simple_route

DOCS: list[Doc] = [
    simple_route("r", "m", "srv"),
    server("srv", {"app": "a"}),
    pod("p0", "10.0.0.1", {"app": "a"}),
    pod("p1", "10.0.0.2", {"app": "a"}),
]


def fields(message: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in message.splitlines())


def kinds(sent: list[str]) -> list[str]:
    """Each message by its first key (READY, RELOADING, STOPPING, WATCHDOG)."""
    return [message.split("=", 1)[0] for message in sent]


def router(sent: list[str], **settings: Any) -> tuple[RouterService, MemoryReactorClock]:
    clock = MemoryReactorClock()
    config = parse_config(
        {"observability": {"accessLog": {"enabled": False}}, **settings, "resources": DOCS},
        "t.yaml",
        Path("."),
        [],
    )
    return RouterService(config, cast(IServerReactor, clock), systemd=Systemd(sent.append)), clock


# -- the environment


@pytest.mark.parametrize(
    ("value", "address"),
    [("/run/systemd/notify", b"/run/systemd/notify"), ("@sd-notify", b"\0sd-notify")],
)
def test_notify_socket_address(value: str, address: bytes) -> None:
    assert socket_address(value) == address


def test_no_notify_socket_no_systemd() -> None:
    assert Systemd.from_environment({}) is None
    assert Systemd.from_environment({"NOTIFY_SOCKET": "", "WATCHDOG_USEC": "1000000"}) is None


@pytest.mark.parametrize(
    ("environ", "interval"),
    [
        ({"WATCHDOG_USEC": "400000"}, 0.2),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "42"}, 15.0),
        ({"WATCHDOG_USEC": "400000", "WATCHDOG_PID": "43"}, None),  # another process's
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({}, None),
    ],
)
def test_watchdog_interval(environ: dict[str, str], interval: float | None) -> None:
    assert watchdog_interval(environ, 42) == interval
    systemd = Systemd.from_environment({"NOTIFY_SOCKET": "/run/n", **environ}, pid=42)
    assert systemd is not None
    assert systemd.watchdog == interval


# -- the notifier


def notifier(
    sent: list[str], clock: Clock, serving: bool = True, watchdog: float | None = None
) -> SystemdNotifier:
    return SystemdNotifier(clock, Systemd(sent.append, watchdog), lambda: serving, lambda: "ok")


def test_the_watchdog_pings_every_interval_and_stops_with_the_service() -> None:
    sent: list[str] = []
    clock = Clock()
    service = notifier(sent, clock, serving=False, watchdog=0.2)
    service.startService()
    assert sent == ["WATCHDOG=1"]  # at once: systemd may have started counting already
    clock.advance(0.19)
    assert sent == ["WATCHDOG=1"]
    clock.advance(0.01)
    clock.advance(0.2)
    assert sent == ["WATCHDOG=1"] * 3
    service.stopService()
    assert kinds(sent) == ["WATCHDOG"] * 3 + ["STOPPING"]
    assert clock.getDelayedCalls() == []


def test_no_watchdog_no_timer() -> None:
    sent: list[str] = []
    clock = Clock()
    notifier(sent, clock).startService()
    assert kinds(sent) == ["READY"]
    assert clock.getDelayedCalls() == []


def test_nothing_is_sent_outside_systemd() -> None:
    clock = Clock()
    service = SystemdNotifier(clock, None, lambda: True, lambda: "ok")
    service.startService()
    service.reloading()
    service.reloaded()
    service.stopService()
    assert clock.getDelayedCalls() == []


def test_ready_once_only_and_reloads_only_after_it() -> None:
    sent: list[str] = []
    serving = [False]
    service = SystemdNotifier(Clock(), Systemd(sent.append), lambda: serving[0], lambda: "ok")
    service.startService()
    service.reloading()  # a reload during start-up: READY=1 is still to come
    service.reloaded()
    assert sent == []
    serving[0] = True
    service.check()
    service.check()
    assert kinds(sent) == ["READY"]
    assert fields(sent[0]) == {"READY": "1", "STATUS": "ok", "MAINPID": str(os.getpid())}


def test_reloading_carries_the_monotonic_clock() -> None:
    sent: list[str] = []
    service = notifier(sent, Clock())
    service.startService()
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    service.reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    service.reloaded()
    assert kinds(sent) == ["READY", "RELOADING", "READY"]
    reloading = fields(sent[1])
    assert reloading["RELOADING"] == "1"
    assert before <= int(reloading["MONOTONIC_USEC"]) <= after


def test_a_failing_socket_is_logged_once_and_never_raised() -> None:
    failing = [True]
    sent: list[str] = []

    def send(message: str) -> None:
        if failing[0]:
            raise ConnectionRefusedError(111, "Connection refused")
        sent.append(message)

    clock = Clock()
    service = SystemdNotifier(clock, Systemd(send, 1.0), lambda: True, lambda: "ok")
    with capturedLogs() as events:
        service.startService()  # WATCHDOG=1 and READY=1 both fail
        clock.advance(1.0)
        failing[0] = False
        clock.advance(1.0)
        failing[0] = True
        clock.advance(1.0)
    warnings = [formatEvent(e) for e in events if "cannot notify" in formatEvent(e)]
    assert warnings == ["cannot notify systemd: [Errno 111] Connection refused"] * 2
    assert sent == ["WATCHDOG=1"]
    service.stopService()


# -- in the router's tree


def test_ready_after_the_first_scrape_round() -> None:
    sent: list[str] = []
    service, clock = router(sent)
    service.startService()
    assert sent == []  # the pods' first scrape is in flight (it times out after 0.8 s)
    clock.advance(1.0)
    assert service.scraper is not None
    assert service.scraper.rounds == 1
    assert kinds(sent) == ["READY"]
    assert fields(sent[0])["STATUS"] == "generation 1: 1 routes, 1 servers, 2 pods"
    clock.advance(5.0)  # later rounds say nothing
    assert kinds(sent) == ["READY"]


def test_ready_at_start_when_pods_are_not_scraped() -> None:
    sent: list[str] = []
    service, _ = router(sent, podMetrics={"enabled": False})
    service.startService()
    assert kinds(sent) == ["READY"]


def test_a_reload_is_bracketed_and_the_drain_announced() -> None:
    sent: list[str] = []
    service, clock = router(sent, podMetrics={"enabled": False})
    service.startService()
    new = parse_config({"resources": DOCS[:3]}, "t.yaml", Path("."), [])
    service.reconfigure(new)
    assert kinds(sent) == ["READY", "RELOADING", "READY"]
    assert fields(sent[2])["STATUS"] == "generation 2: 1 routes, 1 servers, 1 pods"

    proxy_open_when_told: list[bool] = []
    stopping = Systemd(lambda m: proxy_open_when_told.append(service.proxy.port is not None))
    service.systemd.systemd = stopping
    stopped = service.stopService()
    clock.advance(service.config.drain_timeout)
    assert stopped.called
    assert proxy_open_when_told == [True]  # STOPPING=1 first: the drain has not begun


# -- the process's own words


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        Options().parseOptions(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out == f"kthena-router {metadata.version('kthena-router')}\n"


def test_startup_lines_say_what_listens_where(tmp_path: Path) -> None:
    clock = MemoryReactorClock()
    log_file = tmp_path / "access.log"
    config = parse_config(
        {
            "listen": "tcp:8081",
            "adminListen": "tcp:9091",
            "observability": {"accessLog": {"output": str(log_file)}},
            "resources": DOCS,
        },
        "t.yaml",
        Path("."),
        [],
    )
    service = RouterService(config, cast(IServerReactor, clock))
    with capturedLogs() as events:
        service.startService()
    lines = [formatEvent(e) for e in events]
    assert "kthena-router started, generation 1: 1 routes, 1 servers, 2 pods" in lines
    assert "proxy: tcp:8081 at 0.0.0.0:8081 serves /v1/*, /healthz, /readyz" in lines
    assert "admin: tcp:9091 at 0.0.0.0:9091 serves /metrics, /debug/" in lines
    assert f"access log: {log_file} (json)" in lines
    stopped = service.stopService()
    while not stopped.called:
        clock.advance(0.1)
        time.sleep(0.001)  # the access log's writer thread
