"""
Results that depend only on what the scrapes said, kept per candidate set until the next
scrape of any pod: a request then costs a tuple and a dict look-up instead of a pass over
every pod (a Python pass over 100 pods costs tens of microseconds on a small CPU).

The key is the candidates themselves (a tuple of the L{PodEndpoint} objects, compared by
identity): a pod leaving, a new pod (a new object, even under an old key), a filter
leaving a different set, all make a new key. L{PodState.generation} moves with every
write to a pod's state (a scrape, or anyone setting a figure; a request ending does not
count), and drops everything kept.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

from kthena.engines.state import PodState
from kthena.pods import PodEndpoint

T = TypeVar("T")

LIMIT = 64
"""Candidate sets kept per plugin between two scrapes (then all are dropped: sets that
vary this much per request gain nothing from keeping)."""


class ScrapeCache(Generic[T]):
    """
    What one plugin computes of a candidate set (scores, the pods a filter keeps), for
    the current scrape generation. What it returns is kept: callers hand out copies.
    """

    __slots__ = ("_compute", "_generation", "_kept")

    def __init__(self, compute: Callable[[Sequence[PodEndpoint]], T]) -> None:
        self._compute = compute
        self._generation = -1
        self._kept: dict[tuple[PodEndpoint, ...], T] = {}

    def get(self, pods: Sequence[PodEndpoint]) -> T:
        """C{compute(pods)}, computed at most once per candidate set and scrape."""
        kept = self._kept
        generation = PodState.generation
        if generation != self._generation:
            kept.clear()
            self._generation = generation
        key = tuple(pods)
        try:
            return kept[key]
        except KeyError:  # once per candidate set and scrape
            pass
        if len(kept) >= LIMIT:
            kept.clear()
        value = kept[key] = self._compute(key)
        return value
