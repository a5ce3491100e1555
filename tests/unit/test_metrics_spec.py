"""
The specification's metric list is the contract: every family it names is exposed with
that name, type, label names and buckets, by one router's own registry.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import Metric
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.task import Clock

from kthena.errors import ErrorType
from kthena.observability.metrics import RouterMetrics

ROOT = Path(__file__).resolve().parents[2]
SPEC = ROOT / "docs" / "spec" / "router-observability.md"
SHARED_SPEC = ROOT.parent / "shared" / "spec" / "router-observability.md"

_LINE = re.compile(r"^(kthena_[a-z_]+)\{([^}]*)\}\s*$")
_BUCKETS = re.compile(r"^# Buckets: \[([^\]]*)\]")


@dataclass(frozen=True)
class SpecFamily:
    name: str  # as written in the spec (counters with _total)
    labels: tuple[str, ...]
    buckets: tuple[float, ...] | None

    @property
    def type(self) -> str:
        if self.name == "kthena_pd_group_routing_decisions":
            return "unknown"  # a count without _total: exposed untyped, name kept
        if self.name.endswith("_total"):
            return "counter"
        if self.buckets is not None:
            return "histogram"
        if "quantile" in self.labels:
            return "summary"
        return "gauge"

    @property
    def family(self) -> str:
        """The family name a parser reports (counters lose _total)."""
        return self.name.removesuffix("_total") if self.type == "counter" else self.name

    @property
    def label_names(self) -> tuple[str, ...]:
        return tuple(label for label in self.labels if label != "quantile")


def spec_families() -> list[SpecFamily]:
    lines = SPEC.read_text().splitlines()
    families: list[SpecFamily] = []
    for number, line in enumerate(lines):
        match = _LINE.match(line.strip())
        if not match:
            continue
        labels = tuple(part.split("=")[0] for part in match.group(2).split(",") if part)
        buckets = None
        following = lines[number + 1].strip() if number + 1 < len(lines) else ""
        bucket_match = _BUCKETS.match(following)
        if bucket_match:
            buckets = tuple(float(b) for b in bucket_match.group(1).split(","))
        families.append(SpecFamily(match.group(1), labels, buckets))
    return families


SPEC_FAMILIES = spec_families()


def test_the_vendored_spec_is_the_shared_one() -> None:
    """docs/spec is a copy for checkouts without ../shared; it must not drift."""
    if SHARED_SPEC.exists():
        assert SPEC.read_text() == SHARED_SPEC.read_text()
    assert len(SPEC_FAMILIES) == 24


def exposition(metrics: RouterMetrics) -> dict[str, Metric]:
    """Give every family one series (with the spec's label names), then parse /metrics."""
    for family in SPEC_FAMILIES:
        values = {name: "x" for name in family.label_names}
        collector = _collector(metrics, family)
        if family.type == "summary":
            collector.observe(0.01, *values.values())
        else:
            child = collector.labels(**values)  # fails when the label names differ
            if family.type == "histogram":
                child.observe(0.01)
            else:
                child.inc()  # counters, gauges and the untyped count
    text = generate_latest(metrics.registry).decode()
    return {f.name: f for f in text_string_to_metric_families(text)}


def _collector(metrics: RouterMetrics, family: SpecFamily) -> Any:
    for value in [
        *vars(metrics).values(),
        *vars(metrics.pods).values(),
        *vars(metrics.pd).values(),
    ]:
        name = getattr(value, "_name", None) or getattr(value, "name", None)
        if name == family.family:
            return value
    pytest.fail(f"RouterMetrics has no collector for {family.name}")


@pytest.mark.parametrize("family", SPEC_FAMILIES, ids=[f.name for f in SPEC_FAMILIES])
def test_spec_family_exposed_exactly(family: SpecFamily) -> None:
    metrics = RouterMetrics(CollectorRegistry(), Clock())
    exposed = exposition(metrics)
    assert family.family in exposed, sorted(exposed)
    metric = exposed[family.family]
    assert metric.type == family.type
    samples = metric.samples
    assert samples
    sample_names = {s.name for s in samples}
    if family.type == "counter":
        assert family.name in sample_names  # the _total name, exactly as the spec writes it
    elif family.type in ("gauge", "unknown"):
        assert sample_names == {family.name}
    for sample in samples:
        extra = {"le"} if sample.name.endswith("_bucket") else set()
        if family.type == "summary" and sample.name == family.name:
            extra = {"quantile"}
        assert set(sample.labels) == set(family.label_names) | extra
    if family.buckets is not None:
        bounds = sorted(float(s.labels["le"]) for s in samples if s.name.endswith("_bucket"))
        assert bounds == [*sorted(family.buckets), math.inf]
    if family.type == "summary":
        quantiles = {s.labels["quantile"] for s in samples if "quantile" in s.labels}
        assert quantiles == {"0.5", "0.9", "0.99"}


def test_untyped_decisions_keep_the_spec_name_in_openmetrics_too() -> None:
    metrics = RouterMetrics(CollectorRegistry(), Clock())
    metrics.pd.pd_routing_decisions.labels("g", "decode", "prefill").inc(2)
    text = generate_openmetrics(metrics.registry).decode()
    assert (
        'kthena_pd_group_routing_decisions{group_key="g",source_role="decode",'
        'target_role="prefill"} 2.0' in text
    )


def test_summary_quantiles_over_the_window() -> None:
    clock = Clock()
    metrics = RouterMetrics(CollectorRegistry(), clock)
    for value in range(1, 101):
        metrics.pd.kv_cache_latency.observe(value / 1000, "nixl", "transfer")
    clock.advance(30)
    metrics.pd.kv_cache_latency.observe(0.5, "nixl", "transfer")
    family = exposition_of(metrics)["kthena_kv_cache_latency_seconds"]
    by_name = {(s.name, s.labels.get("quantile")): s.value for s in family.samples}
    assert by_name[("kthena_kv_cache_latency_seconds_count", None)] == 101
    assert by_name[("kthena_kv_cache_latency_seconds", "0.5")] == pytest.approx(0.051)
    assert by_name[("kthena_kv_cache_latency_seconds", "0.99")] == pytest.approx(0.1)
    clock.advance(31)  # the first hundred leave the window; count and sum stay
    family = exposition_of(metrics)["kthena_kv_cache_latency_seconds"]
    by_name = {(s.name, s.labels.get("quantile")): s.value for s in family.samples}
    assert by_name[("kthena_kv_cache_latency_seconds", "0.5")] == pytest.approx(0.5)
    assert by_name[("kthena_kv_cache_latency_seconds_count", None)] == 101


def exposition_of(metrics: RouterMetrics) -> dict[str, Metric]:
    text = generate_latest(metrics.registry).decode()
    return {f.name: f for f in text_string_to_metric_families(text)}


def test_two_routers_do_not_collide() -> None:
    first = RouterMetrics(CollectorRegistry(), Clock())
    second = RouterMetrics(CollectorRegistry(), Clock())
    first.requests.labels("m", "/v1/completions", "200", "successful_request").inc()
    assert "kthena_router_requests_total{" not in generate_latest(second.registry).decode()


def test_docs_metrics_lists_every_error_type() -> None:
    """docs/metrics.md's table of error_type values is the closed list, all of it."""
    doc = (Path(__file__).parents[2] / "docs" / "metrics.md").read_text()
    listed = set(re.findall(r"^\| `([a-z_]+)` \|", doc, re.MULTILINE))
    assert {e.value for e in ErrorType} <= listed
