"""
The simulator's C{/metrics}: vLLM's or SGLang's own metric names, types, labels and
buckets, so that a router's scraper cannot tell the simulator from the real engine.

Counters and histograms are fed by the engine's events (L{EngineMetrics} is the engine's
observer); gauges are read from the engine when Prometheus collects (L{EngineGauges}).
Each simulator has a L{CollectorRegistry} of its own, so many simulated pods can share a
process (the router's demo mode).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector

from kthena.sim.engine import SimEngine, SimSequence

# Bucket boundaries as the engines define them.
VLLM_TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
    2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
VLLM_ITL_BUCKETS = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0,
    2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
)  # fmt: skip
VLLM_E2E_BUCKETS = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0,
    50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0,
)  # fmt: skip
SGLANG_TTFT_BUCKETS = (
    0.1, 0.2, 0.4, 0.6, 0.8, 1.0, 2.0, 4.0, 6.0, 8.0, 10.0, 20.0, 40.0, 60.0,
    80.0, 100.0, 200.0, 400.0,
)  # fmt: skip
SGLANG_ITL_BUCKETS = (
    0.002, 0.004, 0.006, 0.008, 0.010, 0.015, 0.020, 0.025, 0.030, 0.035, 0.040,
    0.060, 0.080, 0.100, 0.200, 0.400, 0.600, 0.800, 1.0, 2.0, 4.0, 6.0, 8.0,
)  # fmt: skip
SGLANG_E2E_BUCKETS = (
    0.1, 0.2, 0.4, 0.6, 0.8, 1.0, 2.0, 4.0, 6.0, 8.0, 10.0, 20.0, 40.0, 60.0,
    80.0, 100.0, 200.0, 400.0, 800.0,
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class Dialect:
    """The names and shapes one engine family exposes; C{labels} go on every series."""

    name: str
    prefix: str
    running: str
    waiting: str
    usage: str
    ttft_buckets: tuple[float, ...]
    itl_buckets: tuple[float, ...]
    e2e_buckets: tuple[float, ...]
    labels: tuple[str, ...]


VLLM = Dialect(
    name="vllm",
    prefix="vllm:",
    running="num_requests_running",
    waiting="num_requests_waiting",
    usage="kv_cache_usage_perc",
    ttft_buckets=VLLM_TTFT_BUCKETS,
    itl_buckets=VLLM_ITL_BUCKETS,
    e2e_buckets=VLLM_E2E_BUCKETS,
    labels=("model_name", "engine"),
)
SGLANG = Dialect(
    name="sglang",
    prefix="sglang:",
    running="num_running_reqs",
    waiting="num_queue_reqs",
    usage="token_usage",
    ttft_buckets=SGLANG_TTFT_BUCKETS,
    itl_buckets=SGLANG_ITL_BUCKETS,
    e2e_buckets=SGLANG_E2E_BUCKETS,
    labels=("model_name",),
)
DIALECTS = {d.name: d for d in (VLLM, SGLANG)}


class EngineMetrics:
    """The engine's observer: counters and histograms as the real engine keeps them."""

    def __init__(self, registry: CollectorRegistry, dialect: Dialect, model_name: str) -> None:
        p = dialect.prefix
        names = dialect.labels
        values = (model_name, "0")[: len(names)]

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            h = Histogram(p + name, doc, names, buckets=buckets, registry=registry)
            return h.labels(*values)

        def counter(name: str, doc: str) -> Counter:
            return Counter(p + name, doc, names, registry=registry).labels(*values)

        self.ttft = histogram(
            "time_to_first_token_seconds",
            "Histogram of time to first token in seconds.",
            dialect.ttft_buckets,
        )
        self.itl = histogram(
            "inter_token_latency_seconds",
            "Histogram of inter-token latency in seconds.",
            dialect.itl_buckets,
        )
        self.e2e = histogram(
            "e2e_request_latency_seconds",
            "Histogram of end to end request latency in seconds.",
            dialect.e2e_buckets,
        )
        self.prompt_tokens = counter("prompt_tokens", "Number of prefill tokens processed.")
        self.generation_tokens = counter(
            "generation_tokens", "Number of generation tokens processed."
        )
        self.tpot: Histogram | None = None
        self.prefix_queries: Counter | None = None
        self.prefix_hits: Counter | None = None
        self.success: Counter | None = None
        self._label_values = values
        if dialect is VLLM:
            self.tpot = histogram(
                "time_per_output_token_seconds",
                "Histogram of time per output token in seconds. DEPRECATED: use "
                "vllm:inter_token_latency_seconds.",
                dialect.itl_buckets,
            )
            self.prefix_queries = counter(
                "prefix_cache_queries",
                "Prefix cache queries, in terms of number of queried tokens.",
            )
            self.prefix_hits = counter(
                "prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens."
            )
            self.success = Counter(
                p + "request_success",
                "Count of successfully processed requests.",
                (*names, "finished_reason"),
                registry=registry,
            )

    def prefilled(self, seq: SimSequence) -> None:
        assert seq.first_token_at is not None
        self.ttft.observe(seq.first_token_at - seq.arrival)
        self.prompt_tokens.inc(seq.prompt_tokens)
        self.generation_tokens.inc()
        if self.prefix_queries is not None and self.prefix_hits is not None:
            self.prefix_queries.inc(seq.prompt_tokens)
            self.prefix_hits.inc(seq.cached_tokens)

    def decoded(self, seq: SimSequence, gap: float) -> None:
        self.itl.observe(gap)
        if self.tpot is not None:
            self.tpot.observe(gap)
        self.generation_tokens.inc()

    def finished(self, seq: SimSequence) -> None:
        assert seq.finished_at is not None
        self.e2e.observe(seq.finished_at - seq.arrival)
        if self.success is not None:
            self.success.labels(*self._label_values, seq.finish_reason or "stop").inc()


class EngineGauges(Collector):
    """Gauges read from the engine at collection time, so they are never stale."""

    def __init__(
        self,
        engine: SimEngine,
        dialect: Dialect,
        model_name: str,
        gpus: int = 0,
        gpu_memory_mib: int = 81_920,
    ) -> None:
        self.engine = engine
        self.dialect = dialect
        self.model_name = model_name
        self.gpus = gpus
        self.gpu_memory_mib = gpu_memory_mib
        self._lora_series: dict[tuple[str, str, str], float] = {}
        self._values = (model_name, "0")[: len(dialect.labels)]

    def _gauge(self, name: str, doc: str, value: float) -> GaugeMetricFamily:
        family = GaugeMetricFamily(self.dialect.prefix + name, doc, labels=self.dialect.labels)
        family.add_metric(self._values, value)
        return family

    def collect(self) -> Iterator[GaugeMetricFamily]:
        engine, dialect = self.engine, self.dialect
        yield self._gauge(
            dialect.running, "Number of requests in model execution batches.", engine.num_running
        )
        yield self._gauge(
            dialect.waiting, "Number of requests waiting to be processed.", engine.num_waiting
        )
        yield self._gauge(
            dialect.usage, "KV-cache usage. 1 means 100 percent usage.", engine.kv_usage
        )
        if dialect is VLLM:
            yield self._gauge(
                "gpu_cache_usage_perc",
                "GPU KV-cache usage. 1 means 100 percent usage. DEPRECATED.",
                engine.kv_usage,
            )
            yield self._lora_info()
            yield self._cache_config_info()
        else:
            yield self._gauge("cache_hit_rate", "The prefix cache hit rate.", self._hit_rate())
        if self.gpus:
            yield from self._dcgm()

    def _hit_rate(self) -> float:
        engine = self.engine
        return engine.prefix_hits / engine.prefix_queries if engine.prefix_queries else 0.0

    def _lora_info(self) -> GaugeMetricFamily:
        # vLLM sets a new series whenever the adapter lists change and never removes the
        # old ones; the value is the time of the last update, so readers take the newest.
        engine = self.engine
        key = (
            str(engine.config.max_loras),
            ",".join(engine.running_loras()),
            ",".join(engine.waiting_loras()),
        )
        self._lora_series[key] = engine.clock.seconds()
        family = GaugeMetricFamily(
            "vllm:lora_requests_info",
            "Running stats on lora requests.",
            labels=("max_lora", "running_lora_adapters", "waiting_lora_adapters"),
        )
        for labels, stamp in self._lora_series.items():
            family.add_metric(labels, stamp)
        return family

    def _cache_config_info(self) -> GaugeMetricFamily:
        config = self.engine.config
        family = GaugeMetricFamily(
            "vllm:cache_config_info",
            "Information of the LLMEngine CacheConfig",
            labels=(
                "block_size",
                "cache_dtype",
                "enable_prefix_caching",
                "num_gpu_blocks",
                "engine",
            ),
        )
        family.add_metric(
            (
                str(config.block_size),
                "auto",
                str(config.prefix_cache_blocks > 0),
                str(config.kv_blocks),
                "0",
            ),
            1.0,
        )
        return family

    def _dcgm(self) -> Iterator[GaugeMetricFamily]:
        engine = self.engine
        busy = min(1.0, engine.num_running / max(1, engine.config.max_num_seqs) * 4)
        weights = self.gpu_memory_mib * 0.4
        kv = self.gpu_memory_mib * 0.5
        used = weights + kv * engine.kv_usage
        labels = ("gpu", "UUID", "device", "modelName", "Hostname")
        specs = (
            ("DCGM_FI_DEV_GPU_UTIL", "GPU utilization (in %).", round(busy * 100)),
            ("DCGM_FI_DEV_FB_USED", "Framebuffer memory used (in MiB).", round(used)),
            (
                "DCGM_FI_DEV_FB_FREE",
                "Framebuffer memory free (in MiB).",
                self.gpu_memory_mib - round(used),
            ),
        )
        for name, doc, value in specs:
            family = GaugeMetricFamily(name, doc, labels=labels)
            for gpu in range(self.gpus):
                family.add_metric(
                    (
                        str(gpu),
                        f"GPU-sim-{gpu:04d}",
                        f"nvidia{gpu}",
                        "Simulated H100",
                        "kthena-sim",
                    ),
                    value,
                )
            yield family


def build_registry(
    engine: SimEngine,
    dialect: Dialect,
    model_name: str,
    gpus: int = 0,
    gpu_memory_mib: int = 81_920,
) -> CollectorRegistry:
    """A registry with the engine's metrics; makes L{EngineMetrics} the engine's observer."""
    registry = CollectorRegistry(auto_describe=True)
    engine.observer = EngineMetrics(registry, dialect, model_name)
    registry.register(EngineGauges(engine, dialect, model_name, gpus, gpu_memory_mib))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    """The text exposition format, version 0.0.4, as both engines serve it."""
    return generate_latest(registry)
