"""
The service tree is the lifecycle: children start in order and stop in reverse, one after
another, and a stopped router leaves no timer, loop, pool, thread or listener behind,
whatever its config (the demo, scraping on or off, the access log on or off or to a
file, the debug endpoints on a listener of their own), under systemd's watchdog too.
Reloads go to each reconfigurable child in the tree's order.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import pytest
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.testing import MemoryReactorClock
from zope.interface import implementer

from kthena.config.router import parse_config
from kthena.interfaces import IReconfigurable, IServerReactor
from kthena.lifecycle import SequentialMultiService, SignalService
from kthena.service import RouterService, load
from kthena.systemd import Systemd
from kthena.tap import demo_config_path
from tests.unit.routerfixtures import Doc, pod, server, simple_route

DOCS: list[Doc] = [
    simple_route("r", "m", "srv"),
    server("srv", {"app": "a"}),
    pod("p0", "10.0.0.1", {"app": "a"}),
    pod("p1", "10.0.0.2", {"app": "a"}),
]


def shape(tmp_path: Path, name: str) -> Any:
    if name == "demo":
        return load(demo_config_path())
    top: dict[str, Any] = {
        "listen": "tcp:8080",
        "observability": {"accessLog": {"enabled": False}},
        "resources": DOCS,
    }
    if name == "no scraping":
        top["podMetrics"] = {"enabled": False}
    elif name == "access log to a file":
        top["observability"] = {"accessLog": {"output": str(tmp_path / "access.log")}}
    elif name == "debug on a listener of its own":
        top["observability"] = {"accessLog": {"enabled": False}, "debug": {"port": 9091}}
    return parse_config(top, str(tmp_path / "router.yaml"), tmp_path, [])


SHAPES = [
    "demo",
    "scraping",
    "no scraping",
    "access log to a file",
    "debug on a listener of its own",
]


def _writer_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "kthena-access-log"]


def _settle(clock: MemoryReactorClock, d: Deferred[Any], seconds: float = 20.0) -> None:
    """Run the clock (and let the access log's writer thread finish) until C{d} fires."""
    deadline = time.monotonic() + seconds
    while not d.called:
        if time.monotonic() > deadline:
            pytest.fail("the router did not stop")
        clock.advance(0.05)
        time.sleep(0.001)


@pytest.mark.parametrize("name", SHAPES)
def test_a_stopped_router_leaves_nothing_behind(tmp_path: Path, name: str) -> None:
    (tmp_path / "router.yaml").write_text("{}")
    clock = MemoryReactorClock()
    config = shape(tmp_path, name)
    sent: list[str] = []
    router = RouterService(
        config,
        cast(IServerReactor, clock),
        config_path=str(tmp_path / "router.yaml"),
        systemd=Systemd(sent.append, watchdog=1.0),
    )
    router.privilegedStartService()
    router.startService()
    assert all(child.running for child in router)
    for _ in range(30):  # scrape rounds, scrapes timing out, reload polls
        clock.advance(0.5)
    stopped = router.stopService()
    _settle(clock, stopped)
    assert not any(child.running for child in router)
    assert clock.getDelayedCalls() == []  # the watchdog's timer included
    assert "WATCHDOG=1" in sent
    assert _writer_threads() == []
    assert router.proxy.port is None
    assert all(listener.port is None for _, listener in router.admin.listeners)
    upstream: Any = router.upstream
    assert upstream.pool.closed and upstream.pool._idle == {}
    if router.scraper is not None:
        assert router.scraper._requests == set()
        scrapes: Any = router.scraper.upstream
        assert scrapes.pool.closed and scrapes.pool._idle == {}


class Recorder(Service):
    def __init__(self, name: str, log: list[str]) -> None:
        self.name = name
        self.log = log

    def startService(self) -> None:
        super().startService()
        self.log.append(f"start {self.name}")

    def stopService(self) -> Deferred[None]:
        super().stopService()
        self.log.append(f"stopping {self.name}")
        d: Deferred[None] = Deferred()
        self.pending = d
        return d


def test_children_stop_in_reverse_one_after_another() -> None:
    log: list[str] = []
    tree = SequentialMultiService()
    first, second = Recorder("first", log), Recorder("second", log)
    first.setServiceParent(tree)
    second.setServiceParent(tree)
    tree.startService()
    stopped = tree.stopService()
    assert log == ["start first", "start second", "stopping second"]  # first waits
    second.pending.callback(None)
    assert log[-1] == "stopping first"
    assert not stopped.called
    first.pending.callback(None)
    assert stopped.called


TREE = [
    "simulators",
    "resources",
    "pod scraper",
    "upstream",
    "admin",
    None,  # the access log (to stdout): not reconfigurable
    "jwks",
    "rate limits",
    "fairness",
    "data plane",
    "proxy listener",
    "gateway ports",
    "reloader",
    "systemd",  # last: READY=1 once all the others run; first to stop: STOPPING=1
]
"""The router's children in start order (the order reloads reach them too)."""

NOT_RECONFIGURABLE = {None, "systemd"}
"""The router brackets a reload with RELOADING=1 and READY=1 itself."""


def test_the_router_tree_in_order() -> None:
    config = parse_config({"resources": DOCS}, "t.yaml", Path("."), [])
    router = RouterService(config, cast(IServerReactor, MemoryReactorClock()))
    assert [getattr(child, "name", None) for child in router] == TREE


@implementer(IReactorFromThreads)
class ThreadedClock(MemoryReactorClock):
    """A clock that takes calls from signal handlers (as a real reactor does)."""

    def callFromThread(self, callable: Callable[..., Any], *args: object, **kwargs: object) -> None:
        callable(*args, **kwargs)


@pytest.mark.parametrize("access_log", [{"enabled": False}, {"output": "stdout"}])
def test_sigusr1_never_kills_a_router_process(access_log: dict[str, Any]) -> None:
    """logrotate's postrotate sends SIGUSR1 whatever the config: with the access log off
    too, the router handles it (the default action ends the process)."""
    top = {"observability": {"accessLog": access_log}, "resources": DOCS}
    config = parse_config(top, "t.yaml", Path("."), [])
    router = RouterService(
        config, cast(IServerReactor, ThreadedClock()), install_signal_handlers=True
    )
    [usr1] = [c for c in router if isinstance(c, SignalService) and c.signum == signal.SIGUSR1]
    usr1.startService()
    try:
        assert signal.getsignal(signal.SIGUSR1) not in (signal.SIG_DFL, None)
        os.kill(os.getpid(), signal.SIGUSR1)  # handled: the test goes on
    finally:
        usr1.stopService()


def test_a_reload_reaches_each_reconfigurable_child_in_order(monkeypatch: Any) -> None:
    config = parse_config({"resources": DOCS}, "t.yaml", Path("."), [])
    router = RouterService(config, cast(IServerReactor, MemoryReactorClock()))
    seen: list[str] = []
    for child in router:
        if IReconfigurable.providedBy(child):
            original = child.reconfigure

            def spy(new: Any, child: Any = child, original: Any = original) -> None:
                seen.append(child.name)
                original(new)

            monkeypatch.setattr(child, "reconfigure", spy)
    new = parse_config({"resources": DOCS[:3], "maxBodyBytes": 5}, "t.yaml", Path("."), [])
    router.reconfigure(new)
    assert seen == [name for name in TREE if name not in NOT_RECONFIGURABLE]
    assert set(router.store.pods) == {"default/p0"}  # the store first, then the rest
    assert router.proxy.site.max_body_bytes == 5
    assert router.config is new


@pytest.mark.parametrize("client", ["lean", "twisted"])
def test_the_scraper_has_a_client_of_its_own_of_the_proxys_kind(
    tmp_path: Path, client: str
) -> None:
    top: dict[str, Any] = {
        "listen": "tcp:8080",
        "observability": {"accessLog": {"enabled": False}},
        "upstream": {"client": client},
        "podMetrics": {"interval": "2s", "timeout": "1500ms"},
        "resources": DOCS,
    }
    config = parse_config(top, str(tmp_path / "router.yaml"), tmp_path, [])
    router = RouterService(config, cast(IServerReactor, MemoryReactorClock()))
    assert router.scraper is not None
    assert type(router.scraper.upstream) is type(router.upstream)
    assert router.scraper.upstream is not router.upstream
    scrapes: Any = router.scraper.upstream
    if client == "lean":
        assert (scrapes.pool.max_idle, scrapes.pool.idle_timeout) == (1, 4.0)
    else:
        assert (scrapes.pool.maxPersistentPerHost, scrapes.pool.cachedConnectionTimeout) == (1, 4.0)
    assert scrapes.endpoints.connect_timeout == 1.5
    top["podMetrics"] = {"interval": "5s", "timeout": "3s"}
    router.scraper.reconfigure(parse_config(top, str(tmp_path / "router.yaml"), tmp_path, []))
    assert scrapes.endpoints.connect_timeout == 3.0
    idle = scrapes.pool.idle_timeout if client == "lean" else scrapes.pool.cachedConnectionTimeout
    assert idle == 10.0
