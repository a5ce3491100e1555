"""
C{least-latency}: favours pods with low TTFT and TPOT, each min-max normalised over the
candidates and blended by C{TTFTTPOTWeightFactor} (1: TTFT only, 0: TPOT only). Pods
with no latency observed yet share the top score, so they are not starved. Unlike
Kthena, latencies within 10% of each other count as equal. The latencies are scraped, so
the scores are kept per candidate set until the next scrape (L{ScrapeCache}).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from zope.interface import implementer

from kthena.interfaces import IScorePlugin
from kthena.pods import PodEndpoint
from kthena.scheduler.plugins.args import check_args
from kthena.scheduler.plugins.scrape_cache import ScrapeCache


@implementer(IScorePlugin)
class LeastLatency:
    name = "least-latency"

    def __init__(self, factor: float = 0.5) -> None:
        self.factor = factor
        self._kept = ScrapeCache[list[float]](self._scores)

    @classmethod
    def from_args(cls, args: Mapping[str, Any]) -> LeastLatency:
        checked = check_args(cls.name, args, {"TTFTTPOTWeightFactor": float})
        factor = float(checked.get("TTFTTPOTWeightFactor", 0.5))
        if not (math.isfinite(factor) and 0.0 <= factor <= 1.0):
            raise ValueError(f"{cls.name}: TTFTTPOTWeightFactor must be from 0 to 1")
        return cls(factor)

    def score(self, request: Any, pods: Sequence[PodEndpoint]) -> list[float]:
        return self._kept.get(pods).copy()  # ours to keep: the caller's to change

    def _scores(self, pods: Sequence[PodEndpoint]) -> list[float]:
        latencies = [(p.state.ttft, p.state.tpot) for p in pods]
        warm = [(ttft, tpot) for ttft, tpot in latencies if ttft > 0 and tpot > 0]
        if not warm:
            return [100.0] * len(pods)
        # Each part is base - value x slope: 100 x share at the lowest latency, 0 at the
        # highest, a flat 100 x share when the latencies are alike.
        ttft_base, ttft_slope = _line(
            min(t for t, _ in warm), max(t for t, _ in warm), 100 * self.factor
        )
        tpot_base, tpot_slope = _line(min(t for _, t in warm), max(t for _, t in warm),
                                      100 * (1 - self.factor))  # fmt: skip
        base = ttft_base + tpot_base
        return [
            base - ttft * ttft_slope - tpot * tpot_slope if ttft > 0 and tpot > 0 else 100.0
            for ttft, tpot in latencies
        ]


NOISE = 0.1
"""Latencies within this share of each other are equal: measurement noise must not swing
a pod from 0 to 100 (Kthena's plain min-max does, when all pods are alike)."""


def _line(low: float, high: float, share: float) -> tuple[float, float]:
    """Base and slope mapping C{low} to C{share} and C{high} to 0 (flat when alike)."""
    if high - low <= NOISE * high:
        return share, 0.0
    slope = share / (high - low)
    return high * slope, slope
