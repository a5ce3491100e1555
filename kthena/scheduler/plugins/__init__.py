"""
Scheduler plugins, one module each, registered by name as Kthena names them.

A plugin class's C{from_args} takes the plugin's C{args} mapping (from
C{scheduler.pluginConfig}), validates it (C{ValueError}) and returns an object providing
the plugin interfaces the class implements.
"""

from __future__ import annotations

from typing import Any

from kthena.scheduler.plugins.gpu_usage import GPUUsage
from kthena.scheduler.plugins.least_latency import LeastLatency
from kthena.scheduler.plugins.least_request import LeastRequest
from kthena.scheduler.plugins.lora_affinity import LoraAffinity
from kthena.scheduler.plugins.prefix_cache import PrefixCache
from kthena.scheduler.plugins.random_score import RandomScore

PLUGINS: dict[str, Any] = {
    plugin.name: plugin
    for plugin in (LeastRequest, GPUUsage, LeastLatency, PrefixCache, LoraAffinity, RandomScore)
}
"""Every plugin class by its configuration name (C{from_args} builds one)."""
