"""
A pod's live state as its scrapes tell it, and whether it may be scheduled.

TTFT and TPOT are averages over the last scrape period (delta of the histogram's sum over
delta of its count, as Kthena computes them); a period with no new observations keeps
the last average, and a counter that went down (the engine restarted) starts a new
baseline instead of producing a negative figure.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from kthena.engines.snapshot import EngineSnapshot

WAITING_WEIGHT = 100
"""A waiting request weighs this many running ones in L{PodState.work} (Kthena's)."""

_PER_REQUEST = frozenset({"in_flight", "finished"})
"""Fields every request writes: they do not bump L{PodState.generation}."""

_WORK_INPUTS = frozenset({"waiting", "running", "in_flight", "finished", "finished_at_scrape"})


@dataclass(slots=True)
class PodState:
    """
    @ivar scraped_at: reactor time of the last successful scrape (None: never).
    @ivar consecutive_failures: failed scrapes since the last success.
    @ivar prefix_period: (hits, queries) of the prefix cache over the last scrape period
        (an engine that only tells a rate: (rate, 1)), for its PD group's hit rate.
    @ivar loras: adapters the pod has loaded (from C{/v1/models}) or is running.
    @ivar in_flight: the router's requests to the pod that have not ended.
    @ivar finished: the router's requests to the pod that have ended, ever.
    @ivar finished_at_scrape: C{finished} when the last good scrape was taken: requests
        that ended since were still running in that scrape, so the scraped running count
        is that much too high now.
    @ivar work: the work the pod has as C{least-request} weighs it, kept current by
        every write of what it is made of (L{_work}), so that scoring a hundred pods reads
        one figure each instead of computing it from five.
    @cvar generation: bumped by every write to any pod's state but C{in_flight} and
        C{finished} (which move with every request): scheduler plugins whose results
        depend only on scraped figures keep them until it moves. A write, not only
        L{update}, so that whoever sets a figure (a scrape, a test, a debug tool) is seen
        at once.
    @cvar setbacks: bumped by every write that can make a healthy pod unhealthy (a failed
        scrape, a scrape time cleared; staleness comes with time, not a write), so that
        health verdicts of healthy pods are kept across their scrapes.
    """

    generation: ClassVar[int] = 0
    setbacks: ClassVar[int] = 0

    def __setattr__(self, name: str, value: object) -> None:
        # Reads stay plain slot reads; a write costs a Python call (a scrape writes about
        # fifteen fields per pod per interval; a request writes `in_flight` twice and
        # `finished` once, unbumped).
        object.__setattr__(self, name, value)
        if name not in _PER_REQUEST:
            PodState.generation += 1
            if (name == "consecutive_failures" and value) or (
                name == "scraped_at" and value is None
            ):
                PodState.setbacks += 1
        if name in _WORK_INPUTS:
            try:
                work = self._work()
            except AttributeError:  # being built: __post_init__ computes it
                return
            object.__setattr__(self, "work", work)

    def __post_init__(self) -> None:
        object.__setattr__(self, "work", self._work())

    def _work(self) -> float:
        """
        Kthena's running + 100 x waiting, the running count corrected with what this
        router knows now: requests it has in flight to the pod (maybe not scraped yet),
        and those that ended since the scrape (still counted in it).
        """
        running = self.running - self.finished + self.finished_at_scrape
        in_flight = self.in_flight
        running = in_flight if in_flight > running else running
        return (running if running >= 0 else 0) + WAITING_WEIGHT * self.waiting

    waiting: float = 0.0
    running: float = 0.0
    kv_usage: float = 0.0
    ttft: float = 0.0
    tpot: float = 0.0
    prefix_hit_rate: float = 0.0
    prefix_period: tuple[float, float] = (0.0, 0.0)
    gpu_utilization: dict[str, float] = field(default_factory=dict)
    gpu_memory_used: dict[str, float] = field(default_factory=dict)
    system_memory: float = 0.0
    loras: frozenset[str] = frozenset()
    models: frozenset[str] = frozenset()
    scraped_at: float | None = None
    consecutive_failures: int = 0
    scrapes: int = 0
    last_error: str | None = None
    in_flight: int = 0
    finished: int = 0
    finished_at_scrape: int = 0
    work: float = field(default=0.0, init=False)
    _previous: EngineSnapshot | None = None

    def update(self, snapshot: EngineSnapshot, now: float, finished: int | None = None) -> None:
        """
        Take a successful scrape.

        @param finished: L{finished} when the scrape was sent (default: now).
        """
        previous = self._previous
        self.waiting = snapshot.waiting
        self.running = snapshot.running
        self.kv_usage = snapshot.kv_usage or 0.0
        self.gpu_utilization = snapshot.gpu_utilization
        self.gpu_memory_used = snapshot.gpu_memory_used
        self.system_memory = snapshot.system_memory
        if snapshot.running_loras or snapshot.waiting_loras:
            self.loras = self.loras | {*snapshot.running_loras, *snapshot.waiting_loras}
        if previous is not None:
            self.ttft = _period_mean(
                previous.ttft_sum, previous.ttft_count, snapshot.ttft_sum, snapshot.ttft_count,
                self.ttft,
            )  # fmt: skip
            self.tpot = _period_mean(
                previous.tpot_sum, previous.tpot_count, snapshot.tpot_sum, snapshot.tpot_count,
                self.tpot,
            )  # fmt: skip
        if snapshot.prefix_hit_rate is not None:
            self.prefix_hit_rate = snapshot.prefix_hit_rate
            self.prefix_period = (snapshot.prefix_hit_rate, 1.0)  # a rate: one pod's weight
        elif snapshot.prefix_queries is not None and previous is not None:
            self.prefix_period = hits, queries = _period_counts(
                previous.prefix_hits or 0.0, previous.prefix_queries or 0.0,
                snapshot.prefix_hits or 0.0, snapshot.prefix_queries,
            )  # fmt: skip
            if queries > 0:
                self.prefix_hit_rate = hits / queries
        self._previous = snapshot
        self.scraped_at = now
        self.finished_at_scrape = self.finished if finished is None else finished
        self.scrapes += 1
        self.consecutive_failures = 0
        self.last_error = None

    def failed(self, why: str) -> None:
        """Take a failed scrape."""
        self.consecutive_failures += 1
        self.last_error = why

    def healthy(self, now: float, max_failures: int, stale_after: float) -> bool:
        """
        Schedulable: scraped at least once, fewer than C{max_failures} failures in a row,
        and the last success no older than C{stale_after} seconds.
        """
        return (
            self.scraped_at is not None
            and self.consecutive_failures < max_failures
            and now - self.scraped_at <= stale_after
        )


def _period_counts(
    old_hits: float, old_queries: float, new_hits: float, new_queries: float
) -> tuple[float, float]:
    """(sum, count) of the period between two scrapes of a counter pair (after a
    restart, the new counts are the period)."""
    if new_queries < old_queries or new_hits < old_hits:
        return new_hits, new_queries
    return new_hits - old_hits, new_queries - old_queries


def _period_mean(
    old_sum: float, old_count: float, new_sum: float, new_count: float, last: float
) -> float:
    total, count = _period_counts(old_sum, old_count, new_sum, new_count)
    return total / count if count > 0 else last
