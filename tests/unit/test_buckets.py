"""The local token buckets on a Clock: the rules of L{kthena.ratelimit.buckets}."""

from __future__ import annotations

import math

import pytest
from twisted.internet.task import Clock

from kthena.config.resources import RATE_UNITS
from kthena.ratelimit.buckets import BucketSpec, Demand, LocalBuckets, bucket_key


def per(limit: float, unit: str = "minute", key: str = "b") -> BucketSpec:
    return BucketSpec(key, limit, limit / RATE_UNITS[unit])


def test_kthenas_keys() -> None:
    assert bucket_key("m", "input") == "kthena:ratelimit:m:input"
    assert bucket_key("m", "output", "alice") == "kthena:ratelimit:m:output:alice"


def test_starts_full_then_refuses_until_it_refills() -> None:
    clock = Clock()
    buckets = LocalBuckets(clock)
    b = per(30)  # 30 tokens a minute: one every 2 s
    for _ in range(3):
        assert buckets.check_now([Demand(b, 10, 10)]) is None
    refusal = buckets.check_now([Demand(b, 10, 10)])
    assert refusal is not None
    assert (refusal.index, refusal.level) == (0, 0.0)
    assert refusal.retry_after == pytest.approx(20.0)
    clock.advance(19.9)
    assert buckets.check_now([Demand(b, 10, 10)]) is not None
    clock.advance(0.1)
    assert buckets.check_now([Demand(b, 10, 10)]) is None


def test_never_refills_above_capacity() -> None:
    clock = Clock()
    buckets = LocalBuckets(clock)
    b = per(10)
    assert buckets.check_now([Demand(b, 5, 5)]) is None
    clock.advance(3600)
    assert buckets.level(b) == 10


def test_a_check_is_all_or_nothing() -> None:
    clock = Clock()
    buckets = LocalBuckets(clock)
    a, b = per(10, key="a"), per(1, key="b")
    assert buckets.check_now([Demand(b, 1, 1)]) is None
    refusal = buckets.check_now([Demand(a, 4, 4), Demand(b, 1, 1)])
    assert refusal is not None and refusal.index == 1
    assert buckets.level(a) == 10  # not taken: the other demand failed


def test_a_need_without_take_only_checks() -> None:
    # Output tokens: one must be available, none is taken before the response.
    clock = Clock()
    buckets = LocalBuckets(clock)
    b = per(5)
    for _ in range(10):
        assert buckets.check_now([Demand(b, 0, 1)]) is None
    assert buckets.level(b) == 5


def test_settling_may_go_into_debt_and_refunds_stop_at_capacity() -> None:
    clock = Clock()
    buckets = LocalBuckets(clock)
    b = per(60)  # one token a second
    buckets.settle_now([(b, 100)])
    assert buckets.level(b) == -40
    refusal = buckets.check_now([Demand(b, 0, 1)])
    assert refusal is not None and refusal.retry_after == pytest.approx(41.0)
    clock.advance(41)
    assert buckets.check_now([Demand(b, 0, 1)]) is None
    buckets.settle_now([(b, -1000)])
    assert buckets.level(b) == 60


def test_a_need_over_capacity_never_passes() -> None:
    buckets = LocalBuckets(Clock())
    refusal = buckets.check_now([Demand(per(10), 11, 11)])
    assert refusal is not None and math.isinf(refusal.retry_after)


@pytest.mark.parametrize("unit", list(RATE_UNITS))
def test_every_unit_refills_its_limit_in_one_unit(unit: str) -> None:
    clock = Clock()
    buckets = LocalBuckets(clock)
    b = per(100, unit)
    assert buckets.check_now([Demand(b, 100, 100)]) is None
    clock.advance(RATE_UNITS[unit] / 2)
    assert buckets.level(b) == pytest.approx(50)
    clock.advance(RATE_UNITS[unit] / 2)
    assert buckets.level(b) == pytest.approx(100)
    assert RATE_UNITS["month"] == 30 * 86400


def test_expiry_is_kthenas() -> None:
    assert per(10, "second").expire == 600
    assert per(10, "hour").expire == 3 * 3600
    assert per(10, "month").expire == 7_776_000


def test_levels() -> None:
    clock = Clock()
    buckets = LocalBuckets(clock)
    a, b = per(10, key="a"), per(10, key="b")
    buckets.check_now([Demand(a, 3, 3)])
    levels: list[object] = []
    buckets.levels([a, b]).addCallback(levels.extend)
    assert levels == [7, None]


def test_a_sweep_forgets_only_buckets_full_again() -> None:
    clock = Clock()
    buckets = LocalBuckets(clock)
    a, b = per(60, key="a"), per(60, key="b")  # a token a second
    buckets.check_now([Demand(a, 10, 10)])
    buckets.check_now([Demand(b, 30, 30)])
    clock.advance(10)
    assert buckets.sweep() == 1
    assert len(buckets) == 1
    assert buckets.level(b) == 40
    clock.advance(20)
    assert buckets.sweep() == 1 and len(buckets) == 0


def test_a_changed_limit_applies_to_the_level_it_finds() -> None:
    clock = Clock()
    buckets = LocalBuckets(clock)
    small, large = per(10, key="k"), per(100, key="k")
    buckets.check_now([Demand(small, 10, 10)])
    assert buckets.level(large) == 0
    clock.advance(6)  # the new rate: 100 a minute
    assert buckets.level(large) == pytest.approx(10)
