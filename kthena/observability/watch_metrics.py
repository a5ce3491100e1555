"""
The Kubernetes source's watches as metrics, read when scraped: failed lists and watches
(a counter per kind, over its namespaces) and when each kind last heard from the API (the
oldest of its namespaces: the one that matters when it goes stale), so that an alert can
say "the router's view of the cluster is N minutes old" as
C{time() - kthena_router_resource_last_sync_timestamp_seconds}.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from kthena.sources.source import WatchStatus


class WatchFamilies(Collector):
    def __init__(self, watches: Callable[[], Sequence[WatchStatus]]) -> None:
        self.watches = watches

    def collect(self) -> Iterator[Metric]:
        errors = CounterMetricFamily(
            "kthena_router_resource_watch_errors",
            "Failed lists and watches of the Kubernetes API, by kind",
            labels=["kind"],
        )
        synced = GaugeMetricFamily(
            "kthena_router_resource_last_sync_timestamp_seconds",
            "When the router last heard from the Kubernetes API about a kind (a list, an "
            "event or a bookmark; the oldest of its namespaces), Unix seconds",
            labels=["kind"],
        )
        by_kind: dict[str, list[WatchStatus]] = {}
        for watch in self.watches():
            by_kind.setdefault(watch.kind, []).append(watch)
        for kind, watches in sorted(by_kind.items()):
            errors.add_metric([kind], sum(w.errors for w in watches))
            times = [w.last_sync for w in watches]
            if all(t is not None for t in times):
                synced.add_metric([kind], min(t for t in times if t is not None))
        yield errors
        yield synced
