"""
Engine dialects: how vLLM and SGLang name what a router reads from a pod's C{/metrics},
turned into one L{EngineSnapshot} whatever the engine (and whichever vLLM generation:
the current names are preferred, the older ones read when they are all there is).
"""

from __future__ import annotations

from zope.interface import implementer

from kthena.engines.exposition import samples
from kthena.engines.snapshot import EngineSnapshot
from kthena.interfaces import IEngineDialect

MIB = 1024 * 1024

# DCGM exporter gauges, when the pod (or a sidecar on the same port) exposes them.
GPU_UTIL = "DCGM_FI_DEV_GPU_UTIL"
GPU_FB_USED = "DCGM_FI_DEV_FB_USED"
# The engine process's own resident memory (prometheus_client's process collector).
RESIDENT = "process_resident_memory_bytes"


def _adapters(value: str) -> tuple[str, ...]:
    return tuple(a for a in (p.strip() for p in value.split(",")) if a)


def _gpus(snapshot: EngineSnapshot, sample_name: str, labels: dict[str, str], v: float) -> bool:
    """Take a GPU or process sample; C{False} when the sample is neither."""
    gpu = labels.get("gpu", "0")
    if sample_name == GPU_UTIL:
        snapshot.gpu_utilization[gpu] = v
    elif sample_name == GPU_FB_USED:
        snapshot.gpu_memory_used[gpu] = v * MIB
    elif sample_name == RESIDENT:
        snapshot.system_memory += v
    else:
        return False
    return True


@implementer(IEngineDialect)
class VLLMDialect:
    """vLLM V1 names (and the V0 ones: C{gpu_cache_usage_perc}, C{time_per_output_token})."""

    name = "vLLM"
    _WANTED = frozenset(
        {
            "vllm:num_requests_waiting", "vllm:num_requests_running",
            "vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc",
            "vllm:time_to_first_token_seconds_sum", "vllm:time_to_first_token_seconds_count",
            "vllm:inter_token_latency_seconds_sum", "vllm:inter_token_latency_seconds_count",
            "vllm:time_per_output_token_seconds_sum",
            "vllm:time_per_output_token_seconds_count",
            "vllm:prefix_cache_hits_total", "vllm:prefix_cache_queries_total",
            "vllm:gpu_prefix_cache_hits_total", "vllm:gpu_prefix_cache_queries_total",
            "vllm:lora_requests_info", GPU_UTIL, GPU_FB_USED, RESIDENT,
        }
    )  # fmt: skip

    def parse(self, text: str) -> EngineSnapshot:
        snapshot = EngineSnapshot()
        found: dict[str, float] = {}
        newest_lora = -1.0
        for s in samples(text, self._WANTED):
            if s.name == "vllm:lora_requests_info":
                # A new series each time the adapter lists change; the value is its time.
                if s.value > newest_lora:
                    newest_lora = s.value
                    snapshot.running_loras = _adapters(s.labels.get("running_lora_adapters", ""))
                    snapshot.waiting_loras = _adapters(s.labels.get("waiting_lora_adapters", ""))
            elif not _gpus(snapshot, s.name, s.labels, s.value):
                found[s.name] = found.get(s.name, 0.0) + s.value
        snapshot.waiting = found.get("vllm:num_requests_waiting", 0.0)
        snapshot.running = found.get("vllm:num_requests_running", 0.0)
        snapshot.kv_usage = found.get(
            "vllm:kv_cache_usage_perc", found.get("vllm:gpu_cache_usage_perc")
        )
        snapshot.ttft_sum = found.get("vllm:time_to_first_token_seconds_sum", 0.0)
        snapshot.ttft_count = found.get("vllm:time_to_first_token_seconds_count", 0.0)
        if "vllm:inter_token_latency_seconds_count" in found:
            snapshot.tpot_sum = found.get("vllm:inter_token_latency_seconds_sum", 0.0)
            snapshot.tpot_count = found["vllm:inter_token_latency_seconds_count"]
        else:
            snapshot.tpot_sum = found.get("vllm:time_per_output_token_seconds_sum", 0.0)
            snapshot.tpot_count = found.get("vllm:time_per_output_token_seconds_count", 0.0)
        for prefix in ("vllm:prefix_cache", "vllm:gpu_prefix_cache"):
            if f"{prefix}_queries_total" in found:
                snapshot.prefix_hits = found.get(f"{prefix}_hits_total", 0.0)
                snapshot.prefix_queries = found[f"{prefix}_queries_total"]
                break
        return snapshot


@implementer(IEngineDialect)
class SGLangDialect:
    """SGLang's names; it computes its own prefix-cache hit rate."""

    name = "SGLang"
    _WANTED = frozenset(
        {
            "sglang:num_queue_reqs", "sglang:num_running_reqs", "sglang:token_usage",
            "sglang:cache_hit_rate",
            "sglang:time_to_first_token_seconds_sum", "sglang:time_to_first_token_seconds_count",
            "sglang:inter_token_latency_seconds_sum", "sglang:inter_token_latency_seconds_count",
            GPU_UTIL, GPU_FB_USED, RESIDENT,
        }
    )  # fmt: skip

    def parse(self, text: str) -> EngineSnapshot:
        snapshot = EngineSnapshot()
        found: dict[str, float] = {}
        for s in samples(text, self._WANTED):
            if not _gpus(snapshot, s.name, s.labels, s.value):
                found[s.name] = found.get(s.name, 0.0) + s.value
        snapshot.waiting = found.get("sglang:num_queue_reqs", 0.0)
        snapshot.running = found.get("sglang:num_running_reqs", 0.0)
        snapshot.kv_usage = found.get("sglang:token_usage")
        snapshot.prefix_hit_rate = found.get("sglang:cache_hit_rate")
        snapshot.ttft_sum = found.get("sglang:time_to_first_token_seconds_sum", 0.0)
        snapshot.ttft_count = found.get("sglang:time_to_first_token_seconds_count", 0.0)
        snapshot.tpot_sum = found.get("sglang:inter_token_latency_seconds_sum", 0.0)
        snapshot.tpot_count = found.get("sglang:inter_token_latency_seconds_count", 0.0)
        return snapshot


DIALECTS: dict[str, IEngineDialect] = {"vLLM": VLLMDialect(), "SGLang": SGLangDialect()}
"""By C{ModelServer.spec.inferenceEngine}."""
