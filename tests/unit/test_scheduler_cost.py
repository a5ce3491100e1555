"""
What the scheduler keeps between requests to stay cheap (scores of scraped figures per
candidate set, pod places, the unrolled weighted sum, the tie-free ranking) gives the same
answers as computing everything afresh: a scrape, a direct write, a pod leaving or coming
back, another candidate set are all seen at once.
"""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

import pytest

from kthena.engines.snapshot import EngineSnapshot
from kthena.engines.state import PodState
from kthena.pods import PodEndpoint
from kthena.scheduler.framework import Scheduler, SchedulingRequest, _weighted_sum
from kthena.scheduler.plugins.gpu_usage import GPUUsage
from kthena.scheduler.plugins.least_latency import LeastLatency
from kthena.scheduler.plugins.least_request import LeastRequest
from kthena.scheduler.plugins.prefix_cache import PrefixCache
from kthena.scheduler.plugins.random_score import RandomScore
from tests.unit.test_scheduler import cluster, request


def scrape(pod: PodEndpoint, **figures: Any) -> None:
    """One good scrape of C{pod}, as the scraper takes it."""
    pod.state.update(EngineSnapshot(**figures), 0.0)


def test_gpu_usage_follows_a_scrape_at_once() -> None:
    _, match, (a, b, _c) = cluster()
    plugin = GPUUsage()
    scrape(a, kv_usage=0.25)
    scrape(b, kv_usage=0.5)
    assert plugin.score(request(match, [a, b]), [a, b]) == [75.0, 50.0]
    scrape(b, kv_usage=0.9)
    assert plugin.score(request(match, [a, b]), [a, b]) == [75.0, pytest.approx(10.0)]
    b.state.kv_usage = 1.0  # any write counts, not only a scrape's
    assert plugin.score(request(match, [a, b]), [a, b]) == [75.0, 0.0]


def test_kept_scores_are_not_the_callers_to_change() -> None:
    _, match, (a, b, _c) = cluster()
    plugin = GPUUsage()
    first = plugin.score(request(match, [a, b]), [a, b])
    first[0] = -1.0
    assert plugin.score(request(match, [a, b]), [a, b]) == [100.0, 100.0]


def test_requests_ending_do_not_drop_kept_scores() -> None:
    """C{finished} and C{in_flight} move with every request: they must not cost a
    recomputation."""
    _, _, (a, _b, _c) = cluster()
    generation = PodState.generation
    a.state.finished += 1
    a.in_flight += 1
    a.in_flight -= 1
    assert PodState.generation == generation
    a.state.waiting = 1
    assert PodState.generation == generation + 1


def test_least_latency_follows_a_scrape_and_the_candidate_set() -> None:
    _, match, (a, b, c) = cluster()
    plugin = LeastLatency(1.0)  # TTFT only
    for pod, ttft in ((a, 0.1), (b, 0.2), (c, 1.0)):
        scrape(pod)
        scrape(pod, ttft_sum=ttft, ttft_count=1, tpot_sum=0.01, tpot_count=1)
    everyone = plugin.score(request(match, [a, b, c]), [a, b, c])
    assert everyone == pytest.approx([100.0, 100 - 100 * 0.1 / 0.9, 0.0])
    # Without c the range is a..b: another candidate set, other scores.
    assert plugin.score(request(match, [a, b]), [a, b]) == pytest.approx([100.0, 0.0])
    assert plugin.score(request(match, [b, a]), [b, a]) == pytest.approx([0.0, 100.0])
    # b's next scrape period is slow: seen at once.
    scrape(b, ttft_sum=2.2, ttft_count=2, tpot_sum=0.02, tpot_count=2)
    assert b.state.ttft == pytest.approx(2.0)
    assert plugin.score(request(match, [a, b, c]), [a, b, c]) == pytest.approx(
        [100.0, 0.0, 100 * 1.0 / 1.9]
    )


def test_a_pod_that_comes_back_is_a_new_candidate() -> None:
    """A pod leaving and coming back under its key is a new object with its own state."""
    _, match, (a, b, _c) = cluster()
    plugin = GPUUsage()
    a.state.kv_usage, b.state.kv_usage = 0.0, 0.5
    assert plugin.score(request(match, [a, b]), [a, b]) == [100.0, 50.0]
    back = PodEndpoint(b.key, b.pod, b.host, b.port)
    assert plugin.score(request(match, [a, back]), [a, back]) == [100.0, 100.0]
    assert plugin.score(request(match, [a]), [a]) == [100.0]


def test_least_request_filter_follows_a_scrape() -> None:
    _, match, (a, b, c) = cluster()
    plugin = LeastRequest(max_waiting_requests=10)
    assert plugin.filter(request(match, [a, b, c]), [a, b, c]) == [a, b, c]
    scrape(b, waiting=10)
    kept = plugin.filter(request(match, [a, b, c]), [a, b, c])
    assert kept == [a, c]
    kept.append(b)  # the caller's own list
    assert plugin.filter(request(match, [a, b, c]), [a, b, c]) == [a, c]
    assert plugin.filter(request(match, [b, c]), [b, c]) == [c]


def test_least_request_score_is_the_documented_load() -> None:
    _, match, pods = cluster(6)
    rng = random.Random(7)
    plugin = LeastRequest()
    writes = {
        "running": lambda p: setattr(p.state, "running", rng.choice([0, 3, 7.0, 12.5])),
        "waiting": lambda p: setattr(p.state, "waiting", rng.choice([0, 0, 1, 2.0])),
        "finished": lambda p: setattr(p.state, "finished", rng.randint(0, 9)),
        "baseline": lambda p: setattr(p.state, "finished_at_scrape", rng.randint(0, 9)),
        "in_flight": lambda p: setattr(p, "in_flight", rng.randint(0, 8)),
        "scrape": lambda p: scrape(p, running=rng.randint(0, 20), waiting=rng.choice([0, 1])),
    }
    for _ in range(200):  # any one write, last or alone, is seen by the next score
        for p in pods:
            for name in rng.sample(sorted(writes), rng.randint(1, 3)):
                writes[name](p)
        load = [
            max(p.state.running - p.state.finished + p.state.finished_at_scrape, p.in_flight, 0)
            + 100 * p.state.waiting
            for p in pods
        ]
        most = max(load)
        expected = [(most - v) * (100 / most) for v in load] if most > 0 else [100.0] * 6
        assert plugin.score(request(match, pods), pods) == expected  # the same floats


def test_prefix_scores_follow_the_candidate_order_and_pods_leaving() -> None:
    _, match, (a, b, c) = cluster()
    plugin = PrefixCache(block_size=8, max_blocks=100, max_hashes=1000, top_k=5)
    body = {"model": "m", "prompt": "x" * 80}
    plugin.scheduled(request(match, [a, b, c], body), b)
    assert plugin.score(request(match, [a, b, c], body), [a, b, c]) == [0.0, 100.0, 0.0]
    assert plugin.score(request(match, [b, a], body), [b, a]) == [100.0, 0.0]
    assert plugin.score(request(match, [c, a], body), [c, a]) == [0.0, 0.0]
    plugin.forget_pods({b.key})
    assert plugin.score(request(match, [a, b, c], body), [a, b, c]) == [0.0, 0.0, 0.0]


def test_prefix_top_k_stops_at_the_longest_matches() -> None:
    """Past top-k matched pods the walk stops: shorter holders score 0, as before."""
    _, match, pods = cluster(4)
    _a, b, c, d = pods
    plugin = PrefixCache(block_size=4, max_blocks=100, max_hashes=1000, top_k=2)
    plugin.scheduled(request(match, pods, {"prompt": "aaaa"}), d)
    plugin.scheduled(request(match, pods, {"prompt": "aaaabbbb"}), c)
    plugin.scheduled(request(match, pods, {"prompt": "aaaabbbbcccc"}), b)
    scores = plugin.score(request(match, pods, {"prompt": "aaaabbbbcccc"}), pods)
    # b holds 3 blocks, c 2, d 1 (but top-k 2 was reached at c's length).
    assert scores == [0.0, 100.0, pytest.approx(200 / 3), 0.0]


def test_the_weighted_sum_is_the_running_total() -> None:
    rng = random.Random(1)
    weights = [1.0, 2.0, 0.5, 1.0, 3.3]
    lists = [[rng.random() * 100 for _ in range(50)] for _ in weights]
    expected = [0.0] * 50
    for weight, scores in zip(weights, lists, strict=True):
        if weight == 1:
            expected = [t + s for t, s in zip(expected, scores, strict=True)]
        else:
            expected = [t + s * weight for t, s in zip(expected, scores, strict=True)]
    assert _weighted_sum(weights)(*lists) == expected
    assert _weighted_sum([2.0])(lists[0]) == [0.0 + s * 2.0 for s in lists[0]]
    with pytest.raises(ValueError):
        _weighted_sum([1.0, 1.0])([1.0], [1.0, 2.0])  # a plugin giving too few scores


def test_ranking_without_ties_is_by_total_and_ties_stay_random() -> None:
    _, match, pods = cluster(5)
    for p, usage in zip(pods, (0.3, 0.1, 0.9, 0.0, 0.5), strict=True):
        p.state.kv_usage = usage
    decision = Scheduler([], [(GPUUsage(), 1.0)]).schedule(request(match, pods))
    assert [p.name for p in decision.candidates] == ["p3", "p1", "p0", "p4", "p2"]
    assert decision.weighted == [70.0, 90.0, pytest.approx(10.0), 100.0, 50.0]
    pods[1].state.kv_usage = 0.0  # p1 and p3 tie at the top
    firsts = Counter(
        Scheduler([], [(GPUUsage(), 1.0)], rng=random.Random(i))
        .schedule(request(match, pods))
        .candidates[0]
        .name
        for i in range(200)
    )
    assert set(firsts) == {"p1", "p3"} and min(firsts.values()) > 60


def test_one_pod_or_two_rank_as_lists() -> None:
    """The ranking picks pods with an itemgetter, which gives one index's pod bare."""
    _, match, (a, b, _c) = cluster()
    a.state.kv_usage, b.state.kv_usage = 0.5, 0.0
    scheduler = Scheduler([], [(GPUUsage(), 1.0)])
    assert scheduler.schedule(request(match, [a])).candidates == [a]
    assert scheduler.schedule(request(match, [a, b])).candidates == [b, a]


def test_the_same_plugin_twice_counts_twice() -> None:
    _, match, (a, b, _c) = cluster()
    a.state.kv_usage, b.state.kv_usage = 0.5, 0.0
    gpu = GPUUsage()
    decision = Scheduler([], [(gpu, 1.0), (gpu, 2.0)]).schedule(request(match, [a, b]))
    assert decision.weighted == [150.0, 300.0]


def test_a_scheduler_without_scores_ranks_at_random() -> None:
    _, match, (a, b, _c) = cluster()
    decision = Scheduler([], []).schedule(request(match, [a, b]))
    assert decision.weighted == [0.0, 0.0] and set(decision.candidates) == {a, b}
    scores = RandomScore(random.Random(2)).score(request(match, [a, b]), [a, b])
    assert len(scores) == 2 and all(0 <= s < 100 for s in scores)


def test_one_request_scores_match_a_fresh_scheduler() -> None:
    """Kept results over many requests and scrapes equal a new scheduler's each time."""
    _, match, pods = cluster(8)
    rng = random.Random(3)

    def make() -> Scheduler:
        prefix = PrefixCache(block_size=8)
        return Scheduler(
            [LeastRequest()],
            [(LeastRequest(), 1.0), (GPUUsage(), 1.0), (LeastLatency(), 1.0), (prefix, 1.0)],
            [prefix],
        )

    kept = make()
    for i in range(60):
        pod = rng.choice(pods)
        if i % 3 == 0:
            scrape(pod, waiting=rng.choice([0, 0, 12]), kv_usage=rng.random(),
                   ttft_sum=rng.random() * i, ttft_count=i, tpot_sum=rng.random() * i,
                   tpot_count=i)  # fmt: skip
        pod.in_flight = rng.randint(0, 4)
        candidates = rng.sample(pods, rng.randint(2, 8))
        req = SchedulingRequest("m", match, candidates, {"prompt": "q" * 40})
        got = kept.schedule(req)
        fresh = make().schedule(SchedulingRequest("m", match, candidates, {"prompt": "q" * 40}))
        assert got.filtered == fresh.filtered
        assert got.scored == fresh.scored
        assert {k: v for k, v in got.by_plugin.items() if k != "prefix-cache"} == {
            k: v for k, v in fresh.by_plugin.items() if k != "prefix-cache"
        }


def test_a_full_prefix_index_stays_small() -> None:
    """A hash with its holders costs ~150 bytes (an ordered dict per hash cost ~430: a full
    index of 50,000 was 23 MiB, as much as 1,000 open streams)."""
    import tracemalloc
    from types import SimpleNamespace

    from kthena.scheduler.plugins.prefix_cache import PrefixCache

    index = PrefixCache(max_hashes=100_000)
    pod = SimpleNamespace(key="default/pod-0")
    prompts = [SimpleNamespace(model="m", prompt=f"x{i:05d}" * 200, scratch={}) for i in range(200)]
    for prompt in prompts:
        index._hashes(prompt)  # the hashes are the request's, not the index's
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for prompt in prompts:
            index.scheduled(prompt, pod)  # type: ignore[arg-type]
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(index) > 3000
    assert grown / len(index) < 250


def test_a_decision_does_not_hold_the_rendered_prompt() -> None:
    """It lives as long as its request; the post-schedule hook reads the hashes the score
    left, so the index still learns the prompt."""
    _, match, pods = cluster(3)
    prefix = PrefixCache()
    scheduler = Scheduler([], [(prefix, 1.0)], [prefix])
    body = {"prompt": "a long shared system prompt " * 40}
    decision = scheduler.schedule(SchedulingRequest("m", match, pods, body))
    assert decision.request is not None
    assert decision.request._prompt is None
    scheduler.scheduled(decision, pods[1])
    again = scheduler.schedule(SchedulingRequest("m", match, pods, body))
    assert again.by_plugin["prefix-cache"] == [0.0, 100.0, 0.0]
