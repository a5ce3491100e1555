"""
The health verdicts kept per pod set (L{kthena.pipeline.health.Health.healthy}) are
always those of a fresh pass: a failed scrape, a stale scrape, an ejection and its end, a
pod scraped back to health, new settings, are all seen at once; scrapes of healthy pods
do not cost a pass.
"""

from __future__ import annotations

import random
from dataclasses import replace

from twisted.internet.task import Clock

from kthena.config.router import PodMetricsConfig
from kthena.config.traffic import OutlierConfig
from kthena.engines.snapshot import EngineSnapshot
from kthena.pipeline.health import Health
from kthena.pipeline.outlier import OutlierDetector
from kthena.pods import PodEndpoint
from tests.unit.test_scheduler import cluster


def build(count: int = 4) -> tuple[Clock, Health, list[PodEndpoint]]:
    store, _, pods = cluster(count)
    clock = Clock()
    clock.advance(1000)
    outliers = OutlierDetector(OutlierConfig(), clock, lambda pod: None)
    health = Health(store, clock, outliers, PodMetricsConfig(unhealthy_after=2, stale_after=5))
    for p in pods:
        p.state.update(EngineSnapshot(), clock.seconds())
    return clock, health, pods


def fresh(health: Health, pods: list[PodEndpoint]) -> list[PodEndpoint]:
    now = health.clock.seconds()
    return [p for p in pods if health.pod(p, now)]


def test_scrapes_of_healthy_pods_keep_the_verdict() -> None:
    clock, health, pods = build()
    assert health.healthy(pods) == pods
    passes: list[PodEndpoint] = []

    def counted(pod: PodEndpoint, now: float | None = None) -> bool:
        passes.append(pod)
        return True

    health.pod = counted  # type: ignore[method-assign]
    for _ in range(3):
        clock.advance(1)
        for p in pods:
            p.state.update(EngineSnapshot(running=3), clock.seconds())
        assert health.healthy(pods) == pods
    assert passes == []  # no pass: the verdict stood
    clock.advance(5)  # the first scrape's staleness is due: a pass, which finds them fresh
    assert health.healthy(pods) == pods and passes == pods


def test_each_change_is_seen_at_once() -> None:
    clock, health, pods = build()
    a, b, c, d = pods
    assert health.healthy(pods) == pods
    b.state.failed("refused")
    b.state.failed("refused")  # unhealthyAfter 2
    assert health.healthy(pods) == [a, c, d]
    b.state.update(EngineSnapshot(), clock.seconds())  # scraped back to health
    assert health.healthy(pods) == pods
    c.outlier.ejected_until = clock.seconds() + 3  # a direct write counts
    assert health.healthy(pods) == [a, b, d]
    clock.advance(3)  # the ejection is over (and the scrapes not stale yet)
    assert health.healthy(pods) == pods
    clock.advance(2.5)  # every scrape stale now
    assert health.healthy(pods) == []
    for p in pods:
        p.state.update(EngineSnapshot(), clock.seconds())
    assert health.healthy(pods) == pods
    health.scrapes = replace(health.scrapes, stale_after=0.5)  # type: ignore[type-var]
    clock.advance(1)
    assert health.healthy(pods) == []  # the new settings apply at once
    health.outliers.config = replace(health.outliers.config, enabled=False)
    assert health.healthy(pods) == []


def test_kept_verdicts_are_those_of_a_fresh_pass() -> None:
    clock, health, pods = build(6)
    rng = random.Random(3)
    sets = [pods, pods[:3], pods[2:], [pods[5], pods[0]]]
    for _ in range(400):
        p = rng.choice(pods)
        action = rng.randrange(6)
        if action == 0:
            p.state.update(EngineSnapshot(running=rng.randint(0, 5)), clock.seconds())
        elif action == 1:
            p.state.failed("timeout")
        elif action == 2:
            p.outlier.ejected_until = clock.seconds() + rng.choice([0.5, 3, 20])
        elif action == 3:
            clock.advance(rng.choice([0.1, 1, 2.5, 6]))
        elif action == 4:
            p.in_flight += 1  # a request: nothing health depends on
        for candidates in sets:
            got = health.healthy(candidates)
            assert got == fresh(health, candidates)
            got.clear()  # the caller's own list
