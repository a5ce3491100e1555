"""
Pod choice. The framework (filters, weighted scores, decision records) replaces the
uniform scheduler here; the data plane only sees L{kthena.interfaces.IScheduler}.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from zope.interface import implementer

from kthena.interfaces import IScheduler
from kthena.store import PodEndpoint, RouteMatch


@implementer(IScheduler)
class UniformScheduler:
    """Every ready pod equally likely; the rest follow in random order, for retries."""

    def __init__(self, rng: random.Random | None = None) -> None:
        self._random = rng or random.Random()

    def schedule(
        self, match: RouteMatch, pods: Sequence[PodEndpoint], body: dict[str, object]
    ) -> list[PodEndpoint]:
        if len(pods) == 1:
            return [pods[0]]
        return self._random.sample(list(pods), len(pods))
