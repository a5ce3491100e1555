"""
The gauges set from the pods after each scrape round: model-server health, queue depth,
GPU and memory, each pod's health and pooled connections as a load-balancing target, and
its failed scrapes in a row. Series of pods and servers that are gone are removed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Gauge

from kthena.config.resources import ModelServer
from kthena.pipeline.health import ServerHealth
from kthena.pipeline.plane import DataPlane


@dataclass(frozen=True, slots=True)
class PodsView:
    """
    What the pod gauges are set from.

    @ivar servers: each model server and its health (its pods, the healthy ones).
    @ivar pool_sizes: idle pooled connections per pod key.
    """

    servers: Sequence[tuple[ModelServer, ServerHealth]]
    pool_sizes: dict[str, int]


class PodGauges:
    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.server_health = Gauge(
            "kthena_model_server_health_status",
            "Model server health: 1 when at least one of its pods is healthy, else 0",
            ("model_server", "namespace"), registry=r,
        )  # fmt: skip
        self.server_queue_depth = Gauge(
            "kthena_model_server_queue_depth",
            "Requests waiting in the model server's engines", ("model_server", "model"),
            registry=r,
        )  # fmt: skip
        self.server_gpu_utilization = Gauge(
            "kthena_model_server_gpu_utilization",
            "GPU utilization of the model server's pods (0-100)", ("model_server", "gpu_id"),
            registry=r,
        )  # fmt: skip
        self.server_memory = Gauge(
            "kthena_model_server_memory_usage_bytes",
            "Memory used by the model server's pods", ("model_server", "type"), registry=r,
        )  # fmt: skip
        self.lb_target_health = Gauge(
            "kthena_lb_target_health", "1 when the target pod may take traffic, else 0",
            ("target", "model"), registry=r,
        )  # fmt: skip
        self.lb_pool_size = Gauge(
            "kthena_lb_connection_pool_size", "Pooled connections to the target pod",
            ("target",), registry=r,
        )  # fmt: skip
        self.scrape_failures = Gauge(
            "kthena_router_pod_scrape_failures",
            "Failed metric scrapes of the pod in a row (0 once a scrape succeeds)", ("target",),
            registry=r,
        )  # fmt: skip
        self._series: dict[int, set[tuple[str, ...]]] = {}

    def observe(self, plane: DataPlane) -> None:
        """After a scrape round: the model-server and load-balancing gauges."""
        servers = [(s, plane.health.server(s)) for s in plane.store.resources.servers]
        pools = {k: plane.upstream.idle_connections(p) for k, p in plane.store.pods.items()}
        self.pods_observed(PodsView(servers, pools))

    def pods_observed(self, view: PodsView) -> None:
        """
        Set the model-server and load-balancing gauges from the pods' latest state, and
        remove the series of pods and servers that are gone (after each scrape round).
        """
        series: dict[Any, dict[tuple[str, ...], float]] = {
            self.server_health: {},
            self.server_queue_depth: {},
            self.server_gpu_utilization: {},
            self.server_memory: {},
            self.lb_target_health: {},
            self.lb_pool_size: {},
            self.scrape_failures: {},
        }
        for server, health in view.servers:
            key = server.meta.key
            pods, healthy = health.pods, health.healthy
            usable = health.status != "unhealthy"
            series[self.server_health][(key, server.meta.namespace)] = float(usable)
            model = server.model or key
            series[self.server_queue_depth][(key, model)] = sum(p.state.waiting for p in pods)
            per_gpu: dict[str, list[float]] = {}
            gpu_bytes = 0.0
            system_bytes = 0.0
            for p in pods:
                for gpu, value in p.state.gpu_utilization.items():
                    per_gpu.setdefault(gpu, []).append(value)
                gpu_bytes += sum(p.state.gpu_memory_used.values())
                system_bytes += p.state.system_memory
                series[self.lb_target_health][(p.key, model)] = float(p in healthy)
                series[self.scrape_failures][(p.key,)] = float(p.state.consecutive_failures)
            for gpu, utilizations in per_gpu.items():
                series[self.server_gpu_utilization][(key, gpu)] = sum(utilizations) / len(
                    utilizations
                )
            series[self.server_memory][(key, "gpu")] = gpu_bytes
            series[self.server_memory][(key, "system")] = system_bytes
        for pod_key, idle in view.pool_sizes.items():
            series[self.lb_pool_size][(pod_key,)] = float(idle)
        for family, values in series.items():
            seen = self._series.setdefault(id(family), set())
            for labels, value in values.items():
                family.labels(*labels).set(value)
            for labels in seen - values.keys():
                family.remove(*labels)
            self._series[id(family)] = set(values)
