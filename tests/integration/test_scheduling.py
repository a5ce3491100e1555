"""
Scheduler plugins on live simulated pods, as Kthena's own e2e tests check them: each
plugin steers traffic where it should, its calls are timed into
C{kthena_router_scheduler_plugin_duration_seconds} and its decisions are recorded.
"""

from __future__ import annotations

import socket
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.defer import Deferred
from twisted.logger import capturedLogs, formatEvent

from kthena.config.router import parse_config
from kthena.record import RequestRecord
from kthena.service import RouterService
from kthena.sim.service import SimService
from tests.integration.router_helpers import LOOPBACK, Cluster, chat_body, inline
from tests.unit.routerfixtures import Doc, route, server, simple_route

CHAT = "/v1/chat/completions"
FAST_SCRAPES = {
    "interval": "100ms",
    "timeout": "80ms",
    "staleAfter": "2s",
    "modelsInterval": "100ms",
}


def scheduler(filters: list[str], scores: list[str]) -> dict[str, Any]:
    return {
        "plugins": {
            "Filter": {"enabled": filters},
            "Score": {"enabled": [{"name": s, "weight": 1} for s in scores]},
        }
    }


def one_model(
    cluster: Cluster, sims: list[SimService], names: list[str] | None = None, **spec: Any
) -> list[Doc]:
    names = names or [f"pod-{i}" for i in range(len(sims))]
    return [
        simple_route("r", "m", "srv"),
        server("srv", {"app": "srv"}, model="org/m", **spec),
        *(cluster.pod(name, sim, {"app": "srv"}) for name, sim in zip(names, sims, strict=True)),
    ]


def plugin_calls(router: RouterService, plugin: str, kind: str) -> float:
    text = generate_latest(router.registry).decode()
    for family in text_string_to_metric_families(text):
        if family.name == "kthena_router_scheduler_plugin_duration_seconds":
            return sum(
                s.value
                for s in family.samples
                if s.name.endswith("_count")
                and s.labels == {"model": "m", "plugin": plugin, "type": kind}
            )
    return 0.0


async def ready(cluster: Cluster, router: RouterService) -> None:
    await cluster.wait_for(lambda: router.plane.readiness.scraped, 5, "the first scrape round")
    await cluster.wait_for(
        lambda: all(p.state.scraped_at is not None for p in router.store.pods.values()),
        5,
        "every pod scraped: "
        + str([(p.name, p.state.last_error) for p in router.store.pods.values()]),
    )


def chosen(records: list[RequestRecord]) -> Counter[str]:
    return Counter(r.pod.name for r in records if r.pod is not None)


@inline
async def test_prefix_cache_keeps_a_prompt_on_one_pod(cluster: Cluster) -> None:
    sims = [cluster.sim("org/m") for _ in range(3)]
    router = cluster.router(
        one_model(cluster, sims),
        scheduler=scheduler(["least-request"], ["prefix-cache", "least-request"]),
        podMetrics=FAST_SCRAPES,
    )
    await ready(cluster, router)
    records = cluster.hook(router)
    system = "You are a careful assistant. " * 40  # a long shared prefix
    for i in range(200):
        body = {
            "model": "m",
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": "q"}],
            "max_tokens": 1,
        }
        assert (await cluster.post(router, CHAT, body)).status == 200, i
    _, count = chosen(records).most_common(1)[0]
    assert count >= 0.9 * 200, chosen(records)
    last = records[-1]
    assert last.decision is not None and last.pod is not None
    assert last.decision.scores[last.pod.key]["prefix-cache"] == 100.0
    assert plugin_calls(router, "prefix-cache", "score") == 200
    assert plugin_calls(router, "least-request", "filter") == 200


@inline
async def test_least_request_avoids_busy_pods(cluster: Cluster) -> None:
    sims = [cluster.sim("org/m", itl=0.05, output_tokens=400) for _ in range(3)]
    router = cluster.router(
        one_model(cluster, sims, ["busy-a", "busy-b", "idle"]),
        scheduler=scheduler([], ["least-request"]),
        podMetrics=FAST_SCRAPES,
    )
    await ready(cluster, router)
    # Keep two pods busy with sustained streams sent to them directly: only their own
    # metrics (scraped) can tell the router about this load.
    streams = [
        Deferred.fromCoroutine(
            cluster.stream(sim, CHAT, chat_body("org/m", stream=True, max_tokens=400))
        )
        for sim in (sims[0], sims[0], sims[1], sims[1])
    ]
    pods = router.store.pods
    await cluster.wait_for(
        lambda: (
            pods["default/busy-a"].state.running >= 2 and pods["default/busy-b"].state.running >= 2
        ),
        5,
        "the busy pods' load scraped",
    )
    records = cluster.hook(router)
    for _ in range(20):
        assert (await cluster.post(router, CHAT, chat_body("m", max_tokens=1))).status == 200
    assert chosen(records)["idle"] >= 18, chosen(records)
    assert plugin_calls(router, "least-request", "score") >= 20
    last = records[-1].decision
    assert last is not None and last.totals["default/idle"] == 100.0
    for d in streams:
        d.cancel()
        d.addErrback(lambda _: None)


@inline
async def test_gpu_usage_prefers_the_pod_with_free_kv_cache(cluster: Cluster) -> None:
    full = cluster.sim("org/m", itl=0.05, output_tokens=400)
    free = cluster.sim("org/m")
    router = cluster.router(
        one_model(cluster, [full, free], ["full", "free"]),
        scheduler=scheduler([], ["gpu-usage"]),
        podMetrics=FAST_SCRAPES,
    )
    await ready(cluster, router)
    # Fill the first pod's KV cache directly, bypassing the router.
    streams = [
        Deferred.fromCoroutine(
            cluster.stream(full, CHAT, chat_body("org/m", stream=True, max_tokens=400))
        )
        for _ in range(8)
    ]
    await cluster.wait_for(lambda: full.engine.num_running == 8, 5, "the busy pod to fill")
    await cluster.wait_for(
        lambda: router.store.pods["default/full"].state.kv_usage > 0, 5, "a scrape"
    )
    records = cluster.hook(router)
    for _ in range(20):
        assert (await cluster.post(router, CHAT, chat_body("m", max_tokens=1))).status == 200
    assert chosen(records)["free"] >= 18, chosen(records)
    for d in streams:
        d.cancel()
        d.addErrback(lambda _: None)


@inline
async def test_least_latency_prefers_the_fast_pool(cluster: Cluster) -> None:
    # 40x the prefill time (so 40x the TTFT) and twice the time per output token: far apart
    # on both figures the plugin blends, so that jitter on a loaded machine (the sims share
    # the test's reactor) can neither flip one nor make them tie (ties go either way).
    fast = cluster.sim("org/m", prefill_per_token=0.0005, itl=0.02)
    slow = cluster.sim("org/m", prefill_per_token=0.02, itl=0.04)
    router = cluster.router(
        one_model(cluster, [fast, slow], ["fast", "slow"]),
        scheduler=scheduler([], ["least-latency"]),
        podMetrics=FAST_SCRAPES,
    )
    await ready(cluster, router)
    # Warm both pods directly so each has a TTFT to compare; a loaded machine can make
    # one period's figure noisy, so keep warming until the scrapes tell them apart.
    pods = router.store.pods

    def apart() -> bool:
        return pods["default/slow"].state.ttft > 5 * pods["default/fast"].state.ttft > 0

    for _ in range(20):
        for sim in (fast, slow):
            await cluster.post(sim, CHAT, chat_body("org/m", max_tokens=2))
        await cluster.sleep(0.25)  # more than two scrape periods
        if apart():
            break
    assert apart(), [(p.name, p.state.ttft) for p in pods.values()]
    records = cluster.hook(router)
    for _ in range(30):
        assert (await cluster.post(router, CHAT, chat_body("m", max_tokens=2))).status == 200
    assert chosen(records)["fast"] >= 27, chosen(records)
    assert plugin_calls(router, "least-latency", "score") >= 30


@inline
async def test_lora_requests_only_reach_pods_with_the_adapter(cluster: Cluster) -> None:
    plain = [cluster.sim("org/m") for _ in range(2)]
    adapted = cluster.sim("org/m", loras=["sql"])
    router = cluster.router(
        [
            route("r", {"modelName": "m", "loraAdapters": ["sql"],
                        "rules": [{"targetModels": [{"modelServerName": "srv"}]}]}),
            server("srv", {"app": "srv"}, model="org/m"),
            *(cluster.pod(f"plain-{i}", s, {"app": "srv"}) for i, s in enumerate(plain)),
            cluster.pod("adapted", adapted, {"app": "srv"}),
        ],
        scheduler=scheduler(["lora-affinity"], ["random"]),
        podMetrics=FAST_SCRAPES,
    )  # fmt: skip
    await ready(cluster, router)
    await cluster.wait_for(
        lambda: "sql" in router.store.pods["default/adapted"].state.loras, 5, "adapters read"
    )
    records = cluster.hook(router)
    for _ in range(30):
        assert (await cluster.post(router, CHAT, chat_body("sql", max_tokens=1))).status == 200
    assert chosen(records) == {"adapted": 30}
    assert all(r.attempts == 1 for r in records)
    decision = records[-1].decision
    assert decision is not None and set(decision.filtered["lora-affinity"]) == {
        "plain-0",
        "plain-1",
    }


def adapter_on_one_of_three(cluster: Cluster, **settings: Any) -> RouterService:
    """Kthena's default plugins (no lora-affinity); lora-a is loaded on one pod of three."""
    plain = [cluster.sim("org/m") for _ in range(2)]
    adapted = cluster.sim("org/m", loras=["lora-a"])
    return cluster.router(
        [
            route("r", {"modelName": "m", "loraAdapters": ["lora-a"],
                        "rules": [{"targetModels": [{"modelServerName": "srv"}]}]}),
            server("srv", {"app": "srv"}, model="org/m"),
            *(cluster.pod(f"plain-{i}", s, {"app": "srv"}) for i, s in enumerate(plain)),
            cluster.pod("adapted", adapted, {"app": "srv"}),
        ],
        **settings,
    )  # fmt: skip


@pytest.mark.parametrize("scores", [None, ["random"]], ids=["kthena-defaults", "random"])
@inline
async def test_a_pod_without_the_adapter_passes_it_on(
    cluster: Cluster, scores: list[str] | None
) -> None:
    """
    Nothing tells the router who has the adapter (no scrapes): a pod without it answers
    404 naming it, the next candidate is tried, and nothing sticks to a wrong pod (the
    prefix index learns only from a 2xx). Random scoring sends first attempts everywhere,
    so the passing on surely shows.
    """
    settings: dict[str, Any] = {"podMetrics": {"enabled": False}}
    if scores is not None:
        settings["scheduler"] = scheduler([], scores)
    router = adapter_on_one_of_three(cluster, **settings)
    records = cluster.hook(router)
    for _ in range(28):
        assert (await cluster.post(router, CHAT, chat_body("lora-a", max_tokens=1))).status == 200
    assert chosen(records) == {"adapted": 28}
    passed_on = [why for r in records for _, why in r.failed_attempts or []]
    assert all(why.endswith("does not serve the model (404)") for why in passed_on)
    if scores is not None:
        assert passed_on  # about two thirds of first attempts went to a pod without it
    assert all(p.outlier.consecutive_failures == 0 for p in router.store.pods.values())


@inline
async def test_the_pod_with_the_adapter_comes_first_once_known(cluster: Cluster) -> None:
    router = adapter_on_one_of_three(cluster, podMetrics=FAST_SCRAPES)
    await ready(cluster, router)
    await cluster.wait_for(
        lambda: router.store.pods["default/adapted"].serves_adapter("lora-a"), 5, "models"
    )
    records = cluster.hook(router)
    for _ in range(28):
        assert (await cluster.post(router, CHAT, chat_body("lora-a", max_tokens=1))).status == 200
    assert chosen(records) == {"adapted": 28}
    assert all(r.attempts == 1 for r in records)


@inline
async def test_random_spreads_uniformly(cluster: Cluster) -> None:
    sims = [cluster.sim("org/m", itl=0.0, output_tokens=1) for _ in range(3)]
    router = cluster.router(
        one_model(cluster, sims), scheduler=scheduler([], ["random"]), podMetrics=FAST_SCRAPES
    )
    await ready(cluster, router)
    records = cluster.hook(router)
    await cluster.many(600, 8, lambda i: cluster.post(router, CHAT, chat_body("m", max_tokens=1)))
    counts = chosen(records)
    # Within 10 points of a third each; the unit test holds 3,000 draws to 10% of a third.
    assert set(counts) == {"pod-0", "pod-1", "pod-2"}
    assert all(abs(n / 600 - 1 / 3) <= 0.1 for n in counts.values()), counts
    assert plugin_calls(router, "random", "score") == 600


@inline
async def test_a_pod_failing_its_scrapes_is_taken_out_and_comes_back(cluster: Cluster) -> None:
    sims = [cluster.sim("org/m") for _ in range(2)]
    router = cluster.router(
        one_model(cluster, sims, ["good", "flaky"]),
        scheduler=scheduler([], ["random"]),
        podMetrics={**FAST_SCRAPES, "unhealthyAfter": 2},
    )
    await ready(cluster, router)
    flaky = router.store.pods["default/flaky"]
    await cluster.request(sims[1], "PUT", "/sim/faults", {"metrics_down": True})
    await cluster.wait_for(lambda: flaky.state.consecutive_failures >= 2, 5, "two failed scrapes")
    records = cluster.hook(router)
    for _ in range(30):
        assert (await cluster.post(router, CHAT, chat_body("m", max_tokens=1))).status == 200
    assert chosen(records) == {"good": 30}
    await cluster.request(sims[1], "DELETE", "/sim/faults")
    await cluster.wait_for(lambda: flaky.state.consecutive_failures == 0, 5, "a good scrape")
    records.clear()
    for _ in range(60):
        assert (await cluster.post(router, CHAT, chat_body("m", max_tokens=1))).status == 200
    assert chosen(records)["flaky"] > 10, chosen(records)


@inline
async def test_no_healthy_pod_left_schedules_among_all_and_counts_it(cluster: Cluster) -> None:
    sims = [cluster.sim("org/m") for _ in range(2)]
    router = cluster.router(
        one_model(cluster, sims),
        scheduler=scheduler([], ["random"]),
        podMetrics={**FAST_SCRAPES, "unhealthyAfter": 1},
    )
    await ready(cluster, router)
    for sim in sims:
        await cluster.request(sim, "PUT", "/sim/faults", {"metrics_down": True})
    await cluster.wait_for(
        lambda: all(p.state.consecutive_failures for p in router.store.pods.values()),
        5,
        "both pods failing their scrapes",
    )
    for _ in range(5):  # better a slow answer than none
        assert (await cluster.post(router, CHAT, chat_body("m", max_tokens=1))).status == 200
    text = generate_latest(router.registry).decode()
    assert 'kthena_router_unhealthy_fallbacks_total{model_server="default/srv"} 5.0' in text


@inline
async def test_model_server_and_lb_gauges_follow_the_pods(cluster: Cluster) -> None:
    sims = [cluster.sim("org/m", gpus=2, itl=0.05, output_tokens=100) for _ in range(2)]
    router = cluster.router(
        one_model(cluster, sims), scheduler=scheduler([], ["random"]), podMetrics=FAST_SCRAPES
    )
    await ready(cluster, router)
    assert (await cluster.post(router, CHAT, chat_body("m", max_tokens=1))).status == 200

    def gauges() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        text = generate_latest(router.registry).decode()
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text)
            for s in f.samples
            if s.name.startswith(("kthena_model_server_", "kthena_lb_"))
        }

    await cluster.wait_for(lambda: bool(gauges()), 5, "a scrape round")
    now = gauges()
    server = (("model_server", "default/srv"),)
    assert now[("kthena_model_server_health_status", (*server, ("namespace", "default")))] == 1
    assert ("kthena_model_server_gpu_utilization", (("gpu_id", "0"), *server)) in now
    assert now[("kthena_model_server_memory_usage_bytes", (*server, ("type", "gpu")))] > 0
    assert now[("kthena_lb_target_health", (("model", "org/m"), ("target", "default/pod-0")))] == 1
    assert any(name == "kthena_lb_decisions_total" for name, _ in now)
    # Queue depth: fill one pod past its slots, directly.
    sims[0].engine.config.max_num_seqs = 1
    streams = [
        Deferred.fromCoroutine(
            cluster.stream(sims[0], CHAT, chat_body("org/m", stream=True, max_tokens=100))
        )
        for _ in range(3)
    ]
    depth = ("kthena_model_server_queue_depth", (("model", "org/m"), *server))
    await cluster.wait_for(lambda: gauges().get(depth, 0) >= 2, 5, "the queue depth scraped")
    # A pod that leaves the config takes its series with it.
    keep = [d for d in one_model(cluster, sims) if d["metadata"]["name"] != "pod-1"]
    router.reconfigure(parse_config({"resources": keep}, "<reloaded>", Path.cwd(), []))
    target = ("kthena_lb_target_health", (("model", "org/m"), ("target", "default/pod-1")))
    await cluster.wait_for(lambda: target not in gauges(), 5, "pod-1's series removed")
    for d in streams:
        d.cancel()
        d.addErrback(lambda _: None)


@inline
async def test_ready_after_the_first_round_and_new_pods_scraped_at_once(cluster: Cluster) -> None:
    sims = [cluster.sim("org/m") for _ in range(2)]
    silent = socket.socket()  # accepts connections (the backlog) and never answers
    silent.bind((LOOPBACK, 0))
    silent.listen(8)
    try:
        router = cluster.router(
            [
                *one_model(cluster, sims[:1]),
                cluster.pod("silent", silent.getsockname()[1], {"app": "srv"}),
            ],
            scheduler=scheduler([], ["random"]),
            podMetrics={"interval": "10s", "timeout": "1s"},
        )
        # The first round waits for the silent pod's scrape to time out.
        assert (await cluster.request(router, "GET", "/readyz")).status == 503
        await cluster.wait_for(lambda: router.plane.readiness.scraped, 5, "the first round")
        assert (await cluster.request(router, "GET", "/readyz")).status == 200
    finally:
        silent.close()
    router.reconfigure(parse_config({"resources": one_model(cluster, sims)}, "<r>", Path.cwd(), []))
    new = router.store.pods["default/pod-1"]
    # The next round is 10 s away: the new pod is scraped now.
    await cluster.wait_for(lambda: new.state.scraped_at is not None, 3, "the new pod scraped")


@inline
async def test_dead_pods_log_once_each_not_once_a_scrape(cluster: Cluster) -> None:
    """Three pods that refuse connections, scraped ten times a second for a second."""
    dead = []
    for _ in range(3):
        closed = socket.socket()
        closed.bind((LOOPBACK, 0))
        dead.append(closed.getsockname()[1])
        closed.close()  # nothing listens there now: connections are refused
    with capturedLogs() as events:
        router = cluster.router(
            [
                simple_route("r", "m", "srv"),
                server("srv", {"app": "srv"}, model="org/m"),
                *(cluster.pod(f"dead-{i}", port, {"app": "srv"}) for i, port in enumerate(dead)),
            ],
            podMetrics=FAST_SCRAPES,
        )
        await cluster.sleep(1.0)
    assert all(p.state.consecutive_failures >= 5 for p in router.store.pods.values())
    texts = [formatEvent(e) for e in events]
    assert not [t for t in texts if "factory" in t.lower()], texts
    failures = [t for t in texts if "scraping pod" in t]
    assert len(failures) == 3, texts  # one line per pod going down
    assert all("connection refused" in t for t in failures), failures
    assert len(texts) < 15, texts


@pytest.mark.parametrize(
    ("faults", "stream"),
    [
        ({"error_rate": 1, "error_status": 503}, False),
        ({"abort_rate": 1}, False),
        ({"drop_after_tokens": 1}, True),
    ],
    ids=["503-at-once", "abort-before-headers", "cut-streams"],
)
@inline
async def test_a_pod_failing_fast_gets_few_first_attempts(
    cluster: Cluster, faults: dict[str, Any], stream: bool
) -> None:
    """
    One pod of three fails every request at once; with Kthena's default plugins it looks
    least loaded. Outlier detection keeps it to a few first attempts.
    """
    sims = [cluster.sim("org/m", output_tokens=4, itl=0.005) for _ in range(3)]
    bad = sims[0]
    assert (await cluster.request(bad, "PUT", "/sim/faults", faults)).status == 200
    router = cluster.router(
        one_model(
            cluster, sims, ["bad", "good-1", "good-2"],
            trafficPolicy={"retry": {"attempts": 2, "retryInterval": "0s"}},
        ),
        podMetrics=FAST_SCRAPES,
    )  # fmt: skip
    await ready(cluster, router)
    records = cluster.hook(router)

    async def send(i: int) -> Any:
        body = chat_body("m", max_tokens=4, stream=stream)
        if stream:
            return await cluster.stream(router, CHAT, body)
        return await cluster.post(router, CHAT, body)

    await cluster.many(100, 4, send)
    firsts = Counter(
        (r.failed_attempts[0][0] if r.failed_attempts else r.pod.name)
        for r in records
        if r.pod is not None
    )
    assert sum(firsts.values()) == 100
    assert firsts["bad"] <= 10, firsts
    assert router.store.pods["default/bad"].outlier.ejections >= 1
