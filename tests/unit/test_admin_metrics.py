"""
GET /metrics on the admin listener, in memory: content negotiation (Prometheus text 0.0.4
and OpenMetrics), gzip, family selection, the configured path, disabled metrics, which
listeners a config asks for, and rendering in slices on the reactor thread (bounded).
"""

from __future__ import annotations

import gzip
import itertools
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorThreads
from twisted.internet.testing import MemoryReactorClock
from zope.interface import implementer

from kthena.config.router import parse_config
from kthena.config.scheduler import SchedulerConfig
from kthena.observability import render as render_module
from kthena.observability.admin import (
    MAX_WAITING_SCRAPES,
    SLICE_PAUSE,
    AdminListenerPlan,
    at_once,
    plan_listeners,
    runner_for,
    sliced,
)
from kthena.scheduler.build import build_scheduler
from tests.unit.adminfixtures import REMOTE_PEER, AdminHarness, completion

TEXT_0_0_4 = "text/plain; version=0.0.4; charset=utf-8"
PROMETHEUS_ACCEPT = (
    "application/openmetrics-text;version=1.0.0;escaping=allow-utf-8;q=0.6,"
    "application/openmetrics-text;version=0.0.1;q=0.5,"
    "text/plain;version=1.0.0;escaping=allow-utf-8;q=0.4,"
    "text/plain;version=0.0.4;q=0.3,*/*;q=0.2"
)
"""What Prometheus 3 sends when it scrapes."""

REQUESTS_LINE = (
    'kthena_router_requests_total{error_type="successful_request",model="m",'
    'path="/v1/chat/completions",status_code="200"} 1.0'
)


def one_request(admin: AdminHarness) -> None:
    client = admin.send_chat()
    admin.upstream.last.respond_json(completion())
    assert client.got().status == 200


@pytest.fixture
def admin() -> AdminHarness:
    admin = AdminHarness()
    one_request(admin)
    return admin


def test_prometheus_text_by_default(admin: AdminHarness) -> None:
    response = admin.get("/metrics")
    assert response.status == 200
    assert response.header("content-type") == TEXT_0_0_4
    assert response.header("content-encoding") is None
    text = response.body.decode()
    assert REQUESTS_LINE in text.splitlines()
    assert "# TYPE kthena_router_requests_total counter" in text
    assert "# EOF" not in text
    assert response.header("content-length") == str(len(response.body))


def scraped_value(admin: AdminHarness, name: str) -> float:
    for line in admin.get("/metrics").body.decode().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not exposed")


def test_kthenas_gauges_beyond_the_spec() -> None:
    """Kthena exports these two on every scrape (its metrics_server_test.go checks one)."""
    admin = AdminHarness()
    assert scraped_value(admin, "kthena_router_active_requests") == 0
    assert scraped_value(admin, "kthena_router_prefix_cache_entries") == 0
    client = admin.send_chat()
    assert scraped_value(admin, "kthena_router_active_requests") == 1
    admin.upstream.last.respond_json(completion())
    assert client.got().status == 200
    assert scraped_value(admin, "kthena_router_active_requests") == 0
    admin.plane.scheduling.scheduler = build_scheduler(SchedulerConfig())  # Kthena's defaults
    one_request(admin)
    assert scraped_value(admin, "kthena_router_prefix_cache_entries") == 1  # one short block


def test_kthenas_destination_labels_when_asked() -> None:
    admin = AdminHarness(observability={"metrics": {"destinationLabels": True}})
    one_request(admin)
    missing = admin.send_chat(model="nope")
    assert missing.got().status == 404
    text = admin.get("/metrics").body.decode().splitlines()
    assert (
        'kthena_router_requests_total{backend_name="default/base",backend_type="model_server",'
        'error_type="successful_request",model="m",model_route="default/m",'
        'path="/v1/chat/completions",status_code="200",upstream_model="org/m"} 1.0'
    ) in text
    assert (
        'kthena_router_requests_total{backend_name="none",backend_type="unresolved",'
        'error_type="route_not_found",model="unknown",model_route="none",'
        'path="/v1/chat/completions",status_code="404",upstream_model="none"} 1.0'
    ) in text
    assert any(
        line.startswith("kthena_router_tokens_total{") and 'upstream_model="org/m"' in line
        for line in text
    )
    assert any(
        line.startswith("kthena_router_request_duration_seconds_count{")
        and 'backend_type="model_server"' in line
        for line in text
    )
    assert (
        'kthena_router_active_upstream_requests{backend_name="default/base",'
        'backend_type="model_server",model_route="default/m",model_server="default/base",'
        'upstream_model="org/m"} 0.0'
    ) in text


def test_the_specs_label_sets_by_default(admin: AdminHarness) -> None:
    text = admin.get("/metrics").body.decode()
    assert REQUESTS_LINE in text.splitlines()
    assert "backend_type" not in text


@pytest.mark.parametrize(
    "accept",
    [
        "application/openmetrics-text; version=1.0.0; charset=utf-8",
        "application/openmetrics-text",
        PROMETHEUS_ACCEPT,
    ],
)
def test_openmetrics_when_the_scraper_asks(admin: AdminHarness, accept: str) -> None:
    response = admin.get("/metrics", headers=[("Accept", accept)])
    assert response.status == 200
    content_type = response.header("content-type")
    assert content_type is not None
    assert content_type.startswith("application/openmetrics-text; version=1.0.0")
    text = response.body.decode()
    assert text.endswith("# EOF\n")
    assert "# TYPE kthena_router_requests counter" in text  # OpenMetrics names the family
    assert REQUESTS_LINE in text.splitlines()
    assert "# TYPE kthena_pd_group_routing_decisions unknown" in text


def test_plain_text_when_asked(admin: AdminHarness) -> None:
    response = admin.get("/metrics", headers=[("Accept", "text/plain")])
    assert response.header("content-type") == TEXT_0_0_4


def test_gzip_when_accepted(admin: AdminHarness) -> None:
    response = admin.get("/metrics", headers=[("Accept-Encoding", "gzip, deflate")])
    assert response.header("content-encoding") == "gzip"
    assert REQUESTS_LINE in gzip.decompress(response.body).decode().splitlines()


def test_families_chosen_by_name(admin: AdminHarness) -> None:
    response = admin.get("/metrics?name[]=kthena_router_requests_total")
    lines = [x for x in response.body.decode().splitlines() if not x.startswith("#")]
    assert lines
    assert all(x.startswith("kthena_router_requests_total{") for x in lines)


def test_scrapes_come_from_anywhere() -> None:
    admin = AdminHarness()
    assert admin.get("/metrics", peer=REMOTE_PEER).status == 200
    assert admin.get("/debug/router/state", peer=REMOTE_PEER).status == 403


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE"])
def test_metrics_are_read_only(admin: AdminHarness, method: str) -> None:
    response = admin.get("/metrics", method=method)
    assert response.status == 405
    assert response.header("allow") == "GET, HEAD"
    assert response.header("content-type") == "application/json"


def test_head(admin: AdminHarness) -> None:
    response = admin.get("/metrics", method="HEAD")
    assert response.status == 200
    assert response.header("content-type") == TEXT_0_0_4
    assert response.body == b""


def test_configured_path() -> None:
    admin = AdminHarness(observability={"metrics": {"path": "/custom/prom"}})
    assert admin.get("/custom/prom").status == 200
    assert admin.json("/metrics", status=404) == {"error": "nothing at /metrics"}
    assert admin.json("/custom", status=404)["error"] == "nothing at /custom"
    assert admin.json("/")["endpoints"] == ["/custom/prom", "/debug/"]


def test_metrics_disabled() -> None:
    admin = AdminHarness(observability={"metrics": {"enabled": False}})
    assert admin.get("/metrics").status == 404
    assert admin.get("/debug/router/state").status == 200  # debug keeps the port
    nothing = AdminHarness(
        observability={"metrics": {"enabled": False}, "debug": {"enabled": False}}
    )
    assert nothing.service.admin.listeners == []
    assert nothing.sites == {}


def plans(**raw: Any) -> list[AdminListenerPlan]:
    return plan_listeners(parse_config(raw, "r.yaml", Path("."), []))


def test_listener_plans() -> None:
    assert plans() == [AdminListenerPlan("admin", "tcp:9090", metrics=True, debug=True)]
    assert plans(observability={"metrics": {"port": 9100}, "debug": {"port": 9101}}) == [
        AdminListenerPlan("admin", "tcp:9100", metrics=True, debug=False),
        AdminListenerPlan("debug", "tcp:9101", metrics=False, debug=True),
    ]
    assert plans(
        adminListen="tcp:0:interface=127.0.0.1",
        debugListen="tcp:0:interface=127.0.0.2",
        observability={"debug": {"port": 9091}},
    ) == [
        AdminListenerPlan("admin", "tcp:0:interface=127.0.0.1", metrics=True, debug=False),
        AdminListenerPlan("debug", "tcp:0:interface=127.0.0.2", metrics=False, debug=True),
    ]
    assert plans(observability={"metrics": {"enabled": False}, "debug": {"port": 9091}}) == [
        AdminListenerPlan("debug", "tcp:9091", metrics=False, debug=True)
    ]
    assert plans(observability={"debug": {"enabled": False}}) == [
        AdminListenerPlan("admin", "tcp:9090", metrics=True, debug=False)
    ]
    assert plans(observability={"metrics": {"enabled": False}, "debug": {"enabled": False}}) == []


# -- in slices on the reactor thread


class HeldSteps:
    """A runner that keeps each render's steps until the test takes them."""

    def __init__(self) -> None:
        self.held: list[tuple[Iterator[None], Deferred[Iterator[None]]]] = []

    def __call__(self, steps: Iterator[None]) -> Deferred[Iterator[None]]:
        d: Deferred[Iterator[None]] = Deferred()
        self.held.append((steps, d))
        return d

    def release(self) -> None:
        steps, d = self.held.pop(0)
        deque(steps, maxlen=0)
        d.callback(steps)


class Spy(Collector):
    """Counts its collections."""

    def __init__(self) -> None:
        self.collected = 0

    def collect(self) -> Iterator[Metric]:
        self.collected += 1
        yield GaugeMetricFamily("spy", "collected last", value=1)


def test_a_scrape_waits_for_its_render_and_extra_scrapes_are_refused() -> None:
    runner = HeldSteps()
    admin = AdminHarness(runner=runner)
    one_request(admin)
    resource = admin.service.admin.metrics_resource
    clients = [admin.connect() for _ in range(MAX_WAITING_SCRAPES)]
    for client in clients:
        client.request("GET", "/metrics")
    assert all(c.response is None for c in clients)  # nothing answered before the steps
    assert len(runner.held) == 1  # one render at a time; the rest wait their turn
    assert resource.waiting == MAX_WAITING_SCRAPES
    refused = admin.get("/metrics")
    assert refused.status == 503
    assert refused.header("retry-after") == "1"
    assert refused.header("content-type") == "application/json"
    for i in range(MAX_WAITING_SCRAPES):
        runner.release()
        assert clients[i].got().status == 200
        assert REQUESTS_LINE in clients[i].got().body.decode().splitlines()
    assert resource.waiting == 0
    assert runner.held == []


def test_a_scraper_that_hangs_up_before_its_turn_is_let_go() -> None:
    runner = HeldSteps()
    admin = AdminHarness(runner=runner)
    spy = Spy()
    admin.service.registry.register(spy)
    client = admin.connect()
    client.request("GET", "/metrics")
    client.disconnect()
    runner.release()
    assert spy.collected == 0  # not rendered for nobody
    assert client.transport.value() == b""
    assert admin.service.admin.metrics_resource.waiting == 0


def sliced_admin() -> AdminHarness:
    """Renders a step a slice (a slice of 0 s), a slice each L{SLICE_PAUSE} of the clock."""
    admin = AdminHarness()
    admin.service.admin.metrics_resource.runner = sliced(admin.clock, slice_seconds=0.0)
    return admin


def test_renders_yield_to_the_reactor_between_slices() -> None:
    admin = sliced_admin()
    scraper = admin.connect()
    scraper.request("GET", "/metrics")
    slices = 0
    while scraper.response is None:
        if slices == 3:
            one_request(admin)  # served between two slices
        admin.clock.advance(SLICE_PAUSE)
        slices += 1
    assert slices > 10
    assert scraper.got().status == 200
    assert "# TYPE kthena_router_requests_total counter" in scraper.got().body.decode()


def test_a_scraper_that_hangs_up_mid_render_stops_it() -> None:
    admin = sliced_admin()
    spy = Spy()
    admin.service.registry.register(spy)  # collected last
    scraper = admin.connect()
    scraper.request("GET", "/metrics")
    admin.clock.advance(SLICE_PAUSE)
    admin.clock.advance(SLICE_PAUSE)
    scraper.disconnect()
    admin.clock.advance(SLICE_PAUSE)  # one more slice: it sees the scraper gone and stops
    assert all(c.getTime() > admin.clock.seconds() for c in admin.clock.getDelayedCalls())
    assert spy.collected == 0
    assert scraper.transport.value() == b""
    assert admin.service.admin.metrics_resource.waiting == 0


class Broken(Collector):
    def collect(self) -> Iterator[Metric]:
        raise RuntimeError("collector broke")


def test_a_failed_render_is_a_500() -> None:
    admin = AdminHarness()
    admin.service.registry.register(Broken())
    response = admin.get("/metrics")
    assert response.status == 500
    assert response.json() == {"error": "rendering metrics failed"}


def test_a_failed_slice_is_a_500() -> None:
    admin = sliced_admin()
    admin.service.registry.register(Broken())
    scraper = admin.connect()
    scraper.request("GET", "/metrics")
    while scraper.response is None:
        admin.clock.advance(SLICE_PAUSE)
    assert scraper.got().status == 500
    assert admin.service.admin.metrics_resource.waiting == 0


@implementer(IReactorThreads)
class ThreadedClock(MemoryReactorClock):
    """A clock with the threads every real reactor has (none of them used)."""

    def getThreadPool(self) -> Any:
        raise AssertionError("not used")

    def callInThread(self, callable: Callable[..., object], *args: object, **kw: object) -> None:
        raise AssertionError("not used")

    def callFromThread(self, callable: Callable[..., object], *args: object, **kw: object) -> None:
        raise AssertionError("not used")

    def suggestThreadPoolSize(self, size: int) -> None:
        raise AssertionError("not used")


def test_real_reactors_render_in_slices_test_clocks_at_once() -> None:
    taken: list[int] = []

    def steps() -> Iterator[None]:
        for i in range(3):
            taken.append(i)
            yield None

    assert runner_for(MemoryReactorClock()) is at_once
    clock = ThreadedClock()
    done: list[object] = []
    runner_for(clock)(steps()).addCallback(done.append)
    clock.advance(SLICE_PAUSE * 0.99)
    assert taken == []  # slices start after a pause
    clock.advance(SLICE_PAUSE * 0.01)
    assert taken  # a 0.5 ms slice takes a step or more
    clock.advance(SLICE_PAUSE * 3)
    assert taken == [0, 1, 2]
    assert done


def test_back_to_back_scrapes_are_paced_to_a_share_of_the_cpu(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """After a render that cost C of CPU, the next waits C x 3 (a quarter of the CPU)."""
    runner = HeldSteps()
    admin = AdminHarness(runner=runner)
    resource = admin.service.admin.metrics_resource
    resource.max_share = 0.25

    def render_costing(seconds: float) -> None:
        cpu = itertools.chain([0.0], itertools.repeat(seconds))  # the first step costs it all
        monkeypatch.setattr(render_module, "thread_time", lambda: next(cpu))
        runner.release()

    first = admin.connect()
    first.request("GET", "/metrics")
    render_costing(0.1)
    assert first.got().status == 200
    second = admin.connect()
    second.request("GET", "/metrics")
    assert runner.held == []  # not yet: 0.3 s of pause first
    admin.clock.advance(0.29)
    assert runner.held == []
    admin.clock.advance(0.02)
    assert len(runner.held) == 1
    render_costing(0.001)  # cheap: the next one may start at once
    assert second.got().status == 200
    third = admin.connect()
    third.request("GET", "/metrics")
    assert len(runner.held) == 1
    render_costing(0.0)
    assert third.got().status == 200
    assert resource.renders == 3
