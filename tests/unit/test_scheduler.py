"""The scheduling framework, each plugin's arithmetic, and the scheduler config section."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.task import Clock
from zope.interface.verify import verifyObject

from kthena.config.router import parse_config
from kthena.config.scheduler import SchedulerConfig, parse_scheduler
from kthena.config.validate import ConfigError, Where
from kthena.interfaces import IFilterPlugin, IPostScheduleHook, IScheduler, IScorePlugin
from kthena.pipeline.health import Health
from kthena.pipeline.schedule import Scheduling
from kthena.pods import PodEndpoint
from kthena.prompt import render as render_prompt
from kthena.ratelimit.estimate import CharsEstimator
from kthena.scheduler.build import build_scheduler, check_scheduler
from kthena.scheduler.framework import Scheduler, SchedulingRequest
from kthena.scheduler.plugins import PLUGINS
from kthena.scheduler.plugins.gpu_usage import GPUUsage
from kthena.scheduler.plugins.least_latency import LeastLatency
from kthena.scheduler.plugins.least_request import LeastRequest
from kthena.scheduler.plugins.lora_affinity import LoraAffinity
from kthena.scheduler.plugins.prefix_cache import PrefixCache, prefix_hashes
from kthena.scheduler.plugins.random_score import RandomScore
from kthena.service import load
from kthena.store import Datastore, RouteMatch
from tests.unit.routerfixtures import pod, route, server, simple_route


def cluster(count: int = 3) -> tuple[Datastore, RouteMatch, list[PodEndpoint]]:
    config = parse_config(
        {
            "resources": [
                simple_route("r", "m", "srv"),
                route(
                    "l",
                    {
                        "loraAdapters": ["sql"],
                        "rules": [{"targetModels": [{"modelServerName": "srv"}]}],
                    },
                ),
                server("srv", {"app": "a"}),
                *(pod(f"p{i}", f"10.0.0.{i + 1}", {"app": "a"}) for i in range(count)),
            ]
        },
        "t",
        Path("."),
        [],
    )
    store = Datastore(random.Random(1))
    store.replace(config.resources)
    match = store.match("m", lambda name: "", "/v1/completions")
    assert match is not None
    pods = sorted(store.server_pods(match.server), key=lambda p: p.name)
    return store, match, pods


def request(
    match: RouteMatch, pods: list[PodEndpoint], body: dict[str, Any] | None = None
) -> SchedulingRequest:
    return SchedulingRequest("m", match, pods, body or {"model": "m", "prompt": "hi"})


def test_plugins_provide_their_interfaces() -> None:
    for name, cls in PLUGINS.items():
        plugin = cls.from_args({})
        assert plugin.name == name
        provided = [
            i for i in (IFilterPlugin, IScorePlugin, IPostScheduleHook) if i.providedBy(plugin)
        ]
        assert provided, name
        for interface in provided:
            assert verifyObject(interface, plugin)
    assert verifyObject(IScheduler, build_scheduler(SchedulerConfig()))


def test_least_request_filter_and_score() -> None:
    _, match, (a, b, c) = cluster()
    a.state.waiting, b.state.waiting, c.state.waiting = 0, 9, 10
    a.state.running, b.state.running = 4, 0
    plugin = LeastRequest(max_waiting_requests=10)
    assert plugin.filter(request(match, [a, b, c]), [a, b, c]) == [a, b]
    scores = plugin.score(request(match, [a, b]), [a, b])
    # base: a = 4 + 0, b = 0 + 100*9 = 900 -> a: (900-4)/900*100, b: 0
    assert scores == [pytest.approx(896 / 900 * 100), 0]
    # The router's own in-flight count shows load before a scrape does.
    b.state.waiting = 0
    b.in_flight = 8
    scores = plugin.score(request(match, [a, b]), [a, b])
    assert scores[0] > scores[1]
    # Requests the router saw finish since the scrape no longer count as running.
    b.in_flight = 0
    b.state.running = 6
    b.state.finished = 6
    assert plugin.score(request(match, [a, b]), [a, b]) == [0.0, 100.0]
    a.state.running = a.in_flight = 0
    assert plugin.score(request(match, [a, b]), [a, b]) == [100.0, 100.0]


def test_gpu_usage() -> None:
    _, match, (a, b, _c) = cluster()
    a.state.kv_usage, b.state.kv_usage = 0.25, 0.9
    scores = GPUUsage().score(request(match, [a, b]), [a, b])
    assert scores == [75.0, pytest.approx(10.0)]


def test_least_latency_normalises_and_blends() -> None:
    _, match, (a, b, c) = cluster()
    a.state.ttft, a.state.tpot = 0.1, 0.02
    b.state.ttft, b.state.tpot = 1.1, 0.01
    # c never observed: shares the top score
    scores = LeastLatency(0.5).score(request(match, [a, b, c]), [a, b, c])
    assert scores == [pytest.approx(100 * 0.5 + 0 * 0.5), pytest.approx(0 * 0.5 + 100 * 0.5), 100.0]
    ttft_only = LeastLatency(1.0).score(request(match, [a, b]), [a, b])
    assert ttft_only == [pytest.approx(100.0), pytest.approx(0.0)]


def test_lora_affinity() -> None:
    store, _, (a, b, c) = cluster()
    lora = store.match("sql", lambda name: "", "/")
    assert lora is not None and lora.is_lora
    a.state.loras = frozenset({"sql"})
    sql_request = SchedulingRequest("sql", lora, [a, b, c], {"model": "sql"})
    assert LoraAffinity().filter(sql_request, [a, b, c]) == [a]
    base = store.match("m", lambda name: "", "/")
    assert base is not None
    assert LoraAffinity().filter(request(base, [a, b, c]), [a, b, c]) == [a, b, c]


def test_prefix_hashes_chain() -> None:
    one = prefix_hashes("m", "a" * 200, 64, 128)
    two = prefix_hashes("m", "a" * 150 + "b" * 50, 64, 128)
    assert len(one) == 4 and one[:2] == two[:2] and one[2:] != two[2:]
    assert prefix_hashes("other", "a" * 200, 64, 128)[0] != one[0]  # the model seeds it
    assert len(prefix_hashes("m", "a" * 10_000, 64, 3)) == 3


def test_prefix_cache_scores_the_longest_match_and_learns() -> None:
    _, match, (a, b, c) = cluster()
    plugin = PrefixCache(block_size=8, max_blocks=100, max_hashes=1000, top_k=5)
    long_prompt = {"model": "m", "prompt": "x" * 80}
    first = request(match, [a, b, c], long_prompt)
    assert plugin.score(first, [a, b, c]) == [0.0, 0.0, 0.0]
    plugin.scheduled(first, b)
    again = request(match, [a, b, c], long_prompt)
    assert plugin.score(again, [a, b, c]) == [0.0, 100.0, 0.0]
    half = request(match, [a, b, c], {"model": "m", "prompt": "x" * 40 + "y" * 40})
    assert plugin.score(half, [a, b, c])[1] == pytest.approx(50.0)
    plugin.forget_pods({b.key})
    assert plugin.score(again, [a, b, c]) == [0.0, 0.0, 0.0]
    assert len(plugin) == 0


def test_prefix_cache_memory_is_bounded() -> None:
    _, match, (a, _b, _c) = cluster()
    plugin = PrefixCache(block_size=4, max_blocks=10, max_hashes=50, top_k=2)
    for i in range(100):
        plugin.scheduled(request(match, [a], {"model": "m", "prompt": f"{i:040d}"}), a)
    assert len(plugin) == 50


def test_framework_filters_weights_ties_and_records() -> None:
    _, match, (a, b, c) = cluster()
    a.state.waiting = 50  # filtered out by least-request
    b.state.kv_usage = 0.0
    c.state.kv_usage = 0.5
    timings: list[tuple[str, str, str]] = []
    scheduler = Scheduler(
        [LeastRequest()],
        [(GPUUsage(), 2.0), (LeastRequest(), 1.0)],
        timer=lambda model, plugin, kind, seconds: timings.append((model, plugin, kind)),
        rng=random.Random(3),
    )
    decision = scheduler.schedule(request(match, [a, b, c]))
    assert decision.candidates == [b, c]
    assert decision.filtered == {"least-request": ["p0"]}
    assert decision.scores[b.key] == {"gpu-usage": 100.0, "least-request": 100.0}
    assert decision.totals[c.key] == pytest.approx(50.0 * 2 + 100.0)
    assert timings == [
        ("m", "least-request", "filter"),
        ("m", "gpu-usage", "score"),
        ("m", "least-request", "score"),
    ]
    assert "p1" in decision.why() and "least-request removed p0" in decision.why()
    # Equal totals: either order turns up.
    c.state.kv_usage = 0.0
    tie = Counter(
        Scheduler([], [(GPUUsage(), 1.0)], rng=random.Random(i))
        .schedule(request(match, [b, c]))
        .candidates[0]
        .name
        for i in range(200)
    )
    assert set(tie) == {"p1", "p2"} and min(tie.values()) > 60


def test_a_filter_leaving_nothing_fails_scheduling() -> None:
    _, match, pods = cluster()
    for p in pods:
        p.state.waiting = 100
    decision = Scheduler([LeastRequest()], [(GPUUsage(), 1.0)]).schedule(request(match, pods))
    assert decision.candidates == []
    assert decision.failed_filter == "least-request"
    assert decision.why() == "filter least-request left no pod"


def test_random_is_uniform() -> None:
    _, match, pods = cluster()
    scheduler = Scheduler([], [(RandomScore(random.Random(5)), 1.0)], rng=random.Random(6))
    picks = Counter(
        scheduler.schedule(request(match, pods)).candidates[0].name for _ in range(3000)
    )
    # each pod's share within +-10% of uniform
    assert all(abs(n / 3000 - 1 / 3) < 0.1 / 3 for n in picks.values())
    assert set(picks) == {"p0", "p1", "p2"}


def test_post_schedule_hooks_learn_through_the_scheduler() -> None:
    _, match, pods = cluster()
    scheduler = build_scheduler(SchedulerConfig())
    body = {"model": "m", "prompt": "z" * 640}
    first = scheduler.schedule(request(match, pods, body))
    served = first.candidates[0]
    scheduler.scheduled(first, served)
    second = scheduler.schedule(request(match, pods, body))
    assert second.candidates[0] is served
    assert second.scores[served.key]["prefix-cache"] == 100.0


def test_render_prompt_is_chatml() -> None:
    body = {"messages": [{"role": "user", "content": "hello world"}]}
    assert render_prompt(body) == "<|im_start|>user\nhello world<|im_end|>\n"
    assert render_prompt({"prompt": "p"}) == "p"


def parse(section: Any) -> SchedulerConfig:
    return parse_config({"scheduler": section}, "router.yaml", Path("."), []).scheduler


def test_kthena_format() -> None:
    config = parse(
        {
            "pluginConfig": [
                {"name": "least-request", "args": {"maxWaitingRequests": 5}},
                {"name": "least-latency", "args": {"TTFTTPOTWeightFactor": 0.7}},
                {"name": "prefix-cache", "args": {"blockSizeToHash": 32}},
            ],
            "plugins": {
                "Filter": {
                    "enabled": ["least-request", "lora-affinity"],
                    "disabled": ["lora-affinity"],
                },
                "Score": {
                    "enabled": [{"name": "least-latency", "weight": 2}, {"name": "prefix-cache"}]
                },
            },
        }
    )
    assert config.filters == ("least-request",)
    assert config.scores == (("least-latency", 2.0), ("prefix-cache", 1.0))
    scheduler = build_scheduler(config)
    assert scheduler.filters[0].max_waiting_requests == 5  # type: ignore[attr-defined]
    assert scheduler.scores[0][0].factor == 0.7  # type: ignore[attr-defined]
    assert scheduler.scores[1][0].block_size == 32  # type: ignore[attr-defined]
    assert parse(None) == SchedulerConfig()


@pytest.mark.parametrize(
    ("section", "message"),
    [
        (
            {"pluginConfig": [{"name": "nope"}]},
            "scheduler.pluginConfig[0].name: unknown plugin 'nope'",
        ),
        (
            {"pluginConfig": [{"name": "least-request", "args": {"maxWaiting": 1}}]},
            "scheduler.pluginConfig[0].args: least-request: unknown argument 'maxWaiting'",
        ),
        (
            {"pluginConfig": [{"name": "least-latency", "args": {"TTFTTPOTWeightFactor": 2}}]},
            "TTFTTPOTWeightFactor must be from 0 to 1",
        ),
        ({"plugins": {"Filter": {"enabled": ["gpu-usage"]}}}, "gpu-usage is not a filter plugin"),
        (
            {"plugins": {"Score": {"enabled": [{"name": "lora-affinity"}]}}},
            "scheduler.plugins.Score.enabled[0].name: lora-affinity is not a score plugin",
        ),
        (
            {"plugins": {"Score": {"enabled": [{"name": "random", "weight": -1}]}}},
            "scheduler.plugins.Score.enabled[0].weight: must be at least 0",
        ),
        ({"plugin": {}}, "scheduler.plugin: unknown field"),
    ],
)
def test_scheduler_config_errors(section: Any, message: str) -> None:
    """The config reads the section; the scheduler checks its plugins (at load, whole)."""
    with pytest.raises(ConfigError) as e:
        check_scheduler(parse(section))
    assert message in str(e.value)


def test_a_router_config_is_loaded_with_its_plugins_checked(tmp_path: Path) -> None:
    path = tmp_path / "router.yaml"
    path.write_text("scheduler: {plugins: {Filter: {enabled: [gpu-usage]}}}\n")
    with pytest.raises(ConfigError) as e:
        load(str(path))
    assert str(e.value) == (
        f"{path}: scheduler.plugins.Filter.enabled[0]: gpu-usage is not a filter plugin"
    )


def test_least_latency_ignores_noise_level_differences() -> None:
    _, match, (a, b, _c) = cluster()
    a.state.ttft, a.state.tpot = 0.100, 0.0200
    b.state.ttft, b.state.tpot = 0.105, 0.0195  # within 10%: alike
    assert LeastLatency(0.5).score(request(match, [a, b]), [a, b]) == [100.0, 100.0]
    b.state.ttft = 1.0  # 10x: not alike
    assert LeastLatency(0.5).score(request(match, [a, b]), [a, b]) == pytest.approx([100.0, 50.0])


def test_the_scheduler_follows_a_reload() -> None:
    docs = [simple_route("r", "m", "srv"), server("srv", {"app": "a"})]
    first = parse_config({"resources": docs}, "t", Path("."), [])
    store = Datastore()
    store.replace(first.resources)
    scheduling = Scheduling(store, Health(store, Clock(), None, None), CharsEstimator(), first)  # type: ignore[arg-type]
    algorithm = scheduling.scheduler.algorithm  # type: ignore[attr-defined]
    assert algorithm == "least-request+gpu-usage+least-latency+prefix-cache"
    same = scheduling.scheduler
    scheduling.reconfigure(parse_config({"resources": docs}, "t", Path("."), []))
    assert scheduling.scheduler is same  # unchanged section: the prefix index is kept
    scheduling.reconfigure(
        parse_config(
            {
                "resources": docs,
                "scheduler": {"plugins": {"Score": {"enabled": [{"name": "random"}]}}},
            },
            "t",
            Path("."),
            [],
        )
    )
    assert scheduling.scheduler is not same
    assert scheduling.scheduler.algorithm == "random"  # type: ignore[attr-defined]


def test_pods_serving_an_adapter_come_first_without_lora_affinity() -> None:
    store, _, (a, b, c) = cluster()
    match = store.match("sql", lambda name: "", "/v1/completions")
    assert match is not None and match.is_lora
    c.state.loras = frozenset({"sql"})
    a.state.kv_usage, b.state.kv_usage, c.state.kv_usage = 0.0, 0.1, 0.9  # c scores worst
    scheduler = Scheduler([], [(GPUUsage(), 1.0)])
    decision = scheduler.schedule(SchedulingRequest("sql", match, [a, b, c], {"prompt": "x"}))
    assert decision.candidates == [c, a, b]  # the holder, then the rest as ranked
    plain = scheduler.schedule(request(match, [a, b, c]))  # not an adapter request: ranked
    assert plain.candidates == [a, b, c]


def test_prefix_entries_count_block_pod_pairs() -> None:
    _, match, (a, b, c) = cluster()
    prefix = PrefixCache(block_size=4, max_hashes=3, top_k=1)
    scheduler = Scheduler([], [(prefix, 1.0)], [prefix])
    body = {"model": "m", "prompt": "aaaabbbb"}  # two blocks
    decision = scheduler.schedule(request(match, [a, b], body))
    scheduler.scheduled(decision, a)
    scheduler.scheduled(decision, a)  # again: nothing new
    assert (prefix.entries, scheduler.prefix_entries()) == (2, 2)
    scheduler.scheduled(decision, b)
    scheduler.scheduled(decision, c)  # top_k 1: at most 2 holders per block
    assert prefix.entries == 4
    other = request(match, [a], {"model": "m", "prompt": "ccccdddd"})
    scheduler.scheduled(scheduler.schedule(other), a)  # max 3 hashes: one block evicted
    assert len(prefix) == 3
    assert prefix.entries == sum(len(h) for h in prefix._index.values())
    scheduler.forget_pods({b.key, c.key})
    assert prefix.entries == sum(len(h) for h in prefix._index.values())


def test_one_pod_left_is_still_scored_as_kthena_does() -> None:
    """Kthena always runs the score plugins (scheduler_impl.go): their timings show."""
    _, match, (a, b, _c) = cluster()
    b.state.waiting = 50  # the filter leaves a alone
    calls: list[tuple[str, str]] = []
    scheduler = Scheduler(
        [LeastRequest()],
        [(GPUUsage(), 1.0)],
        timer=lambda model, plugin, kind, seconds: calls.append((plugin, kind)),
    )
    decision = scheduler.schedule(request(match, [a, b]))
    assert decision.candidates == [a]
    assert calls == [("least-request", "filter"), ("gpu-usage", "score")]
    assert decision.why().startswith("p0: total ")


def test_one_pod_left_is_not_ranked_when_configured() -> None:
    _, match, (a, b, _c) = cluster()
    b.state.waiting = 50
    calls: list[tuple[str, str]] = []
    config = parse_scheduler(
        {"skipScoresForOnePod": True, "plugins": {"Score": {"enabled": [{"name": "gpu-usage"}]}}},
        Where("t"),
    )
    scheduler = build_scheduler(
        config, lambda model, plugin, kind, seconds: calls.append((plugin, kind))
    )
    decision = scheduler.schedule(request(match, [a, b]))
    assert decision.candidates == [a]
    assert calls == [("least-request", "filter")]
    assert decision.why() == "p0: the only pod left, nothing to rank"
