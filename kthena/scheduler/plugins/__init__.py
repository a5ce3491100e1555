"""
Scheduler plugins, one module each, registered by name as Kthena names them.

A plugin factory takes the plugin's C{args} mapping (from C{scheduler.pluginConfig}),
validated, and returns an object providing the plugin interfaces it implements.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from kthena.scheduler.plugins.gpu_usage import GPUUsage
from kthena.scheduler.plugins.least_latency import LeastLatency
from kthena.scheduler.plugins.least_request import LeastRequest
from kthena.scheduler.plugins.lora_affinity import LoraAffinity
from kthena.scheduler.plugins.prefix_cache import PrefixCache
from kthena.scheduler.plugins.random_score import RandomScore

PluginFactory = Callable[[Mapping[str, Any]], object]

PLUGINS: dict[str, PluginFactory] = {
    LeastRequest.name: LeastRequest.from_args,
    GPUUsage.name: GPUUsage.from_args,
    LeastLatency.name: LeastLatency.from_args,
    PrefixCache.name: PrefixCache.from_args,
    LoraAffinity.name: LoraAffinity.from_args,
    RandomScore.name: RandomScore.from_args,
}
"""Every plugin by its configuration name."""
