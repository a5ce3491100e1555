"""
The sliced render writes what prometheus_client's C{generate_latest} functions write, byte
for byte, in every format a scraper may ask for: over the router's own registry (every
family of the spec, many series each) and over a registry of everything else the
exposition formats have (escaping, UTF-8 names, units, timestamps, exemplars, info and
state sets, NaN and infinities); and its steps stay small.
"""

from __future__ import annotations

import gzip
import math
from collections import deque
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry, Counter, Enum, Gauge, Histogram, Info, Summary
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeHistogramMetricFamily,
    GaugeMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector
from twisted.internet.task import Clock

from kthena.observability.families import FastFamily, FastHistogram
from kthena.observability.metrics import RouterMetrics
from kthena.observability.render import PART_SAMPLES, Render
from tests.unit.test_metrics_spec import exposition

ACCEPTS = [
    "",  # Prometheus text 0.0.4
    "text/plain;version=1.0.0;escaping=allow-utf-8",
    "text/plain;version=1.0.0;escaping=dots",
    "application/openmetrics-text",  # underscores
    "application/openmetrics-text;version=1.0.0;escaping=allow-utf-8",
    "application/openmetrics-text;version=1.0.0;escaping=values",
    (
        "application/openmetrics-text;version=1.0.0;escaping=allow-utf-8;q=0.6,"
        "application/openmetrics-text;version=0.0.1;q=0.5,text/plain;version=0.0.4;q=0.3"
    ),
]

TRICKY = ["plain", 'quo"te', "back\\slash", "new\nline", "ünï©ødé", "", "a,b=c}{"]
"""Label values that need escaping (or look as if they did)."""


def rendered(registry: CollectorRegistry, accept: str, encoding: str = "") -> bytes:
    render = Render(registry, accept, encoding)
    deque(render.steps(), maxlen=0)
    return gzip.decompress(render.body) if render.gzipped else render.body


def expected(registry: CollectorRegistry, accept: str) -> bytes:
    encoder, _ = choose_encoder(accept)
    return encoder(registry)


def router_registry() -> CollectorRegistry:
    """The router's families: every one the spec names, then many series of the big ones."""
    metrics = RouterMetrics(CollectorRegistry(), Clock())
    exposition(metrics)
    for i, value in enumerate(TRICKY * 6):
        model = f"{value}-{i}"
        metrics.requests.add((model, "/v1/chat/completions", "200", "successful_request"))
        metrics.request_duration.observe((model, "/v1/chat/completions", "200"), i / 100)
        metrics.plugin_duration.observe((model, "least-request", "score"), 0.0003 * i)
        metrics.rate_limit_exceeded.labels(model, "requests", "/v1/completions").inc()
        metrics.fairness_queue_duration.labels(model, "u").observe(0.02)
    return metrics.registry


@pytest.mark.parametrize("accept", ACCEPTS)
def test_the_routers_registry_as_prometheus_client_writes_it(accept: str) -> None:
    registry = router_registry()
    want = expected(registry, accept)
    assert want.count(b"\n") > 1000  # big families: collected and written in many parts
    assert rendered(registry, accept) == want
    assert rendered(registry, accept, "gzip") == want


class Odd(Collector):
    """Families only a custom collector makes: timestamps, units, gauge histograms."""

    def collect(self) -> Iterator[Metric]:
        stamped = GaugeMetricFamily("stamped", "with a time\\stamp", labels=["k"], unit="seconds")
        stamped.add_metric(["a"], 1.5, timestamp=1700000000.25)
        stamped.add_metric(["b"], -0.0)
        yield stamped
        weird = CounterMetricFamily("weird.name", 'a "UTF-8" name', labels=["lé.bel"])
        weird.add_metric(["x"], 3)
        yield weird
        gauge_histogram = GaugeHistogramMetricFamily(
            "queue_hist", "a gauge histogram", buckets=[("1.0", 2), ("+Inf", 3)], gsum_value=4
        )
        yield gauge_histogram
        yield GaugeMetricFamily("huge", "big and odd values", value=1.5e300)
        yield GaugeMetricFamily("nan", "not a number", value=math.nan)
        yield Metric("empty", "no samples\nat all", "unknown")


def everything_else() -> CollectorRegistry:
    registry = CollectorRegistry()
    counter = Counter("c", "a counter", ["k", "a_b"], registry=registry)
    gauge = Gauge("g", "a gauge\nover two lines", ["k"], registry=registry)
    histogram = Histogram("h", "a histogram", ["k"], buckets=(0.1, 1, 1e7), registry=registry)
    summary = Summary("s", "a summary", ["k"], registry=registry)
    for value in TRICKY:
        counter.labels(value, "z").inc(2)
        gauge.labels(value).set(-math.inf)
        histogram.labels(value).observe(0.5)
        summary.labels(value).observe(1)
    with_exemplar = Counter("ex", "a counter with an exemplar", registry=registry)
    with_exemplar.inc(exemplar={"trace_id": 'a"b'})
    Info("build", "build info", registry=registry).info({"version": "1\\2"})
    Enum("state", "a state set", states=["up", "down"], registry=registry).state("down")
    registry.register(Odd())
    fast = FastFamily("counter", "fast", "a fast family", ("k",))
    fast.add(("x\\y",), 2.0)
    registry.register(fast)
    return registry


@pytest.mark.parametrize("accept", ACCEPTS)
def test_everything_else_as_prometheus_client_writes_it(accept: str) -> None:
    registry = everything_else()
    assert rendered(registry, accept) == expected(registry, accept)


def test_the_target_info_family_comes_first() -> None:
    registry = CollectorRegistry(target_info={"service": "kthena"})
    Gauge("g", "a gauge", registry=registry).set(1)
    for accept in ACCEPTS:
        assert rendered(registry, accept) == expected(registry, accept)


def test_families_chosen_by_name() -> None:
    registry = router_registry()
    names = ["kthena_router_requests_total", "kthena_router_request_duration_seconds_bucket"]
    render = Render(registry, "", "", names)
    deque(render.steps(), maxlen=0)
    assert render.body == expected(registry.restricted_registry(names), "")  # type: ignore[arg-type]


def test_each_step_writes_a_bounded_number_of_samples() -> None:
    """A histogram of 300 series is collected and written a few series at a time."""
    registry = CollectorRegistry()
    histogram = FastHistogram("big", "a big histogram", ("model",), (0.1, 1, 10))
    for i in range(300):
        histogram.observe((f"m{i}",), i / 10)
    registry.register(histogram)
    render = Render(registry, "", "")
    lines = [render.body.count(b"\n")]
    step_lines = []
    for _ in render.steps():
        step_lines.append(sum(chunk.count(b"\n") for chunk in render._chunks) - lines[-1])
        lines.append(lines[-1] + step_lines[-1])
    assert render.body == expected(registry, "")
    assert len(step_lines) > 300 * 6 // PART_SAMPLES
    assert max(step_lines) <= PART_SAMPLES


def test_series_that_come_and_go_during_a_render() -> None:
    """
    A family collected in parts has the series it had when its first part was collected,
    less those removed since, each read with its part.
    """
    registry = CollectorRegistry()
    family = FastFamily("gauge", "moving", "a family that changes", ("k",))
    histogram = FastHistogram("hist", "a histogram that changes", ("k",), (1.0,))
    for i in range(3 * PART_SAMPLES):
        family.set((f"s{i}",), 1.0)
        histogram.observe((f"s{i}",), 0.5)
    registry.register(family)
    registry.register(histogram)
    render = Render(registry, "", "")
    steps = render.steps()
    next(steps)  # the header, with the first part collected
    family.remove("s5")
    family.set(("s6",), 2.0)
    family.set(("late",), 1.0)
    deque(steps, maxlen=0)
    assert render.body.count(b"\n") == expected(registry, "").count(b"\n") - 1  # not late
    text = render.body.decode().splitlines()
    assert not any(line.startswith('moving{k="s5"}') for line in text)
    assert 'moving{k="s6"} 2.0' in text
    assert not any("late" in line for line in text)
    steps = (render := Render(registry, "", "")).steps()
    for _ in range(4):  # into the histogram's first parts
        next(steps)
    histogram.observe((f"s{3 * PART_SAMPLES - 1}",), 2.0)
    deque(steps, maxlen=0)
    assert f'hist_count{{k="s{3 * PART_SAMPLES - 1}"}} 2.0' in render.body.decode()
