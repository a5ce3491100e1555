#!/usr/bin/env python3
"""
Scheduling cost per request: the framework with every plugin on (least-request filter,
lora-affinity filter, and the least-request, gpu-usage, least-latency, prefix-cache and
random scores), at 10 and 100 pods with varied live state, a chat prompt of ~2 kB and a
prefix index warmed by earlier requests. Pure CPU, in process; prints microseconds per
schedule() call and its post-schedule hooks (mean and p99 over the run). C{--timer} times
every plugin call into the router's own histogram, as the router does.

    python3 bench/scheduler_bench.py [--requests 20000] [--timer]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kthena.config.router import parse_config
from kthena.config.scheduler import SchedulerConfig
from kthena.scheduler.build import build_scheduler
from kthena.scheduler.framework import SchedulingRequest, Timer
from kthena.store import Datastore

ALL = SchedulerConfig(
    filters=("least-request", "lora-affinity"),
    scores=(
        ("least-request", 1.0),
        ("gpu-usage", 1.0),
        ("least-latency", 1.0),
        ("prefix-cache", 1.0),
        ("random", 1.0),
    ),
)


def cluster(pods: int) -> Datastore:
    docs = [
        {
            "apiVersion": "networking.serving.volcano.sh/v1alpha1",
            "kind": "ModelRoute",
            "metadata": {"name": "r"},
            "spec": {"modelName": "m", "rules": [{"targetModels": [{"modelServerName": "s"}]}]},
        },
        {
            "apiVersion": "networking.serving.volcano.sh/v1alpha1",
            "kind": "ModelServer",
            "metadata": {"name": "s"},
            "spec": {"inferenceEngine": "vLLM", "workloadSelector": {"matchLabels": {"a": "s"}}},
        },
    ]
    docs += [
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": f"p{i}", "labels": {"a": "s"}},
            "status": {
                "podIP": f"10.0.{i // 250}.{i % 250 + 1}",
                "phase": "Running",
                "conditions": [{"type": "Ready", "status": "True"}],
            },
        }
        for i in range(pods)
    ]
    config = parse_config({"resources": docs}, "bench", Path("."), [])
    store = Datastore(random.Random(1))
    store.replace(config.resources)
    rng = random.Random(2)
    for pod in store.pods.values():
        pod.state.waiting = rng.choice([0, 0, 0, 1, 3])
        pod.state.running = rng.randint(0, 32)
        pod.state.kv_usage = rng.random()
        pod.state.ttft = rng.uniform(0.05, 0.5)
        pod.state.tpot = rng.uniform(0.01, 0.05)
        pod.in_flight = rng.randint(0, 8)
    return store


def run(pods: int, requests: int, timer: Timer | None = None) -> tuple[float, float]:
    store = cluster(pods)
    match = store.match("m", lambda name: "", "/v1/chat/completions")
    assert match is not None
    candidates = store.server_pods(match.server)
    scheduler = build_scheduler(ALL, timer)
    system = "You are a helpful assistant who answers briefly and precisely. " * 30
    bodies = [
        {
            "model": "m",
            "messages": [
                {"role": "system", "content": system},
                {"role": "user", "content": f"question number {i % 50}"},
            ],
        }
        for i in range(100)
    ]
    for body in bodies:  # warm the prefix index
        decision = scheduler.schedule(SchedulingRequest("m", match, candidates, body))
        scheduler.scheduled(decision, decision.candidates[0])
    samples = []
    for i in range(requests):
        request = SchedulingRequest("m", match, candidates, bodies[i % len(bodies)])
        started = time.perf_counter()
        decision = scheduler.schedule(request)
        scheduler.scheduled(decision, decision.candidates[0])
        samples.append(time.perf_counter() - started)
    samples.sort()
    return statistics.fmean(samples) * 1e6, samples[int(len(samples) * 0.99)] * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--timer", action="store_true", help="time plugins as the router does")
    args = parser.parse_args()
    timer = None
    if args.timer:
        from prometheus_client import CollectorRegistry

        from kthena.observability.metrics import RouterMetrics

        timer = RouterMetrics(CollectorRegistry(), None).plugin_timer
    print(f"{'pods':>6}{'mean us':>10}{'p99 us':>10}")
    for pods in (10, 100):
        mean, p99 = run(pods, args.requests, timer)
        print(f"{pods:>6}{mean:>10.1f}{p99:>10.1f}")


if __name__ == "__main__":
    main()
