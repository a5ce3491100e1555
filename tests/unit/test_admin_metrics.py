"""
GET /metrics on the admin listener, in memory: content negotiation (Prometheus text 0.0.4
and OpenMetrics), gzip, family selection, the configured path, disabled metrics, which
listeners a config asks for, and rendering off the reactor thread (bounded).
"""

from __future__ import annotations

import gzip
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorThreads
from twisted.internet.testing import MemoryReactorClock
from zope.interface import implementer

from kthena.config.router import parse_config
from kthena.config.scheduler import SchedulerConfig
from kthena.observability.admin import (
    MAX_WAITING_SCRAPES,
    AdminListenerPlan,
    Exposition,
    expose,
    plan_listeners,
    thread_runner,
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


# -- off the reactor thread


class HeldRenders:
    """A runner that keeps each render until the test lets it run."""

    def __init__(self) -> None:
        self.held: list[tuple[Callable[[], Exposition], Deferred[Exposition]]] = []

    def __call__(self, render: Callable[[], Exposition]) -> Deferred[Exposition]:
        d: Deferred[Exposition] = Deferred()
        self.held.append((render, d))
        return d

    def release(self) -> None:
        render, d = self.held.pop(0)
        d.callback(render())


def test_a_scrape_waits_for_its_render_and_extra_scrapes_are_refused() -> None:
    runner = HeldRenders()
    admin = AdminHarness(runner=runner)
    one_request(admin)
    resource = admin.service.admin.metrics_resource
    clients = [admin.connect() for _ in range(MAX_WAITING_SCRAPES)]
    for client in clients:
        client.request("GET", "/metrics")
    assert all(c.response is None for c in clients)  # nothing answered on the reactor thread
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


def test_a_scraper_that_hangs_up_is_let_go() -> None:
    runner = HeldRenders()
    admin = AdminHarness(runner=runner)
    client = admin.connect()
    client.request("GET", "/metrics")
    client.disconnect()
    render, d = runner.held.pop(0)
    skipped = render()
    assert skipped.body == b""  # not rendered for nobody
    d.callback(skipped)
    assert client.transport.value() == b""
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


class ThreadSpy(Collector):
    """Records the thread each collection runs in."""

    def __init__(self) -> None:
        self.threads: list[int] = []

    def collect(self) -> Iterator[Metric]:
        self.threads.append(threading.get_ident())
        yield GaugeMetricFamily("spy", "which thread renders", value=1)


class FakePool:
    """C{callInThreadWithCallback} on a real thread, joined before the result is given."""

    def callInThreadWithCallback(
        self, on_result: Callable[[bool, object], None], f: Callable[[], object]
    ) -> None:
        box: list[object] = []
        worker = threading.Thread(target=lambda: box.append(f()))
        worker.start()
        worker.join()
        on_result(True, box[0])


@implementer(IReactorThreads)
class ThreadedClock(MemoryReactorClock):
    def __init__(self) -> None:
        super().__init__()
        self.pool = FakePool()

    def getThreadPool(self) -> Any:
        return self.pool

    def callInThread(self, callable: Callable[..., object], *args: object, **kw: object) -> None:
        raise AssertionError("not used")

    def callFromThread(self, callable: Callable[..., object], *args: object, **kw: object) -> None:
        callable(*args, **kw)

    def suggestThreadPoolSize(self, size: int) -> None:
        pass


def test_renders_go_to_the_reactor_thread_pool() -> None:
    registry = CollectorRegistry()
    spy = ThreadSpy()
    registry.register(spy)
    results: list[Exposition] = []
    thread_runner(ThreadedClock())(lambda: expose(registry, "", "")).addCallback(results.append)
    (exposition,) = results
    assert b"spy 1.0" in exposition.body
    assert (exposition.content_type, exposition.gzipped) == (TEXT_0_0_4, False)
    assert exposition.cpu_seconds > 0
    assert spy.threads
    assert threading.get_ident() not in spy.threads


def test_reactors_without_threads_render_in_place() -> None:
    registry = CollectorRegistry()
    spy = ThreadSpy()
    registry.register(spy)
    results: list[Exposition] = []
    thread_runner(MemoryReactorClock())(lambda: expose(registry, "", "gzip")).addCallback(
        results.append
    )
    (exposition,) = results
    assert exposition.gzipped
    assert b"spy 1.0" in gzip.decompress(exposition.body)
    assert spy.threads == [threading.get_ident()]


def test_back_to_back_scrapes_are_paced_to_a_share_of_the_cpu() -> None:
    """After a render that cost C of CPU, the next waits C x 3 (a quarter of the CPU)."""
    costly = HeldRenders()
    admin = AdminHarness(runner=costly)
    resource = admin.service.admin.metrics_resource
    resource.max_share = 0.25

    def render_costing(seconds: float) -> None:
        render, d = costly.held.pop(0)
        done = render()
        d.callback(Exposition(done.body, done.content_type, done.gzipped, seconds))

    first = admin.connect()
    first.request("GET", "/metrics")
    render_costing(0.1)
    assert first.got().status == 200
    second = admin.connect()
    second.request("GET", "/metrics")
    assert costly.held == []  # not yet: 0.3 s of pause first
    admin.clock.advance(0.29)
    assert costly.held == []
    admin.clock.advance(0.02)
    assert len(costly.held) == 1
    render_costing(0.001)  # cheap: the next one may start at once
    assert second.got().status == 200
    third = admin.connect()
    third.request("GET", "/metrics")
    assert len(costly.held) == 1
    render_costing(0.0)
    assert third.got().status == 200
    assert resource.renders == 3
