"""
C{least-latency}: favours pods with low TTFT and TPOT, each min-max normalised over the
candidates and blended by C{TTFTTPOTWeightFactor} (1: TTFT only, 0: TPOT only). Pods
with no latency observed yet share the top score, so they are not starved. Unlike
Kthena, latencies within 10% of each other count as equal.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from zope.interface import implementer

from kthena.interfaces import IScorePlugin
from kthena.scheduler.plugins.args import check_args
from kthena.store import PodEndpoint


@implementer(IScorePlugin)
class LeastLatency:
    name = "least-latency"

    def __init__(self, factor: float = 0.5) -> None:
        self.factor = factor

    @classmethod
    def from_args(cls, args: Mapping[str, Any]) -> LeastLatency:
        checked = check_args(cls.name, args, {"TTFTTPOTWeightFactor": float})
        factor = float(checked.get("TTFTTPOTWeightFactor", 0.5))
        if not (math.isfinite(factor) and 0.0 <= factor <= 1.0):
            raise ValueError(f"{cls.name}: TTFTTPOTWeightFactor must be from 0 to 1")
        return cls(factor)

    def score(self, request: Any, pods: Sequence[PodEndpoint]) -> list[float]:
        latencies = [(p.state.ttft, p.state.tpot) for p in pods]
        warm = [(ttft, tpot) for ttft, tpot in latencies if ttft > 0 and tpot > 0]
        if not warm:
            return [100.0] * len(pods)
        low_ttft, high_ttft = min(t for t, _ in warm), max(t for t, _ in warm)
        low_tpot, high_tpot = min(t for _, t in warm), max(t for _, t in warm)
        factor = self.factor

        def blend(ttft: float, tpot: float) -> float:
            if ttft <= 0 or tpot <= 0:
                return 100.0
            ttft_score = _normalised(ttft, low_ttft, high_ttft)
            tpot_score = _normalised(tpot, low_tpot, high_tpot)
            return ttft_score * factor + tpot_score * (1 - factor)

        return [blend(ttft, tpot) for ttft, tpot in latencies]


NOISE = 0.1
"""Latencies within this share of each other are equal: measurement noise must not swing
a pod from 0 to 100 (Kthena's plain min-max does, when all pods are alike)."""


def _normalised(value: float, low: float, high: float) -> float:
    """100 at the lowest latency, 0 at the highest; 100 when they are all about equal."""
    if high - low <= NOISE * high:
        return 100.0
    return 100.0 * (high - value) / (high - low)
