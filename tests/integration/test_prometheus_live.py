"""
The monitoring assets on a real Prometheus scraping a real router (system test).

A `twistd kthena-router` process runs simulated pods in its own process (the config's
`simulators:`) plus one `twistd kthena-sim` process with GPUs (DCGM gauges; embedded
simulators have none), all on this file's loopback addresses 127.0.70.x; a `prometheus`
process scrapes the router's admin port every second with monitoring/alerts.yml loaded,
configured from monitoring/prometheus-baremetal.yml. A scripted load, bounded in time,
provokes what the alerts are about: 5xx answers (a pod failing every request), 429s (a
route's request limit), fairness-queue timeouts, prefill/decode requests with failing
prefill legs, and a model server whose only pod has nothing listening (its scrapes fail,
so the server has no healthy pod).

Then, through Prometheus' HTTP API:
- the alerts the scenario provokes fire with the labels of their cause; the others were
  never even pending;
- every expression of alerts.yml and of every dashboard panel (template variables
  substituted as Grafana would) parses, and returns data over the scenario;
- every panel's data is drawn into PNGs (one per dashboard row) under
  $KTHENA_TEST_ARTIFACTS or test-artifacts/dashboard/, for a person to look at.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.integration.conftest import start_sim, stop_process
from tests.integration.router_helpers import (
    ADMIN_LISTEN,
    LISTEN,
    LOOPBACK,
    RouterProcess,
    bound_port,
    chat_body,
    completion_body,
    free_port,
    http_request,
    start_router,
)
from tests.integration.test_redis_buckets import RedisServer
from tests.unit.routerfixtures import Doc, pd_server, pod, server, simple_route
from tests.unit.test_monitoring_assets import (
    ALERTS,
    MONITORING,
    PanelTarget,
    alert_rules,
    dashboard,
    label_values,
    panel_targets,
    split_threshold,
    variable_query,
    variables,
)

ROOT = Path(__file__).resolve().parents[2]
MODEL = "org/sim"
CHAT = "/v1/chat/completions"
HOST = {
    "chat-0": "127.0.70.1",
    "chat-1": "127.0.70.2",
    "flaky-0": "127.0.70.3",
    "fair-0": "127.0.70.4",
    "pd-prefill-0": "127.0.70.5",
    "pd-decode-0": "127.0.70.6",
    "gpu-0": "127.0.70.7",
    "dead-0": "127.0.70.8",  # nothing listens there
}
SIM_PORT = 8000
"""Every simulator on port 8000 of an address of its own (this file's 127.0.70.x)."""
COMMON_SIM_ARGS = ("--model", MODEL, "--output-tokens", "8")
SIM_PROCESSES = {
    "gpu-0": ("--gpus", "2", "--max-num-seqs", "4", "--itl", "0.02"),
    "pd-prefill-0": ("--itl", "0.002", "--role", "prefill", "--error-rate", "0.25", "--seed", "1"),
}
"""
The simulators run as processes of their own, for what the router's embedded ones cannot
be given: GPUs (DCGM gauges; a slow pod with few sequences, so that its GPUs look busy),
and a seeded failure rate: the prefill pod fails a quarter of its legs, the same ones in
every run (its legs come one at a time from one client thread). Seed 1's first 3000
draws never fail 5 in a row, and see the outlier detection setting in L{router_config}:
an ejected prefill pod (the group's only one) would have the server refuse every request.
"""

FIRING = {
    "HighRouterErrorRate": {"model": "flaky"},
    "RateLimitExceeded": {"model": "limited", "limit_type": "requests"},
    "ModelServerNoReadyPods": {"model_server": "default/dead"},
    "HighUpstreamErrorRatio": {"model_server": "default/flaky"},
    "PodScrapeFailing": {"target": "default/dead-0"},
    "FairnessQueueTimeouts": {"model": "fair"},
    "HighPDFailureRatio": {"connector_type": "nixl"},
}
"""The alerts the scenario provokes, each with labels of one alert it must fire."""
NOT_FOR = {
    "HighRouterErrorRate": {"model": "chat"},
    "ModelServerNoReadyPods": {"model_server": "default/chat"},
    "PodScrapeFailing": {"target": "default/chat-0"},
    "HighUpstreamErrorRatio": {"model_server": "default/chat"},
}
"""Firing alerts that must not fire for the healthy part of the scenario."""
SILENT = {
    "HighRequestLatency": "every request ends well under 5 s",
    "HighTokenProcessingRate": "a few hundred tokens/s, far from 10000/s",
    "AccessLogLinesDropped": "the access log (a file) keeps up",
    "RateLimitBackendErrors": "the Redis of the shared limit answers every call",
}
REDIS_PORTS = range(16400, 16410)
"""The shared (Redis-global) limit's redis-server: ports no other test uses."""

FOR = "3s"
SUBSTITUTIONS = {
    "model": ".*",
    "route": ".*",
    "__rate_interval": "5s",
    "__range": "5m",
    "__interval": "2s",
}
"""Grafana's values of the template variables: All (.*) for the model and route, and
the windows Grafana would use on a data source scraped every second showing the last 5
minutes ($__rate_interval is at least 4 scrape intervals)."""
MIN_LOAD = 15.0
MAX_LOAD = 45.0
"""The load runs at least MIN_LOAD s, then until every provoked alert fires (at most
MAX_LOAD s): the 5m windows of the rules see enough of it either way."""


# -- the processes


def router_config(workdir: Path, redis_port: int) -> dict[str, Any]:
    """The router, its embedded simulators and the scenario's routes, servers and pods."""

    def sim(name: str, **extra: Any) -> dict[str, Any]:
        listen = f"tcp:{SIM_PORT}:interface={HOST[name]}"
        return {"engine": "vllm", "model": MODEL, "listen": listen, "itl": 0.002, **extra}

    def one_pod(name: str, app: str, **labels: str) -> Doc:
        return pod(name, HOST[name], {"app": app, **labels})

    resources: list[Doc] = [
        simple_route("chat", "chat", "chat"),
        simple_route(
            "limited", "limited", "chat", rateLimit={"requestsPerUnit": 3, "unit": "minute"}
        ),
        simple_route(
            "shared",
            "shared",
            "chat",
            rateLimit={
                "requestsPerUnit": 100_000,
                "unit": "minute",
                "global": {"redis": {"address": f"{LOOPBACK}:{redis_port}"}},
            },
        ),
        simple_route("flaky", "flaky", "flaky"),
        simple_route("fair", "fair", "fair"),
        simple_route("gpu", "gpu", "gpu"),
        simple_route("pd", "pd", "pd"),
        simple_route("dead", "dead", "dead"),
        server("chat", {"app": "chat"}, MODEL),
        server("flaky", {"app": "flaky"}, MODEL),
        server("fair", {"app": "fair"}, MODEL),
        server("gpu", {"app": "gpu"}, MODEL),
        server("dead", {"app": "dead"}, MODEL),
        pd_server(
            "pd",
            "pd",
            MODEL,
            kvConnector={"type": "nixl", "blockSize": 16, "bytesPerToken": 12288},
            trafficPolicy={"retry": {"attempts": 2, "retryInterval": "10ms"}},
        ),
        one_pod("chat-0", "chat"),
        one_pod("chat-1", "chat"),
        one_pod("flaky-0", "flaky"),
        one_pod("fair-0", "fair"),
        one_pod("gpu-0", "gpu"),
        one_pod("dead-0", "dead"),
        one_pod("pd-prefill-0", "pd", role="prefill", group="g1"),
        one_pod("pd-decode-0", "pd", role="decode", group="g1"),
    ]
    return {
        "listen": LISTEN,
        "adminListen": ADMIN_LISTEN,
        "drainTimeout": "1s",
        "reloadInterval": "0s",
        "observability": {"accessLog": {"output": str(workdir / "access.log")}},
        "fairness": {"models": [{"model": "fair", "maxConcurrency": 1, "timeout": "300ms"}]},
        # The shared limit's Redis answers every call, but on a loaded 2-core VM not always
        # within the default 50 ms: RateLimitBackendErrors is to stay silent here.
        "rateLimits": {"redisTimeout": "1s"},
        "simulators": [
            sim("chat-0", outputTokens=8),
            sim("chat-1", outputTokens=8),
            sim("flaky-0", outputTokens=8),
            sim("fair-0", outputTokens=12, itl=0.05),
            sim("pd-decode-0", outputTokens=8, role="decode"),
        ],
        "resources": resources,
    }


def fast_rules(path: Path) -> None:
    """
    alerts.yml with every `for:` at L{FOR}. The shipped durations (1 to 5 minutes) keep a
    blip from paging anyone; a test cannot wait that long, and `for` only delays an
    alert whose expression already holds. Everything else, the expressions above all, is
    the file as shipped.
    """
    rules = yaml.safe_load(ALERTS.read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            assert "for" in rule
            rule["for"] = FOR
    path.write_text(yaml.safe_dump(rules, sort_keys=False))


def prometheus_config(path: Path, admin_port: int) -> None:
    """monitoring/prometheus-baremetal.yml, its targets pointed at this scenario's router
    and pods, scraping and evaluating every second, with the fast copy of the rules."""
    config = yaml.safe_load((MONITORING / "prometheus-baremetal.yml").read_text())
    config["global"] = {
        "scrape_interval": "1s",
        "scrape_timeout": "1s",
        "evaluation_interval": "1s",
    }
    config["rule_files"] = ["alerts.yml"]
    router_job, servers_job = config["scrape_configs"]
    router_job["static_configs"][0]["targets"] = [f"{LOOPBACK}:{admin_port}"]
    servers_job["static_configs"] = [
        {"targets": [f"{host}:{SIM_PORT}"], "labels": {"pod": name, "namespace": "default"}}
        for name, host in HOST.items()
        if name != "dead-0"
    ]
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    fast_rules(path.parent / "alerts.yml")


@dataclass
class Prometheus:
    process: subprocess.Popen[bytes]
    port: int
    log_path: Path

    def get(self, path: str, **params: str | float) -> Any:
        query = urllib.parse.urlencode(params)
        url = f"http://{LOOPBACK}:{self.port}{path}" + (f"?{query}" if query else "")
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as e:
            with e:
                return json.loads(e.read())

    def query(self, expr: str, at: float) -> Any:
        """C{/api/v1/query}: the answer, status and all (bad PromQL: status error)."""
        return self.get("/api/v1/query", query=expr, time=at)

    def query_range(self, expr: str, start: float, end: float) -> Any:
        return self.get("/api/v1/query_range", query=expr, start=start, end=end, step=1)

    def alerts(self) -> list[dict[str, Any]]:
        answer = self.get("/api/v1/alerts")
        assert answer["status"] == "success", answer
        alerts: list[dict[str, Any]] = answer["data"]["alerts"]
        return alerts

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def start_prometheus(workdir: Path, admin_port: int) -> Prometheus:
    binary = shutil.which("prometheus")
    assert binary, "prometheus is not installed (Debian: apt-get install prometheus)"
    config = workdir / "prometheus.yml"
    prometheus_config(config, admin_port)
    port = free_port()
    log_path = workdir / "prometheus.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address={LOOPBACK}:{port}",
                "--log.level=warn",
            ],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=workdir,
        )
    running = Prometheus(process, port, log_path)
    deadline = time.monotonic() + 30
    while True:
        if process.poll() is not None:
            pytest.fail(f"prometheus exited with {process.returncode}:\n{running.log()}")
        try:
            with urllib.request.urlopen(f"http://{LOOPBACK}:{port}/-/ready", timeout=1) as r:
                if r.status == 200:
                    return running
        except OSError:
            pass
        if time.monotonic() > deadline:
            stop_process(process)
            pytest.fail(f"prometheus not ready in 30 s:\n{running.log()}")
        time.sleep(0.1)


# -- the load


class Load:
    """
    Clients in threads, each sending one kind of traffic in a loop until L{stop}; every
    answer's (model, status) counted. Blocking clients: the router is another process.
    """

    def __init__(self, router: RouterProcess) -> None:
        self.router = router
        self.stopping = threading.Event()
        self.statuses: Counter[tuple[str, int]] = Counter()
        self.errors: list[BaseException] = []
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=9)
        self._bursts = ThreadPoolExecutor(max_workers=4)

    def send(self, model: str, path: str, body: dict[str, Any]) -> None:
        reply = http_request(self.router.host, self.router.port, "POST", path, body, timeout=15)
        with self._lock:
            self.statuses[(model, reply.status)] += 1

    def loop(self, pause: float, step: Callable[[int], None]) -> None:
        try:
            for i in itertools.count():
                if self.stopping.is_set():
                    return
                step(i)
                time.sleep(pause)
        except BaseException as e:  # reported by the test, not lost in a thread
            self.errors.append(e)

    def start(self) -> None:
        def chat(i: int) -> None:
            prompt = f"tell me about topic {i % 5}: " + "alpha beta gamma delta " * 8
            if i % 3 == 0:
                self.send("chat", "/v1/completions", completion_body("chat", prompt))
            else:
                self.send("chat", CHAT, chat_body("chat", prompt, stream=i % 2 == 0))

        def fair_burst(_: int) -> None:
            # One admitted (maxConcurrency 1, 0.6 s of decode), three queued past 300 ms.
            bursts = [
                self._bursts.submit(self.send, "fair", CHAT, chat_body("fair")) for _ in "abcd"
            ]
            for burst in bursts:
                burst.result()

        def failing(i: int) -> None:
            model = ("dead", "nosuchmodel")[i % 2]
            self.send(model, CHAT, chat_body(model))

        def pd(i: int) -> None:
            text = f"prefill and decode {i % 4}: " + "epsilon zeta eta theta " * 10
            self.send("pd", CHAT, chat_body("pd", text, stream=i % 2 == 1))

        loops: list[tuple[float, Callable[[int], None]]] = [
            (0.02, chat),
            (0.05, chat),
            (0.1, lambda i: self.send("gpu", CHAT, chat_body("gpu", f"gpu {i % 3}"))),
            (0.05, lambda _: self.send("flaky", CHAT, chat_body("flaky"))),
            (0.1, failing),
            (0.2, lambda _: self.send("limited", CHAT, chat_body("limited"))),
            (0.1, lambda _: self.send("shared", CHAT, chat_body("shared"))),
            (0.4, pd),
            (0.1, fair_burst),
        ]
        for pause, step in loops:
            self._pool.submit(self.loop, pause, step)

    def stop(self) -> None:
        self.stopping.set()
        self._pool.shutdown(wait=True)
        self._bursts.shutdown(wait=True)


def put_faults(host: str, faults: dict[str, Any]) -> None:
    reply = http_request(host, SIM_PORT, "PUT", "/sim/faults", faults)
    assert reply.status == 200, reply


# -- expressions


def substitute(expr: str, values: dict[str, str]) -> str:
    def value(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        assert name in values, f"no value for ${name} in {expr}"
        return values[name]

    return re.sub(r"\$\{([a-zA-Z_0-9]+)\}|\$([a-zA-Z_0-9]+)", value, expr)


def grafana_values() -> dict[str, str]:
    found = variables(dashboard())
    return {**SUBSTITUTIONS, "cost_per_1k_tokens": variable_query(found["cost_per_1k_tokens"])}


def legend(template: str, labels: dict[str, str]) -> str:
    text = re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), template)
    return text or ",".join(f"{k}={v}" for k, v in sorted(labels.items())) or "value"


# -- the test


@dataclass
class Scenario:
    router: RouterProcess
    prometheus: Prometheus
    load: Load
    start: float
    end: float
    fired: dict[str, list[dict[str, str]]]


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scenario]:
    """Everything started, the load run until the provoked alerts fire, then stopped;
    the processes stay up for the checks and are stopped at the end of the module."""
    workdir = tmp_path_factory.mktemp("prometheus-live")
    stops: list[Callable[[], None]] = []
    try:
        for name, args in SIM_PROCESSES.items():
            listen = f"tcp:{SIM_PORT}:interface={HOST[name]}"
            sim = start_sim(workdir, *COMMON_SIM_ARGS, *args, "--listen", listen, host=HOST[name])
            stops.append(sim.terminate)
        redis = start_redis(workdir)
        stops.append(redis.kill)
        router = start_router(workdir, router_config(workdir, redis.port))
        stops.append(router.stop)
        put_faults(HOST["flaky-0"], {"error_rate": 1.0})
        prometheus = start_prometheus(workdir, bound_port(router, ADMIN_LISTEN))
        stops.append(lambda: stop_process(prometheus.process))
        load = Load(router)
        start = time.time()
        load.start()
        stops.append(load.stop)
        fired = wait_for_alerts(prometheus, start)
        print(f"load ran {time.time() - start:.1f} s; firing: {sorted(fired)}")
        load.stop()
        assert load.errors == [], load.errors
        time.sleep(2)  # the last scrape and evaluation after the load
        yield Scenario(router, prometheus, load, start, time.time(), fired)
    finally:
        for stop in reversed(stops):
            stop()


def start_redis(workdir: Path) -> RedisServer:
    redis = RedisServer(workdir)
    redis.start(ports=REDIS_PORTS)
    return redis


def wait_for_alerts(prometheus: Prometheus, start: float) -> dict[str, list[dict[str, str]]]:
    """Poll /api/v1/alerts until every provoked alert fires and MIN_LOAD s have passed."""
    while True:
        fired: dict[str, list[dict[str, str]]] = {}
        for alert in prometheus.alerts():
            if alert["state"] == "firing":
                fired.setdefault(alert["labels"]["alertname"], []).append(alert["labels"])
        elapsed = time.time() - start
        if FIRING.keys() <= fired.keys() and elapsed >= MIN_LOAD:
            return fired
        if elapsed > MAX_LOAD:
            return fired  # the test says which did not fire
        time.sleep(1)


def test_the_scenario_did_what_it_meant(scenario: Scenario) -> None:
    """The load got the answers the alerts are about (else a silent alert proves nothing)."""
    statuses = scenario.load.statuses
    assert statuses[("chat", 200)] > 100, statuses
    assert statuses[("gpu", 200)] > 10, statuses
    assert statuses[("limited", 429)] > 10, statuses
    assert statuses[("shared", 200)] > 10, statuses  # checked and settled in Redis
    assert statuses[("flaky", 500)] > 10, statuses
    assert statuses[("dead", 503)] > 10, statuses
    assert statuses[("fair", 504)] > 10, statuses
    assert statuses[("fair", 200)] > 3, statuses
    assert statuses[("pd", 200)] > 10, statuses
    assert statuses[("pd", 500)] > 0, statuses  # every pair failed: both prefill legs
    assert statuses[("nosuchmodel", 404)] > 10, statuses


def test_provoked_alerts_fire_with_the_labels_of_their_cause(scenario: Scenario) -> None:
    assert set(FIRING) | set(SILENT) == {rule["alert"] for rule in alert_rules()}
    for name, labels in FIRING.items():
        alerts = scenario.fired.get(name, [])
        assert any(labels.items() <= alert.items() for alert in alerts), (name, alerts)
    for name, labels in NOT_FOR.items():
        alerts = scenario.fired.get(name, [])
        assert not any(labels.items() <= alert.items() for alert in alerts), (name, alerts)
    firing_now = {a["labels"]["alertname"] for a in scenario.prometheus.alerts()}
    assert firing_now.isdisjoint(SILENT), firing_now


def test_silent_alerts_were_never_pending(scenario: Scenario) -> None:
    """Not a single evaluation of the whole run had them pending or firing."""
    names = "|".join(SILENT)
    answer = scenario.prometheus.query_range(
        f'ALERTS{{alertname=~"{names}"}}', scenario.start, scenario.end
    )
    assert answer["status"] == "success", answer
    assert answer["data"]["result"] == [], answer["data"]["result"]
    answer = scenario.prometheus.query_range("ALERTS", scenario.start, scenario.end)
    assert {series["metric"]["alertname"] for series in answer["data"]["result"]} == set(FIRING)


def test_every_rule_evaluates_without_error(scenario: Scenario) -> None:
    answer = scenario.prometheus.get("/api/v1/rules")
    assert answer["status"] == "success", answer
    rules = [rule for group in answer["data"]["groups"] for rule in group["rules"]]
    assert {rule["name"] for rule in rules} == {rule["alert"] for rule in alert_rules()}
    for rule in rules:
        assert rule["health"] == "ok", rule


@pytest.mark.parametrize("rule", alert_rules(), ids=lambda r: str(r["alert"]))
def test_alert_expression_parses_and_measures_something(
    scenario: Scenario, rule: dict[str, Any]
) -> None:
    """The whole expression parses; its measured side (without the threshold) has data
    (a counter of failures included: the router exposes it at 0 while all is well)."""
    prometheus = scenario.prometheus
    answer = prometheus.query(rule["expr"], scenario.end)
    assert answer["status"] == "success", answer
    lhs, _, _ = split_threshold(rule["expr"])
    answer = prometheus.query_range(lhs, scenario.start, scenario.end)
    assert answer["status"] == "success", answer
    assert answer["data"]["result"], (rule["alert"], lhs)


def _panel_id(target: PanelTarget) -> str:
    return f"{target.panel}: {target.expr[:60]}"


@pytest.mark.parametrize("target", list(panel_targets(dashboard())), ids=_panel_id)
def test_dashboard_query_parses_and_has_data(scenario: Scenario, target: PanelTarget) -> None:
    expr = substitute(target.expr, grafana_values())
    answer = scenario.prometheus.query(expr, scenario.end)
    assert answer["status"] == "success", (target.panel, expr, answer)
    answer = scenario.prometheus.query_range(expr, scenario.start, scenario.end)
    assert answer["status"] == "success", (target.panel, expr, answer)
    assert answer["data"]["result"], (target.panel, expr)


def test_dashboard_variables_list_what_the_router_exposes(scenario: Scenario) -> None:
    """The model variable lists the scenario's models; the route variable's label is
    absent (destinationLabels off, the default), and its All value still matches."""
    found = variables(dashboard())
    values = grafana_values()
    results: dict[str, list[str]] = {}
    for name in ("model", "route"):
        selector, label = label_values(variable_query(found[name]))
        answer = scenario.prometheus.get(
            f"/api/v1/label/{label}/values",
            **{"match[]": substitute(selector, values)},
            start=scenario.start,
            end=scenario.end,
        )
        assert answer["status"] == "success", answer
        results[name] = answer["data"]
    assert {"chat", "flaky", "fair", "limited", "pd", "gpu", "dead"} <= set(results["model"])
    assert results["route"] == []
    assert found["route"]["allValue"] == ".*"


def test_dashboard_rendered_to_png(scenario: Scenario) -> None:
    """One PNG per dashboard row, one plot per panel, from the panels' own queries."""
    folder = Path(os.environ.get("KTHENA_TEST_ARTIFACTS") or ROOT / "test-artifacts" / "dashboard")
    folder.mkdir(parents=True, exist_ok=True)
    rows: dict[str, dict[str, list[PanelTarget]]] = {}
    for target in panel_targets(dashboard()):
        rows.setdefault(target.row, {}).setdefault(target.panel, []).append(target)
    written = []
    for number, (row, panels) in enumerate(rows.items(), 1):
        path = folder / f"{number}-{re.sub(r'[^a-z0-9]+', '-', row.lower()).strip('-')}.png"
        render_row(scenario, row, panels, path)
        written.append(path)
    for path in written:
        assert path.stat().st_size > 10_000, path  # drawn, not an empty canvas


def render_row(
    scenario: Scenario, row: str, panels: dict[str, list[PanelTarget]], path: Path
) -> None:
    """A grid of the row's panels: lines for time series, a heatmap of the buckets, bars
    of the last values for stat, bar gauge and table panels."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    columns = 3
    lines = -(-len(panels) // columns)
    figure = Figure(figsize=(6 * columns, 3.6 * lines), layout="constrained")
    figure.suptitle(f"Kthena Router Observability: {row}", fontsize=14)
    axes = figure.subplots(lines, columns, squeeze=False).flatten()
    values = grafana_values()
    for ax, (title, targets) in zip(axes, panels.items(), strict=False):
        ax.set_title(f"{title} ({targets[0].kind})", fontsize=10)
        ax.tick_params(labelsize=7)
        series: list[tuple[str, list[tuple[float, float]], dict[str, str]]] = []
        for number, target in enumerate(targets):
            expr = substitute(target.expr, values)
            answer = scenario.prometheus.query_range(expr, scenario.start, scenario.end)
            for result in answer["data"]["result"][:12]:
                name = legend(target.legend, result["metric"])
                if len(targets) > 1 and target.kind == "table":
                    name = f"{chr(ord('A') + number)}: {name}"
                points = [(float(t) - scenario.start, float(v)) for t, v in result["values"]]
                series.append((name, points, result["metric"]))
        if targets[0].kind == "heatmap":
            draw_heatmap(ax, series)
        elif targets[0].kind in ("stat", "bargauge", "table"):
            draw_bars(ax, series)
        else:
            draw_lines(ax, series)
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    figure.savefig(path, dpi=80)


Series = list[tuple[str, list[tuple[float, float]], dict[str, str]]]


def draw_lines(ax: Any, series: Series) -> None:
    for name, points, _ in series:
        xs, ys = zip(*points, strict=True)
        ax.plot(xs, ys, linewidth=1, label=name)
    ax.set_xlabel("seconds into the scenario", fontsize=7)
    if series:
        ax.legend(fontsize=6, loc="upper left")


def draw_bars(ax: Any, series: Series) -> None:
    names = [name for name, _, _ in series]
    last = [points[-1][1] for _, points, _ in series]
    ax.barh(range(len(names)), last)
    ax.set_yticks(range(len(names)), names, fontsize=6)
    ax.invert_yaxis()
    ax.set_xlabel("last value", fontsize=7)


def draw_heatmap(ax: Any, series: Series) -> None:
    """Cumulative `le` buckets made per-bucket counts, one row per bucket over time."""
    by_le = sorted(series, key=lambda s: float(s[2]["le"]))
    times = sorted({t for _, points, _ in by_le for t, _ in points})
    cumulative = [[dict(points).get(t, 0.0) for t in times] for _, points, _ in by_le]
    counts = [
        [high - low for high, low in zip(row, below, strict=True)]
        for row, below in zip(cumulative, [[0.0] * len(times), *cumulative[:-1]], strict=True)
    ]
    image = ax.imshow(
        counts,
        aspect="auto",
        origin="lower",
        cmap="Oranges",
        extent=(times[0], times[-1], -0.5, len(by_le) - 0.5),
    )
    ax.set_yticks(range(len(by_le)), [s[2]["le"] for s in by_le], fontsize=6)
    ax.set_ylabel("le (s)", fontsize=7)
    ax.set_xlabel("seconds into the scenario", fontsize=7)
    ax.figure.colorbar(image, ax=ax)
