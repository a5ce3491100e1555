"""
One exposition out of every worker's: what C{/metrics} shows under C{--workers}.

Each worker renders its registry (Prometheus text 0.0.4); the parent merges the texts
line by line, family by family:

  - counters, histograms (buckets, C{_sum}, C{_count}), summaries and untyped families
    are summed across workers, series by series;
  - C{_created} series keep the earliest value;
  - gauges that count something in a worker (active requests, queued requests, pooled
    connections, prefix-cache entries) are summed;
  - gauges that mirror the pods (L{MIRRORED}: every worker scrapes the same pods) show
    the first worker's view, as one router would.

A series present in some workers only is shown once with their sum. Families and series
keep the order of the first worker that has them.

Totals never go backwards: a worker that ends (a restart, a crash) leaves the monotonic
series it last reported in a retired part that later merges add (L{Merger.retire}); what
a worker counted after its last scrape and before it died is lost, and its restart is
counted (C{kthena_router_worker_restarts_total}).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from prometheus_client.utils import floatToGoString

MIRRORED = frozenset(
    {
        "kthena_model_server_health_status",
        "kthena_model_server_queue_depth",
        "kthena_model_server_gpu_utilization",
        "kthena_model_server_memory_usage_bytes",
        "kthena_lb_target_health",
        "kthena_router_pod_scrape_failures",
        "kthena_pd_group_kv_cache_hit_rate",
    }
)
"""Gauges every worker reads from the same pods: one worker's value, not a sum."""

MONOTONIC = frozenset({"counter", "histogram", "summary", "untyped", "unknown"})


@dataclass(slots=True)
class Family:
    """One metric family of an exposition: its header lines and its series in order."""

    name: str
    kind: str
    header: list[str] = field(default_factory=list)
    series: dict[str, float] = field(default_factory=dict)

    @property
    def rule(self) -> str:
        """How its series combine across workers: C{sum}, C{min} or C{first}."""
        if self.name.endswith("_created"):
            return "min"
        if self.kind in MONOTONIC or (self.kind == "gauge" and self.name not in MIRRORED):
            return "sum"
        return "first"


def parse(text: str) -> list[Family]:
    """
    The families of a Prometheus text exposition (0.0.4, as prometheus_client writes it:
    C{# HELP} then C{# TYPE} before each family's series, no timestamps).

    @raise ValueError: a line is not of that form.
    """
    families: list[Family] = []
    header: list[str] = []
    current: Family | None = None
    for line in text.splitlines():
        if not line:
            continue
        if line.startswith("# HELP "):
            header = [line]
            continue
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            current = Family(name, kind, [*header, line])
            families.append(current)
            header = []
            continue
        if line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        if current is None or not key:
            raise ValueError(f"not a series of a typed family: {line!r}")
        current.series[key] = float(value)
    return families


def _combine(rule: str, old: float, new: float) -> float:
    if rule == "sum":
        return old + new
    if rule == "min":
        return min(old, new)
    return old


def merge(expositions: Iterable[Sequence[Family]]) -> list[Family]:
    """Every family of every exposition, combined by each family's L{Family.rule}."""
    merged: dict[str, Family] = {}
    for families in expositions:
        for family in families:
            into = merged.get(family.name)
            if into is None:
                merged[family.name] = Family(
                    family.name, family.kind, list(family.header), dict(family.series)
                )
                continue
            rule = into.rule
            series = into.series
            for key, value in family.series.items():
                old = series.get(key)
                series[key] = value if old is None else _combine(rule, old, value)
    return list(merged.values())


def render(families: Iterable[Family]) -> str:
    """The text exposition of C{families}, as prometheus_client would write it."""
    lines: list[str] = []
    for family in families:
        lines.extend(family.header)
        lines.extend(f"{key} {floatToGoString(value)}" for key, value in family.series.items())
    lines.append("")
    return "\n".join(lines)


class Merger:
    """
    Merges the workers' expositions, adding what retired workers last reported to the
    monotonic families (see the module docstring).
    """

    def __init__(self) -> None:
        self.retired: list[Family] = []

    def retire(self, families: Sequence[Family]) -> None:
        """A worker ended: keep the monotonic part of what it last reported."""
        kept = [f for f in families if f.kind in MONOTONIC or f.name.endswith("_created")]
        self.retired = merge([self.retired, kept])

    def merge(self, live: Iterable[Sequence[Family]]) -> str:
        """The exposition of the live workers' families and the retired part."""
        return render(merge([*live, self.retired]))
