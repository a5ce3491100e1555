"""
C{least-request}: a filter dropping pods whose engine queue is full, and a score favouring
pods with less work. Kthena counts the engine's running plus 100 x waiting requests, as
last scraped; we correct the running count with what this router knows now: requests it
has in flight to the pod (not scraped yet) and requests that finished since the scrape
(L{PodState.work<kthena.engines.state.PodState>}).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from operator import attrgetter
from typing import Any

from zope.interface import implementer

from kthena.interfaces import IFilterPlugin, IScorePlugin
from kthena.pods import PodEndpoint
from kthena.scheduler.plugins.args import check_args
from kthena.scheduler.plugins.scrape_cache import ScrapeCache

_WORK = attrgetter("state.work")


@implementer(IFilterPlugin, IScorePlugin)
class LeastRequest:
    name = "least-request"

    def __init__(self, max_waiting_requests: int = 10) -> None:
        self.max_waiting_requests = max_waiting_requests
        self._kept = ScrapeCache[list[PodEndpoint]](self._filter)

    @classmethod
    def from_args(cls, args: Mapping[str, Any]) -> LeastRequest:
        checked = check_args(cls.name, args, {"maxWaitingRequests": int})
        limit = checked.get("maxWaitingRequests", 10)
        if limit < 1:
            raise ValueError(f"{cls.name}: maxWaitingRequests must be at least 1")
        return cls(limit)

    def filter(self, request: Any, pods: Sequence[PodEndpoint]) -> list[PodEndpoint]:
        # The waiting counts are scraped: the pods kept stand until the next scrape.
        return self._kept.get(pods).copy()

    def _filter(self, pods: Sequence[PodEndpoint]) -> list[PodEndpoint]:
        return [p for p in pods if p.state.waiting < self.max_waiting_requests]

    def score(self, request: Any, pods: Sequence[PodEndpoint]) -> list[float]:
        # In-flight counts change with every request, so this runs each time; the work of
        # each pod is kept current by its state (PodState.work), one C-level read a pod.
        work = list(map(_WORK, pods))
        most = max(work)
        if most <= 0:
            return [100.0] * len(work)
        scale = 100 / most
        return [(most - value) * scale for value in work]
