"""
C{gpu-usage}: favours pods with free KV cache, (1 - kv_cache_usage) x 100. The usage is
scraped, so the scores are kept per candidate set until the next scrape (L{ScrapeCache}).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from zope.interface import implementer

from kthena.interfaces import IScorePlugin
from kthena.pods import PodEndpoint
from kthena.scheduler.plugins.args import check_args
from kthena.scheduler.plugins.scrape_cache import ScrapeCache


@implementer(IScorePlugin)
class GPUUsage:
    name = "gpu-usage"

    def __init__(self) -> None:
        self._kept = ScrapeCache[list[float]](_scores)

    @classmethod
    def from_args(cls, args: Mapping[str, Any]) -> GPUUsage:
        check_args(cls.name, args, {})
        return cls()

    def score(self, request: Any, pods: Sequence[PodEndpoint]) -> list[float]:
        return self._kept.get(pods).copy()  # ours to keep: the caller's to change


def _scores(pods: Sequence[PodEndpoint]) -> list[float]:
    return [max(0.0, 1.0 - p.state.kv_usage) * 100 for p in pods]
