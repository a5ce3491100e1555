"""
The prefill/decode and KV-cache families of the spec, fed from each PD request's legs
when it ends (L{kthena.record.Leg}) and from the pods' scraped prefix-cache counters after
each scrape round. L{kthena.observability.metrics.RouterMetrics} owns one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge

from kthena.config.resources import ModelServer
from kthena.observability.families import FastFamily, FastHistogram, WindowSummary
from kthena.pd.transfer import kv_bytes
from kthena.pipeline.plane import DataPlane
from kthena.record import Leg, RequestRecord


class PDMetrics:
    def __init__(self, registry: CollectorRegistry, clock: Any, buckets: Sequence[float]) -> None:
        """@param buckets: the request duration buckets (the phases' too)."""
        r = registry
        self.prefill_duration = FastHistogram(
            "kthena_router_request_prefill_duration_seconds",
            "Prefill phase processing latency for PD-disaggregated requests",
            ("model", "path", "status_code"), buckets,
        )  # fmt: skip
        r.register(self.prefill_duration)
        self.decode_duration = FastHistogram(
            "kthena_router_request_decode_duration_seconds",
            "Decode phase processing latency for PD-disaggregated requests",
            ("model", "path", "status_code"), buckets,
        )  # fmt: skip
        r.register(self.decode_duration)
        self.pd_requests = Counter(
            "kthena_pd_group_requests", "Requests sent to PD group members",
            ("group_key", "role", "model"), registry=r,
        )  # fmt: skip
        self.pd_routing_decisions = FastFamily(
            "unknown", "kthena_pd_group_routing_decisions",
            "PD routing decisions, a monotonic count (untyped to keep the spec's name)",
            ("group_key", "source_role", "target_role"),
        )  # fmt: skip
        r.register(self.pd_routing_decisions)
        self.pd_kv_cache_hit_rate = Gauge(
            "kthena_pd_group_kv_cache_hit_rate", "KV-cache hit rate of a PD group (0-1)",
            ("group_key", "model"), registry=r,
        )  # fmt: skip
        self.kv_cache_operations = Counter(
            "kthena_kv_cache_operations", "KV-cache connector operations",
            ("connector_type", "operation", "status"), registry=r,
        )  # fmt: skip
        self.kv_cache_transfer_bytes = Counter(
            "kthena_kv_cache_transfer_bytes", "KV-cache bytes moved by connectors",
            ("connector_type", "direction"), registry=r,
        )  # fmt: skip
        self.kv_cache_latency = WindowSummary(
            "kthena_kv_cache_latency_seconds",
            "KV-cache connector operation latency (quantiles over the last minute)",
            ("connector_type", "operation"), clock,
        )  # fmt: skip
        r.register(self.kv_cache_latency)
        self._hit_rate_series: set[tuple[str, str]] = set()

    def ended(self, ctx: RequestRecord, model: str, path: str) -> None:
        """A prefill/decode request's legs: each one sent counts; the last of each role
        is the request's phase; each pair tried is a routing decision (C{decode ->
        decode} for one sent straight to its decode pod) and, with a prefill leg, a
        prefill operation of its server's connector. The KV a prefill leg produced is
        sent; its decode leg answering 2xx received it (L{kthena.pd.transfer})."""
        assert ctx.match is not None and ctx.legs is not None
        server = ctx.match.server
        connector = server.kv_connector or "http"
        for i, leg in enumerate(ctx.legs):
            self.pd_requests.labels(leg.group, leg.role, model).inc()
            before = ctx.legs[i - 1] if i else None
            if leg.role == "decode" and (before is None or before.role != "prefill"):
                self.pd_routing_decisions.add((leg.group, "decode", "decode"))  # no prefill
            elif leg.role == "decode" and leg.status is not None and 200 <= leg.status < 300:
                self._kv_bytes(server, connector, "receive", before)
            if leg.role == "prefill":
                self._kv_bytes(server, connector, "send", leg)
                self.pd_routing_decisions.add((leg.group, "prefill", "decode"))
                ok = leg.status is not None and 200 <= leg.status < 300
                status = "success" if ok else "failure"
                self.kv_cache_operations.labels(connector, "prefill", status).inc()
                self.kv_cache_latency.observe(leg.seconds, connector, "prefill")
        for role, family in (("prefill", self.prefill_duration), ("decode", self.decode_duration)):
            last = ctx.leg(role)
            if last is not None and last.ended is not None:
                family.observe((model, path, str(last.status or 0)), last.seconds)

    def _kv_bytes(
        self, server: ModelServer, connector: str, direction: str, leg: Leg | None
    ) -> None:
        blocks = leg.kv_blocks if leg is not None else None
        size = None if blocks is None else kv_bytes(server, blocks)
        if size is not None:
            self.kv_cache_transfer_bytes.labels(connector, direction).inc(size)

    def observe_groups(self, plane: DataPlane) -> None:
        """Each PD group's prefix-cache hit rate over the last scrape period: its pods'
        hits over their queries (groups with no query in the period are left out)."""
        periods: dict[tuple[str, str], list[float]] = {}
        for server in plane.store.resources.servers:
            group = server.pd_group
            if group is None:
                continue
            for endpoint in plane.store.server_pods(server):
                value = endpoint.pod.meta.labels.get(group.group_key)
                if value:
                    hits, queries = endpoint.state.prefix_period
                    key = (value, server.model or server.meta.key)
                    totals = periods.setdefault(key, [0.0, 0.0])
                    totals[0] += hits
                    totals[1] += queries
        rates = {labels: h / q for labels, (h, q) in periods.items() if q > 0}
        for labels in self._hit_rate_series - rates.keys():  # never cleared: a scrape
            self.pd_kv_cache_hit_rate.remove(*labels)  # in a worker thread sees no gap
        for labels, rate in rates.items():
            self.pd_kv_cache_hit_rate.labels(*labels).set(rate)
        self._hit_rate_series = set(rates)

    def forget(self, model_gone: Callable[[dict[str, str]], bool]) -> None:
        """Remove the phase series of models that left the config."""
        for histogram in (self.prefill_duration, self.decode_duration):
            histogram.prune(model_gone)
