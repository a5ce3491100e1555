"""
Global rate limits as deployed: real C{twistd kthena-router} processes sharing a real
C{redis-server} (ports 16390-16399), a C{kthena-sim} pod behind them, the official
C{openai} client in front. Two routers share one limit exactly; a Redis hung then killed
mid-run lets traffic through (failOpen) without stalling any request and is used again
once it is back; with failOpen false the same outage is a quick 503.

The only timing assertion is a generous bound on each request during an outage: the
proxy must not wait on a dead Redis. Everything else is counted, not timed; every wait is
bounded.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.conftest import SimProcess, start_sim, wait_until
from tests.integration.router_helpers import (
    ADMIN_LISTEN,
    LISTEN,
    LOOPBACK,
    RouterProcess,
    assert_error_object,
    bound_port,
    http_request,
    start_router,
)
from tests.integration.test_redis_buckets import RedisServer
from tests.unit.routerfixtures import pod, server, simple_route

PORTS = range(16390, 16400)
"""This file's Redis ports (test_redis_buckets.py uses 16380-16389)."""
MODEL = "rl-model"
FREE_MODEL = "rl-free"
UPSTREAM = "sys/rl-upstream"
KEY = f"kthena:ratelimit:{MODEL}:requests"
MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "alpha beta"}]
BOUND = 2.0
"""The longest one request may take while Redis is down (its timeout is 50 ms)."""
PATIENCE = 20.0
"""The longest a test waits for a router to (re)connect or for its counts to settle."""

Start = Callable[[dict[str, Any]], RouterProcess]


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimProcess]:
    """One fast pod for the whole module: the tests are about the router, not the pod."""
    process = start_sim(
        tmp_path_factory.mktemp("rl-sim"),
        "--model",
        UPSTREAM,
        "--itl",
        "0.001",
        "--output-tokens",
        "2",
    )
    yield process
    process.terminate()


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A fresh redis-server on the first free port of L{PORTS}, killed after the test."""
    found = RedisServer(tmp_path)
    found.start(ports=PORTS)
    try:
        yield found
    finally:
        found.kill()


@pytest.fixture
def routers(tmp_path: Path) -> Iterator[Start]:
    """C{routers(config)} starts a router in a folder of its own; all stopped after."""
    started: list[RouterProcess] = []

    def start(config: dict[str, Any]) -> RouterProcess:
        workdir = tmp_path / f"router-{len(started)}"
        workdir.mkdir()
        started.append(start_router(workdir, config))
        return started[-1]

    yield start
    for router in started:
        router.stop()


def config(sim: SimProcess, redis: RedisServer, limit: dict[str, Any], **settings: Any) -> Any:
    """A limited route (its buckets in C{redis}), an unlimited one, both to C{sim}."""
    global_ = {"global": {"redis": {"address": f"{LOOPBACK}:{redis.port}"}}}
    return {
        "listen": LISTEN,
        "drainTimeout": "1s",
        "reloadInterval": "0s",
        **settings,
        "resources": [
            simple_route("limited", MODEL, "srv", rateLimit={**limit, **global_}),
            simple_route("free", FREE_MODEL, "srv"),
            server("srv", {"app": "srv"}, UPSTREAM),
            pod("pod-0", sim.host, {"app": "srv"}, port=sim.port),
        ],
    }


# -- what a router says on its admin port


def metric(router: RouterProcess, name: str, **labels: str) -> float:
    """A sample of the router's C{/metrics}, summed over the label sets matching C{labels}."""
    scrape = http_request(LOOPBACK, bound_port(router, ADMIN_LISTEN), "GET", "/metrics")
    assert scrape.status == 200, scrape
    return sum(
        sample.value
        for family in text_string_to_metric_families(scrape.body.decode())
        for sample in family.samples
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
    )


def limits_state(router: RouterProcess) -> dict[str, Any]:
    """C{rate_limits} of C{/debug/router/state}."""
    reply = http_request(LOOPBACK, bound_port(router, ADMIN_LISTEN), "GET", "/debug/router/state")
    assert reply.status == 200, reply
    state: dict[str, Any] = reply.json()["rate_limits"]
    return state


def redis_backend(router: RouterProcess) -> dict[str, Any]:
    """The one Redis backend in the router's C{rate_limits} state."""
    backends: list[dict[str, Any]] = limits_state(router)["backends"]
    (backend,) = [b for b in backends if b["backend"] == "redis"]
    return backend


def wait_healthy(router: RouterProcess, healthy: bool = True) -> None:
    """Until the router's Redis backend is (or is no longer) connected and answering."""
    wait_until(
        lambda: redis_backend(router)["healthy"] is healthy,
        PATIENCE,
        interval=0.05,
        what=f"the redis backend to be healthy={healthy}:\n{router.log()}",
    )


def settles(router: RouterProcess, name: str, expected: float, **labels: str) -> None:
    """A count the router updates as requests end: wait (bounded) until it is C{expected}."""
    deadline = time.monotonic() + 5.0
    while (seen := metric(router, name, **labels)) != expected and time.monotonic() < deadline:
        time.sleep(0.05)
    assert seen == expected, (name, labels)


# -- the client


def ask(client: openai.OpenAI, model: str = MODEL) -> int:
    """One chat completion: 200, or 429 (checked: OpenAI's code and a Retry-After)."""
    try:
        client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=2)
    except openai.RateLimitError as e:
        assert e.code == "rate_limit_exceeded", e.body
        assert int(e.response.headers["retry-after"]) > 0
        return 429
    return 200


def timed_ask(client: openai.OpenAI) -> int:
    """L{ask}, which must not take longer than L{BOUND}."""
    started = time.monotonic()
    status = ask(client)
    elapsed = time.monotonic() - started
    assert elapsed < BOUND, f"a request took {elapsed:.2f} s while Redis was down"
    return status


def hash_in(redis: RedisServer, key: str = KEY) -> dict[str, str]:
    """The bucket as Redis holds it (empty when it does not exist)."""
    flat: list[str] = redis.command("HGETALL", key)
    return dict(zip(flat[::2], flat[1::2], strict=True))


# -- the tests


LIMIT = 12
TOTAL = 30


def test_two_routers_share_one_limit_exactly(
    sim: SimProcess, redis: RedisServer, routers: Start
) -> None:
    """
    N requests per hour across two processes means N, not N per process: the check is one
    Lua script in the shared Redis. Concurrent traffic to both routers finds exactly N
    passes; every 429 is counted by the router that refused it. The Redis timeout is long
    here, so that a slow answer (failing open) cannot pass as a miscount.
    """
    limit = {"requestsPerUnit": LIMIT, "unit": "hour"}
    settings = {"rateLimits": {"failOpen": True, "redisTimeout": "2s"}}
    pair = [routers(config(sim, redis, limit, **settings)) for _ in range(2)]
    for router in pair:
        wait_healthy(router)
    clients = [router.client(timeout=10.0) for router in pair]

    with ThreadPoolExecutor(6) as pool:
        statuses = list(pool.map(lambda i: (i % 2, ask(clients[i % 2])), range(TOTAL)))

    assert sum(status == 200 for _, status in statuses) == LIMIT, statuses
    assert sum(status == 429 for _, status in statuses) == TOTAL - LIMIT, statuses
    for i, router in enumerate(pair):
        refused = sum(1 for j, status in statuses if j == i and status == 429)
        passed = sum(1 for j, status in statuses if j == i and status == 200)
        exceeded = "kthena_router_rate_limit_exceeded_total"
        settles(router, exceeded, refused, model=MODEL, limit_type="requests")
        for code, count in (("200", passed), ("429", refused)):
            settles(router, "kthena_router_requests_total", count, model=MODEL, status_code=code)
        assert metric(router, "kthena_router_rate_limit_backend_errors_total") == 0
        (route,) = limits_state(router)["routes"]
        (bucket,) = route["buckets"]
        assert (bucket["key"], bucket["capacity"]) == (KEY, LIMIT)
        assert 0 <= bucket["level"] < 1, bucket

    # Kthena's layout, at Kthena's key: routers of either kind could share this Redis.
    kept = hash_in(redis)
    assert set(kept) == {"tokens", "last_update"}, kept
    assert 0 <= float(kept["tokens"]) < 1, kept
    assert abs(float(kept["last_update"]) - redis.now()) < 60, kept
    assert redis.command("TTL", KEY) > 0


SMALL = 3


def test_a_killed_redis_fails_open_then_limits_again(
    sim: SimProcess, redis: RedisServer, routers: Start
) -> None:
    """
    failOpen: an outage of the shared Redis must not take the API down or slow it (a hung
    Redis is cut off by the 50 ms timeout, a dead connection fails at once); it is counted
    and shown. A fresh Redis on the same address is found again by itself (reconnect with
    backoff) and the limit holds again, from a full bucket.
    """
    settings = {"rateLimits": {"failOpen": True, "redisTimeout": "50ms"}}
    router = routers(config(sim, redis, {"requestsPerUnit": SMALL, "unit": "hour"}, **settings))
    wait_healthy(router)
    client = router.client(timeout=10.0)
    assert ask(client) == 200
    assert float(hash_in(redis)["tokens"]) == pytest.approx(SMALL - 1, abs=0.1)

    errors = "kthena_router_rate_limit_backend_errors_total"
    before = metric(router, errors, backend="redis", operation="check")
    redis.signal(signal.SIGSTOP)  # hung first: only the timeout keeps the proxy going
    outage = [timed_ask(client) for _ in range(SMALL)]
    redis.kill()  # SIGKILL (a stopped process too)
    outage += [timed_ask(client) for _ in range(SMALL)]
    assert outage == [200] * len(outage)  # more than the limit: nothing counts them
    after = metric(router, errors, backend="redis", operation="check")
    assert after - before == len(outage)  # each request is one failed check
    backend = redis_backend(router)
    assert (backend["healthy"], backend["down"]) == (False, True), backend
    assert backend["last_error"], backend

    redis.start(redis.port)  # fresh and empty, on the same port
    deadline = time.monotonic() + PATIENCE
    seen: list[int] = []
    while 429 not in seen:
        if time.monotonic() > deadline:
            passed = len(seen)
            pytest.fail(
                f"no 429 within {PATIENCE} s of the restart ({passed} passed):\n{router.log()}"
            )
        seen.append(timed_ask(client))
        time.sleep(0.05)
    # Counted again, from a full bucket: SMALL passes at least before the first 429.
    assert len(seen) > SMALL, seen
    assert 0 <= float(hash_in(redis)["tokens"]) < 1
    wait_healthy(router)
    assert redis_backend(router)["down"] is False
    settles(router, "kthena_router_rate_limit_exceeded_total", 1, model=MODEL)


def test_a_dead_redis_with_fail_closed_is_a_quick_503(
    sim: SimProcess, redis: RedisServer, routers: Start
) -> None:
    """
    failOpen false: a limit that cannot be checked refuses, quickly, with an OpenAI error
    object the client understands, counted like any other answer; routes without a limit
    are not affected by the outage.
    """
    settings = {"rateLimits": {"failOpen": False, "redisTimeout": "50ms"}}
    router = routers(config(sim, redis, {"requestsPerUnit": 100, "unit": "hour"}, **settings))
    wait_healthy(router)  # the route's Redis was reachable: what follows is the outage
    redis.kill()
    client = router.client(timeout=10.0)

    started = time.monotonic()
    with pytest.raises(openai.InternalServerError) as caught:
        ask(client)
    elapsed = time.monotonic() - started
    assert elapsed < BOUND, f"the 503 took {elapsed:.2f} s"
    assert caught.value.status_code == 503
    error = assert_error_object(caught.value.response.json(), 503, "rate_limit")
    assert error["type"] == "service_unavailable_error"
    assert "rate-limit backend" in error["message"], error

    assert ask(client, FREE_MODEL) == 200
    settles(router, "kthena_router_requests_total", 1, model=MODEL, status_code="503")
    assert metric(router, "kthena_router_rate_limit_exceeded_total") == 0
    assert metric(router, "kthena_router_rate_limit_backend_errors_total", operation="check") == 1
    assert redis_backend(router)["down"] is True
