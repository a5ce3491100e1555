"""
Token buckets: what a limit asks of one (L{BucketSpec}, L{Demand}), what a refusal says
(L{Refusal}), and the buckets kept in the router itself (L{LocalBuckets}). The buckets
kept in Redis (L{kthena.ratelimit.redis}) follow the same rules, in a Lua script.

The rules, the same in both places:
  - a bucket starts full: its level is its capacity (the limit per unit);
  - it refills at C{per_second} (the limit over the unit's seconds), never above capacity;
  - a check is all or nothing: every demand is met (each takes its C{take}) or none is
    touched, and the refusal names the first demand that could not be met;
  - a demand is met when the level is at least its C{need} (the input estimate for input
    tokens, one token for output tokens, one request for request limits);
  - a settle changes levels by what the response really used: a charge may take a level
    below zero (debt: the next requests wait until it refills), a refund never lifts it
    above capacity.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from zope.interface import implementer

from kthena.interfaces import IBucketBackend

KEY_PREFIX = "kthena:ratelimit"
"""Kthena's: C{kthena:ratelimit:{model}:{input|output}} (and C{:{user}} per user)."""


@dataclass(frozen=True, slots=True)
class BucketSpec:
    """
    One bucket: its key (also its Redis key), capacity and refill rate.

    @ivar expire: seconds after which an unused bucket may be forgotten (it is full again
        by then): Kthena's rule, three units, at least 10 minutes, at most 90 days.
    """

    key: str
    capacity: float
    per_second: float
    expire: int = field(init=False, compare=False)

    def __post_init__(self) -> None:
        # made once: Redis sends it with every call
        expire = int(min(max(3 * self.capacity / self.per_second, 600), 7_776_000))
        object.__setattr__(self, "expire", expire)


def bucket_key(model: str, kind: str, user: str | None = None) -> str:
    """C{kthena:ratelimit:{model}:{kind}}, then C{:{user}} for a per-user bucket."""
    key = f"{KEY_PREFIX}:{model}:{kind}"
    return key if user is None else f"{key}:{user}"


@dataclass(frozen=True, slots=True)
class Demand:
    """
    What one request asks of one bucket.

    @ivar take: consumed when the check passes.
    @ivar need: the level the bucket must have (at least C{take}).
    """

    bucket: BucketSpec
    take: float
    need: float


@dataclass(frozen=True, slots=True)
class Refusal:
    """
    A check that did not pass.

    @ivar index: which demand could not be met (its position in the check).
    @ivar level: that bucket's level at the check.
    @ivar retry_after: seconds until the level reaches the demand's need; C{inf} when the
        need is above the bucket's capacity (it never will).
    """

    index: int
    level: float
    retry_after: float


def retry_after(bucket: BucketSpec, level: float, need: float) -> float:
    """Seconds until C{bucket}, at C{level}, holds C{need}."""
    if need > bucket.capacity:
        return math.inf
    return max(0.0, (need - level) / bucket.per_second)


@implementer(IBucketBackend)
class LocalBuckets:
    """Buckets in this process, on the reactor's clock (exact, and about a microsecond)."""

    name = "local"

    def __init__(self, clock: IReactorTime) -> None:
        self.clock = clock
        self._levels: dict[str, tuple[float, float, BucketSpec]] = {}  # key -> (level, at, spec)

    def level(self, bucket: BucketSpec, now: float | None = None) -> float:
        """The level now (refilled since it was last changed)."""
        if now is None:
            now = self.clock.seconds()
        kept = self._levels.get(bucket.key)
        if kept is None:
            return bucket.capacity
        level, at, _ = kept
        return min(bucket.capacity, level + max(0.0, now - at) * bucket.per_second)

    def check_now(self, demands: Sequence[Demand]) -> Refusal | None:
        """L{check} without a Deferred, for callers on the reactor thread."""
        now = self.clock.seconds()
        levels = [self.level(d.bucket, now) for d in demands]
        for index, (demand, level) in enumerate(zip(demands, levels, strict=True)):
            if level < demand.need:
                return Refusal(index, level, retry_after(demand.bucket, level, demand.need))
        for demand, level in zip(demands, levels, strict=True):
            if demand.take:
                self._levels[demand.bucket.key] = (level - demand.take, now, demand.bucket)
        return None

    def check(self, demands: Sequence[Demand]) -> Deferred[Refusal | None]:
        return succeed(self.check_now(demands))

    def settle_now(self, charges: Sequence[tuple[BucketSpec, float]]) -> None:
        now = self.clock.seconds()
        for bucket, amount in charges:
            if amount:
                level = min(bucket.capacity, self.level(bucket, now) - amount)
                self._levels[bucket.key] = (level, now, bucket)

    def settle(self, charges: Sequence[tuple[BucketSpec, float]]) -> Deferred[None]:
        self.settle_now(charges)
        return succeed(None)

    def levels(self, buckets: Sequence[BucketSpec]) -> Deferred[list[float | None]]:
        now = self.clock.seconds()
        return succeed([self.level(b, now) if b.key in self._levels else None for b in buckets])

    def sweep(self) -> int:
        """
        Forget the buckets that are full again (a per-user bucket of a caller gone
        quiet, the bucket of a limit that left the config): a full bucket and a missing
        one are the same. Keeps memory bounded by the callers active within a unit.

        @return: how many were forgotten.
        """
        now = self.clock.seconds()
        full = [
            key
            for key, (_, _, spec) in self._levels.items()
            if self.level(spec, now) >= spec.capacity
        ]
        for key in full:
            del self._levels[key]
        return len(full)

    def __len__(self) -> int:
        return len(self._levels)
