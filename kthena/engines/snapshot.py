"""
One scrape of one pod, whatever its engine: what the dialects read and the pod state
takes (a leaf type, so that the pods' state needs no dialect).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class EngineSnapshot:
    """
    One scrape of one pod. Histogram sums and counts and the prefix-cache counters are
    cumulative; L{kthena.engines.state.PodState} turns them into per-period figures.

    @ivar prefix_hit_rate: a rate the engine computes itself (SGLang), when it does.
    @ivar gpu_memory_used: bytes per GPU id.
    """

    waiting: float = 0.0
    running: float = 0.0
    kv_usage: float | None = None
    ttft_sum: float = 0.0
    ttft_count: float = 0.0
    tpot_sum: float = 0.0
    tpot_count: float = 0.0
    prefix_hits: float | None = None
    prefix_queries: float | None = None
    prefix_hit_rate: float | None = None
    running_loras: tuple[str, ...] = ()
    waiting_loras: tuple[str, ...] = ()
    gpu_utilization: dict[str, float] = field(default_factory=dict)
    gpu_memory_used: dict[str, float] = field(default_factory=dict)
    system_memory: float = 0.0
