#!/usr/bin/env python3
"""
Routing quality on a shared-prefix workload, as in Kthena's published benchmark: groups of
requests share a long system prompt; a pod that has a group's prefix cached prefills only
the question. Each pod's prefix cache holds a few groups, not all of them, so where the
router sends a group decides the hit rate, hence TTFT and throughput.

For each scheduler configuration, fresh kthena-sim pods (separate processes) and a fresh
router (`twistd kthena-router`, pinned to CPU 0) take a closed-loop load of streaming
chat requests for a bounded time; the client measures TTFT (first token) and completed
requests per second, and the pods report their prefix-cache hit rate.

    python3 bench/routing_quality.py [--seconds 20] [--concurrency 32]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from sim_streams import StreamResult, http_get, run_stream

ROOT = Path(__file__).resolve().parents[1]
TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")
PODS = [f"127.0.0.{31 + i}" for i in range(4)]
ROUTER = ("127.0.0.1", 18095)

CONFIGS: dict[str, list[tuple[str, float]]] = {
    "random": [("random", 1)],
    "least-request": [("least-request", 1)],
    "least-request + prefix-cache": [("least-request", 1), ("prefix-cache", 1)],
    "kthena default": [
        ("least-request", 1), ("gpu-usage", 1), ("least-latency", 1), ("prefix-cache", 1),
    ],
}  # fmt: skip


def system_prompts(groups: int, words: int, rng: random.Random) -> list[str]:
    vocabulary = [f"w{rng.randrange(100_000)}" for _ in range(4000)]
    return [" ".join(rng.choice(vocabulary) for _ in range(words)) for _ in range(groups)]


def start_sims(args: argparse.Namespace, workdir: Path) -> list[subprocess.Popen[bytes]]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    sims = []
    for host in PODS:
        sims.append(
            subprocess.Popen(
                ["taskset", "-c", "1", TWISTD, "-n", "--pidfile=", "kthena-sim",
                 "--model", "bench-model", "--listen", f"tcp:8000:interface={host}",
                 "--max-num-seqs", "16", "--itl", "0.01", "--output-tokens", "16",
                 "--prefill-per-token", str(args.prefill_per_token),
                 "--kv-blocks", "4096", "--prefix-cache-blocks", str(args.prefix_blocks)],
                env=env, cwd=workdir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
        )  # fmt: skip
    return sims


def router_config(scores: list[tuple[str, float]]) -> str:
    resources = [
        {"apiVersion": "networking.serving.volcano.sh/v1alpha1", "kind": "ModelRoute",
         "metadata": {"name": "m"},
         "spec": {"modelName": "m", "rules": [{"targetModels": [{"modelServerName": "s"}]}]}},
        {"apiVersion": "networking.serving.volcano.sh/v1alpha1", "kind": "ModelServer",
         "metadata": {"name": "s"},
         "spec": {"model": "bench-model", "inferenceEngine": "vLLM",
                  "workloadSelector": {"matchLabels": {"a": "s"}}, "workloadPort": {"port": 8000}}},
        *({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"p{i}", "labels": {"a": "s"}},
           "status": {"podIP": host, "phase": "Running",
                      "conditions": [{"type": "Ready", "status": "True"}]}}
          for i, host in enumerate(PODS)),
    ]  # fmt: skip
    config = {
        "listen": f"tcp:{ROUTER[1]}:interface={ROUTER[0]}",
        "adminListen": "tcp:0:interface=127.0.0.1",
        "reloadInterval": "0s",
        "observability": {"accessLog": {"enabled": False}},
        "scheduler": {
            "plugins": {
                "Filter": {"enabled": []},
                "Score": {"enabled": [{"name": n, "weight": w} for n, w in scores]},
            }
        },
        "resources": resources,
    }
    return json.dumps(config)  # JSON is YAML


async def wait_ok(host: str, port: int, path: str, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if (await http_get(host, port, path, 1))[0] == 200:
                return
        except (OSError, TimeoutError):
            pass
        await asyncio.sleep(0.1)
    raise SystemExit(f"http://{host}:{port}{path} never answered 200")


async def load(args: argparse.Namespace, prompts: list[str]) -> list[StreamResult]:
    rng = random.Random(7)
    results: list[StreamResult] = []
    deadline = time.monotonic() + args.seconds

    async def client() -> None:
        while time.monotonic() < deadline:
            group = rng.randrange(len(prompts))
            body = json.dumps({
                "model": "m", "stream": True, "max_tokens": 16,
                "messages": [{"role": "system", "content": prompts[group]},
                             {"role": "user", "content": f"question {rng.randrange(10**6)}"}],
            }).encode()  # fmt: skip
            result = StreamResult(started=0.0)
            await run_stream(*ROUTER, body, result)
            results.append(result)

    await asyncio.gather(*(client() for _ in range(args.concurrency)))
    return results


async def prefix_hit_rate() -> float:
    hits = queries = 0.0
    for host in PODS:
        _, text = await http_get(host, 8000, "/metrics")
        for line in text.decode().splitlines():
            if line.startswith("vllm:prefix_cache_hits_total"):
                hits += float(line.rsplit(" ", 1)[1])
            elif line.startswith("vllm:prefix_cache_queries_total"):
                queries += float(line.rsplit(" ", 1)[1])
    return hits / queries if queries else 0.0


async def one(args: argparse.Namespace, name: str, prompts: list[str]) -> dict[str, float]:
    workdir = Path(tempfile.mkdtemp(prefix="kthena-quality-"))
    sims = start_sims(args, workdir)
    (workdir / "router.yaml").write_text(router_config(CONFIGS[name]))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    router = subprocess.Popen(
        ["taskset", "-c", "0", TWISTD, "-n", "--pidfile=", "kthena-router", "--config",
         str(workdir / "router.yaml")],
        env=env, cwd=workdir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        for host in PODS:
            await wait_ok(host, 8000, "/health", 20)
        await wait_ok(*ROUTER, "/readyz", 20)
        started = time.monotonic()
        results = await load(args, prompts)
        elapsed = time.monotonic() - started
        ok = [r for r in results if r.error is None and r.token_times]
        ttfts = sorted(r.token_times[0] - r.started for r in ok)
        return {
            "requests/s": len(ok) / elapsed,
            "errors": float(len(results) - len(ok)),
            "mean TTFT ms": 1000 * statistics.fmean(ttfts),
            "p99 TTFT ms": 1000 * ttfts[int(0.99 * (len(ttfts) - 1))],
            "prefix hit rate": await prefix_hit_rate(),
        }
    finally:
        for proc in (router, *sims):
            proc.send_signal(signal.SIGTERM)
        for proc in (router, *sims):
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--groups", type=int, default=16)
    parser.add_argument("--words", type=int, default=800, help="system prompt length")
    parser.add_argument("--prefill-per-token", type=float, default=0.001)
    parser.add_argument("--prefix-blocks", type=int, default=300, help="per pod")
    parser.add_argument("--only", choices=list(CONFIGS), action="append")
    args = parser.parse_args()
    if not 1 <= args.seconds <= 120 or not 1 <= args.concurrency <= 256:
        raise SystemExit("--seconds 1..120, --concurrency 1..256")
    prompts = system_prompts(args.groups, args.words, random.Random(3))
    print(f"{args.groups} groups x {args.words}-word system prompts, {len(PODS)} pods, "
          f"concurrency {args.concurrency}, {args.seconds:.0f} s each")  # fmt: skip
    rows = {}
    for name in args.only or CONFIGS:
        rows[name] = await one(args, name, prompts)
        figures = "  ".join(f"{k} {v:.2f}" for k, v in rows[name].items())
        print(f"{name:<30} {figures}", flush=True)
    base = rows.get("random")
    if base:
        for name, row in rows.items():
            if name != "random":
                gain = 100 * (row["requests/s"] / base["requests/s"] - 1)
                ttft = 100 * (row["mean TTFT ms"] / base["mean TTFT ms"] - 1)
                print(f"{name:<30} vs random: throughput {gain:+.0f}%, mean TTFT {ttft:+.1f}%")


if __name__ == "__main__":
    asyncio.run(main())
