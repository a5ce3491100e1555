#!/usr/bin/env python3
"""
What a rate-limit check and its settle cost the router, in microseconds of router CPU per
request, without HTTP around them (so that the figure is not lost in wrk's noise).

The router's own RateLimits service runs on the real reactor with the route of
bench/router_bench.py (limits that never refuse); each request is a check (input, output
and request buckets) and, once it passed, the settle with the pod's usage. Local buckets
are timed one request after another; with --redis, C{--concurrency} requests are in flight
at once on the one connection (as under load), and the time runs until Redis answered the
last settle. CPU is this process's (time.process_time): the Lua runs in Redis, not here.

    python3 bench/limits_bench.py [--requests 20000] [--redis 127.0.0.1:6379]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from router_bench import router_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--redis", help="the Redis (host:port) the buckets live in")
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()

    from twisted.internet import reactor
    from twisted.internet.defer import ensureDeferred

    result: dict[str, float] = {}

    def start() -> None:
        d = ensureDeferred(run(reactor, args.requests, args.redis, args.concurrency, result))
        d.addErrback(lambda f: f.printTraceback())
        d.addBoth(lambda _: reactor.stop())  # type: ignore[attr-defined]

    reactor.callWhenRunning(start)  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]
    where = f"redis {args.redis}" if args.redis else "local"
    print(
        f"{where}: {result['requests']:.0f} requests, "
        f"{result['cpu_us']:.1f} us CPU per request (check + settle), "
        f"{result['wall_us']:.1f} us wall per request"
    )


async def run(
    reactor: Any, requests: int, redis: str | None, concurrency: int, result: dict[str, float]
) -> None:
    import yaml
    from twisted.internet.defer import Deferred, gatherResults

    from kthena.config.router import parse_config
    from kthena.ratelimit.service import RateLimits
    from kthena.record import RequestRecord
    from kthena.store import Datastore

    raw = yaml.safe_load(router_config(True, redis))
    config = parse_config(raw, "bench.yaml", Path("."), [])
    store = Datastore()
    store.replace(config.resources)
    match = store.match("bench", lambda name: "", "/v1/chat/completions")
    assert match is not None
    limits = RateLimits(reactor, config)
    limits.startService()
    limiter = limits.limiter
    if redis is not None:  # connected and the scripts loaded
        backend = limiter.routes[match.route.meta.key].backend
        while not getattr(backend, "healthy", False):
            await _sleep(reactor, 0.05)

    def record() -> RequestRecord:
        r = RequestRecord("bench", "POST", "/v1/chat/completions", reactor.seconds())
        r.match, r.user, r.model = match, "bench-user", "bench"
        return r

    async def one() -> None:
        r = record()
        pending = limiter.check(r, 10)
        if pending is not None:
            await pending
        r.dispatched, r.prompt_tokens, r.completion_tokens = True, 9, 2
        limiter.ended(r)

    async def worker(n: int) -> None:
        for _ in range(n):
            await one()

    for _ in range(200):  # warm up
        await one()
    cpu, wall = time.process_time(), time.perf_counter()
    if redis is None:
        for _ in range(requests):
            await one()
    else:
        share = requests // concurrency
        requests = share * concurrency
        await gatherResults([Deferred.fromCoroutine(worker(share)) for _ in range(concurrency)])
        route = limiter.routes[match.route.meta.key]
        await route.backend.levels([b.spec for b in route.buckets(None)])  # after the settles
    result["cpu_us"] = (time.process_time() - cpu) / requests * 1e6
    result["wall_us"] = (time.perf_counter() - wall) / requests * 1e6
    result["requests"] = requests
    await limits.stopService()


def _sleep(reactor: Any, seconds: float) -> Any:
    from twisted.internet.task import deferLater

    return deferLater(reactor, seconds, lambda: None)


if __name__ == "__main__":
    main()
