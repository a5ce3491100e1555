"""
The Redis buckets against a real C{redis-server} on loopback (ports 16380-16389): the
rules of L{kthena.ratelimit.buckets}, one bucket shared exactly by two connections (two
router processes), Kthena's hash layout and expiry, and what happens when Redis dies,
hangs, restarts, forgets its scripts or refuses the password.

No test depends on timing: levels in the past are written into Redis directly, and the
failure tests assert that calls fail, not how fast.
"""

from __future__ import annotations

import math
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, cast

import pytest
from twisted.application.service import IService
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.defer import TimeoutError as DeferredTimeoutError
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from zope.interface.verify import verifyObject

from kthena.interfaces import IBucketBackend
from kthena.ratelimit.buckets import BucketSpec, Demand, Refusal, bucket_key
from kthena.ratelimit.lua import CHECK, SCRIPTS
from kthena.ratelimit.redis import (
    BackendError,
    RedisBuckets,
    parse_address,
    reconnect_delay,
)
from tests.integration.router_helpers import async_yield_fixture, inline

HOST = "127.0.0.1"
PORTS = range(16380, 16390)
TIMEOUT = 2.0
"""The calls' timeout in these tests: far above any answer on a loaded machine, so that
only the tests about failures see calls fail."""
PATIENCE = 20.0
"""The longest a test waits for a connection to be made again."""
HOUR = 3600.0


def reactor() -> IReactorTime:
    from twisted.internet import reactor

    return cast(IReactorTime, reactor)


async def sleep(seconds: float) -> None:
    await deferLater(reactor(), seconds, lambda: None)


async def eventually(done: Callable[[], Awaitable[bool]], what: str) -> None:
    """Poll C{done} until it says so; fail the test after L{PATIENCE} seconds."""
    deadline = time.monotonic() + PATIENCE
    while not await done():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {PATIENCE} s waiting for {what}")
        await sleep(0.02)


# -- a redis-server of our own, and a blocking client to look inside it


class ReplyError(Exception):
    """Redis answered a raw command with an error."""


def _encode(args: tuple[str | int | float, ...]) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = str(arg).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


def _read(reader: Any) -> Any:
    line: bytes = reader.readline().rstrip(b"\r\n")
    kind, rest = line[:1], line[1:]
    if kind == b"+":
        return rest.decode()
    if kind == b"-":
        raise ReplyError(rest.decode())
    if kind == b":":
        return int(rest)
    if kind == b"$":
        size = int(rest)
        return None if size < 0 else reader.read(size + 2)[:-2].decode()
    if kind == b"*":
        size = int(rest)
        return None if size < 0 else [_read(reader) for _ in range(size)]
    raise AssertionError(f"unexpected reply {line!r}")


class RedisServer:
    """A C{redis-server} process on a port of L{PORTS}, without persistence."""

    def __init__(self, workdir: Path, password: str | None = None) -> None:
        executable = shutil.which("redis-server")
        if executable is None:
            pytest.fail("redis-server is not on PATH: these tests need a real Redis")
        self.executable = executable
        self.workdir = workdir
        self.password = password
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, port: int | None = None, ports: Iterable[int] = PORTS) -> None:
        """Start on C{port}, or on the first free port of C{ports} (by default L{PORTS}:
        each test module that starts Redis servers has a range of its own)."""
        candidates = [port] if port else list(ports)
        for candidate in candidates:
            if self._try(candidate):
                return
        pytest.fail(f"no redis-server could listen on {HOST} ports {candidates}")

    def _try(self, port: int) -> bool:
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Redis does
            try:
                probe.bind((HOST, port))
            except OSError:
                return False
        args = ["--port", str(port), "--bind", HOST, "--save", "", "--appendonly", "no"]
        if self.password:
            args += ["--requirepass", self.password]
        log = (self.workdir / f"redis-{port}.log").open("ab")
        with log:
            self.process = subprocess.Popen(
                [self.executable, *args], cwd=self.workdir, stdout=log, stderr=log
            )
        self.port = port
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline and self.process.poll() is None:
            try:
                info = self.command("INFO", "server")
            except OSError:
                time.sleep(0.02)
                continue
            return f"process_id:{self.process.pid}\r" in info
        self.kill()
        return False

    def command(self, *args: str | int | float) -> Any:
        """One command over a connection of its own (blocking: Redis is another process)."""
        with socket.create_connection((HOST, self.port), timeout=5.0) as s:
            reader = s.makefile("rb")
            if self.password:
                s.sendall(_encode(("AUTH", self.password)))
                _read(reader)
            s.sendall(_encode(args))
            return _read(reader)

    def now(self) -> float:
        seconds, micros = self.command("TIME")
        return int(seconds) + int(micros) / 1e6

    def signal(self, number: int) -> None:
        assert self.process is not None
        self.process.send_signal(number)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
        if self.process is not None:
            self.process.wait(10.0)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.kill()


Connect = Callable[..., Awaitable[RedisBuckets]]


@async_yield_fixture
async def connect(redis_server: RedisServer) -> AsyncIterator[Connect]:
    """C{await connect(address=..., **kwargs)}: started buckets, ready; all stopped after."""
    started: list[RedisBuckets] = []

    async def connect(address: str | None = None, ready: bool = True, **kw: Any) -> RedisBuckets:
        kw.setdefault("timeout", TIMEOUT)
        kw.setdefault("max_delay", 0.5)
        buckets = RedisBuckets(reactor(), address or f"{HOST}:{redis_server.port}", **kw)
        started.append(buckets)
        buckets.startService()
        if ready:
            await eventually(lambda: _true(buckets.healthy), "the connection to be ready")
        return buckets

    try:
        yield connect
    finally:
        for buckets in started:
            await buckets.stopService()


async def _true(value: bool) -> bool:
    return value


@async_yield_fixture
async def buckets(connect: Connect) -> AsyncIterator[RedisBuckets]:
    yield await connect()


def per_hour(limit: float, key: str = "kthena:ratelimit:m:input") -> BucketSpec:
    """A bucket refilling so slowly that a test never sees it refill by itself."""
    return BucketSpec(key, limit, limit / HOUR)


async def refused(buckets: RedisBuckets, *demands: Demand) -> Refusal:
    refusal = await buckets.check(demands)
    assert refusal is not None, demands
    return refusal


async def level(buckets: RedisBuckets, bucket: BucketSpec) -> float | None:
    (value,) = await buckets.levels([bucket])
    return value


# -- without a Redis


def test_a_bucket_backend_and_a_service() -> None:
    buckets = RedisBuckets(reactor(), "redis://:s3cret-pw@127.0.0.1:16389/2")
    assert verifyObject(IBucketBackend, buckets)
    assert verifyObject(IService, buckets)
    assert buckets.name == "redis"
    assert buckets.timeout == 0.05
    assert not buckets.healthy and buckets.last_error is None
    assert buckets.display == "redis 127.0.0.1:16389/2"
    assert "s3cret-pw" not in repr(buckets.address)


@pytest.mark.parametrize(
    ("address", "password", "expected"),
    [
        ("127.0.0.1:6380", None, ("127.0.0.1", 6380, None, None, None)),
        ("redis-host", "pw", ("redis-host", 6379, None, None, "pw")),
        ("redis://:p%40ss@h:7/3", None, ("h", 7, 3, None, "p@ss")),
        ("redis://only-pw@h", None, ("h", 6379, None, None, "only-pw")),
        ("redis://user:pw@h:7", None, ("h", 7, None, "user", "pw")),
        ("redis://:in-url@h:7", "given", ("h", 7, None, None, "given")),
        ("[::1]:7", None, ("::1", 7, None, None, None)),
    ],
)
def test_addresses(address: str, password: str | None, expected: tuple[Any, ...]) -> None:
    a = parse_address(address, password)
    assert (a.host, a.port, a.db, a.username, a.password) == expected


@pytest.mark.parametrize(
    "address", ["redis://:pw-secret@h:notaport", "http://:pw-secret@h:1", "rediss://:pw-secret@h"]
)
def test_a_bad_address_is_refused_without_its_password(address: str) -> None:
    with pytest.raises(ValueError, match="invalid Redis address") as raised:
        parse_address(address)
    assert "pw-secret" not in str(raised.value)


def test_the_reconnect_backoff_grows_and_is_bounded() -> None:
    delays = [reconnect_delay(attempt, 0.1, 2.0) for attempt in range(1, 200)]
    assert 0.075 <= delays[0] <= 0.1
    assert all(0 < d <= 2.0 for d in delays)
    assert all(d >= 1.5 for d in delays[5:])  # 0.1 doubled five times is above the cap


# -- the rules


@inline
async def test_starts_full_then_refuses_and_says_when(buckets: RedisBuckets) -> None:
    b = per_hour(30)  # 30 tokens an hour: one every 120 s
    assert await level(buckets, b) is None  # never used: full
    for _ in range(3):
        assert await buckets.check([Demand(b, 10, 10)]) is None
    refusal = await refused(buckets, Demand(b, 10, 10))
    assert refusal.index == 0
    assert refusal.level == pytest.approx(0.0, abs=0.01)
    assert refusal.retry_after == pytest.approx(10 * 120, rel=0.01)
    assert (await refused(buckets, Demand(b, 1, 31))).retry_after == math.inf


@inline
async def test_refills_by_redis_time_up_to_capacity(
    buckets: RedisBuckets, redis_server: RedisServer
) -> None:
    b = BucketSpec("kthena:ratelimit:m:output", 100, 2.0)  # two tokens a second
    # Empty five seconds ago (by Redis's clock): ten tokens now.
    redis_server.command("HSET", b.key, "tokens", 0, "last_update", redis_server.now() - 5)
    assert await level(buckets, b) == pytest.approx(10.0, abs=0.5)
    assert await buckets.check([Demand(b, 10, 10)]) is None
    refusal = await refused(buckets, Demand(b, 5, 5))
    assert refusal.level == pytest.approx(0.0, abs=0.5)
    assert refusal.retry_after == pytest.approx((5 - refusal.level) / 2.0)
    # Empty an hour ago: full, not above.
    redis_server.command("HSET", b.key, "tokens", 0, "last_update", redis_server.now() - HOUR)
    assert await level(buckets, b) == 100.0
    assert await buckets.check([Demand(b, 100, 100)]) is None


@inline
async def test_a_check_is_all_or_nothing_across_keys(
    buckets: RedisBuckets, redis_server: RedisServer
) -> None:
    a, b = per_hour(10, "kthena:ratelimit:m:input"), per_hour(1, "kthena:ratelimit:m:output")
    assert await buckets.check([Demand(b, 1, 1)]) is None
    refusal = await refused(buckets, Demand(a, 4, 4), Demand(b, 1, 1))
    assert refusal.index == 1
    assert refusal.level == pytest.approx(0.0, abs=0.01)
    assert redis_server.command("EXISTS", a.key) == 0  # nothing taken from the other
    assert await buckets.check([Demand(a, 4, 4)]) is None
    assert await level(buckets, a) == pytest.approx(6.0, abs=0.01)


@inline
async def test_a_need_without_take_only_checks(
    buckets: RedisBuckets, redis_server: RedisServer
) -> None:
    b = per_hour(5)
    assert await buckets.check([Demand(b, 0, 1)]) is None
    assert redis_server.command("EXISTS", b.key) == 0  # not even written
    assert await buckets.check([Demand(b, 5, 5)]) is None
    refusal = await refused(buckets, Demand(b, 0, 1))
    assert refusal.retry_after == pytest.approx(HOUR / 5, rel=0.01)


@inline
async def test_a_settle_may_leave_debt_and_a_refund_stops_at_capacity(
    buckets: RedisBuckets,
) -> None:
    b = per_hour(10)
    assert await buckets.check([Demand(b, 10, 10)]) is None
    await buckets.settle([(b, 25)])  # the response used 25 more
    assert await level(buckets, b) == pytest.approx(-25.0, abs=0.01)
    refusal = await refused(buckets, Demand(b, 0, 1))
    assert refusal.level == pytest.approx(-25.0, abs=0.01)
    assert refusal.retry_after == pytest.approx(26 * HOUR / 10, rel=0.01)
    await buckets.settle([(b, -1000), (per_hour(5, "kthena:ratelimit:m:output"), 0)])
    assert await level(buckets, b) == 10.0
    await buckets.settle([])


@inline
async def test_two_routers_share_one_bucket_exactly(connect: Connect) -> None:
    one, two = await connect(), await connect()
    b = per_hour(30)
    checks = [(one, two)[i % 2].check([Demand(b, 10, 10)]) for i in range(10)]
    results = await gatherResults(checks)
    assert sum(r is None for r in results) == 3
    # Many at once, both connections pipelining: exactly the capacity passes.
    many = per_hour(100, "kthena:ratelimit:m:output")
    checks = [(one, two)[i % 2].check([Demand(many, 1, 1)]) for i in range(300)]
    results = await gatherResults(checks)
    assert sum(r is None for r in results) == 100
    assert await level(two, many) == pytest.approx(0.0, abs=0.01)


@inline
async def test_kthenas_hash_layout_and_expiry(
    buckets: RedisBuckets, redis_server: RedisServer
) -> None:
    b = BucketSpec(bucket_key("m", "input", "alice"), 600, 10.0)
    assert b.key == "kthena:ratelimit:m:input:alice"
    assert await buckets.check([Demand(b, 100, 100)]) is None
    stored = _pairs(redis_server.command("HGETALL", b.key))
    assert set(stored) == {"tokens", "last_update"}
    assert float(stored["tokens"]) == pytest.approx(500.0, abs=1.0)
    assert float(stored["last_update"]) == pytest.approx(redis_server.now(), abs=5.0)
    assert b.expire - 1 <= redis_server.command("TTL", b.key) <= b.expire
    redis_server.command("EXPIRE", b.key, 5)
    await buckets.settle([(b, 1)])  # every write sets the expiry again
    assert b.expire - 1 <= redis_server.command("TTL", b.key) <= b.expire
    # A bucket Kthena wrote is read as it is; a read changes nothing.
    redis_server.command("HSET", b.key, "tokens", "7", "last_update", redis_server.now())
    redis_server.command("PERSIST", b.key)
    before = redis_server.command("HGETALL", b.key)
    assert await level(buckets, b) == pytest.approx(7.0, abs=1.0)
    assert redis_server.command("HGETALL", b.key) == before
    assert redis_server.command("TTL", b.key) == -1


def _pairs(flat: list[str]) -> dict[str, str]:
    return dict(zip(flat[::2], flat[1::2], strict=True))


# -- when Redis fails


async def fails(call: Deferred[Any]) -> BackendError:
    """
    The call failed with BackendError (whatever the reason: the caller's policy applies);
    the test fails, rather than hangs, if it has not after L{PATIENCE} seconds.
    """
    call.addTimeout(PATIENCE, reactor())
    try:
        await call
    except BackendError as error:
        return error
    except DeferredTimeoutError:
        pytest.fail(f"the call neither failed nor answered in {PATIENCE} s")
    pytest.fail("the call succeeded")


@inline
async def test_a_killed_redis_fails_the_calls(
    buckets: RedisBuckets, redis_server: RedisServer
) -> None:
    b = per_hour(10)
    assert await buckets.check([Demand(b, 1, 1)]) is None
    redis_server.kill()
    await fails(buckets.check([Demand(b, 1, 1)]))
    assert not buckets.healthy
    assert buckets.last_error is not None and "redis 127.0.0.1:" in buckets.last_error
    # Disconnected now: every kind of call fails, none waits for a connection.
    await fails(buckets.check([Demand(b, 1, 1)]))
    await fails(buckets.settle([(b, 1)]))
    await fails(buckets.levels([b]))
    assert await buckets.check([]) is None  # nothing to ask


@inline
async def test_a_restarted_redis_is_used_again(
    buckets: RedisBuckets, redis_server: RedisServer
) -> None:
    b = per_hour(10)
    assert await buckets.check([Demand(b, 4, 4)]) is None
    port = redis_server.port
    redis_server.kill()
    await fails(buckets.check([Demand(b, 1, 1)]))
    redis_server.start(port)

    async def answers() -> bool:
        try:
            return await buckets.check([Demand(b, 1, 1)]) is None
        except BackendError:
            return False

    await eventually(answers, "a check after Redis came back")
    assert buckets.healthy
    assert await level(buckets, b) == pytest.approx(9.0, abs=0.01)  # a new, empty Redis


@inline
async def test_a_hung_redis_times_out_then_answers_in_order(
    buckets: RedisBuckets, redis_server: RedisServer
) -> None:
    b = per_hour(100)
    assert await buckets.check([Demand(b, 10, 10)]) is None
    buckets.timeout = 0.2
    redis_server.signal(signal.SIGSTOP)
    try:
        error = await fails(buckets.check([Demand(b, 10, 10)]))
        assert "no answer within 0.2s" in str(error)
        assert not buckets.healthy and buckets.last_error == str(error)
    finally:
        redis_server.signal(signal.SIGCONT)
    # The late answer is not taken for the next call's: replies stay in order. Redis ran
    # the timed-out check once it woke up (the caller treated it as failed).
    buckets.timeout = TIMEOUT
    assert await level(buckets, b) == pytest.approx(80.0, abs=0.01)
    assert buckets.healthy


@inline
async def test_scripts_flushed_from_redis_are_loaded_again(
    buckets: RedisBuckets, redis_server: RedisServer
) -> None:
    b = per_hour(10)
    assert redis_server.command("SCRIPT", "EXISTS", *(s.sha.decode() for s in SCRIPTS)) == [1, 1, 1]
    redis_server.command("SCRIPT", "FLUSH")
    assert await buckets.check([Demand(b, 3, 3)]) is None  # NOSCRIPT, then EVAL
    assert redis_server.command("SCRIPT", "EXISTS", CHECK.sha.decode()) == [1]
    assert await buckets.check([Demand(b, 3, 3)]) is None  # EVALSHA again
    assert await level(buckets, b) == pytest.approx(4.0, abs=0.01)
    assert buckets.healthy


@inline
async def test_a_stopped_service_leaves_no_timer(
    connect: Connect, redis_server: RedisServer
) -> None:
    before = set(reactor().getDelayedCalls())
    buckets = await connect()
    assert await buckets.check([Demand(per_hour(10), 1, 1)]) is None
    await buckets.stopService()
    assert set(reactor().getDelayedCalls()) - before == set()
    await fails(buckets.check([Demand(per_hour(10), 1, 1)]))
    # Stopped while waiting to reconnect (Redis gone): the retry timer goes too.
    redis_server.kill()
    waiting = await connect(ready=False)
    await eventually(lambda: _true(waiting.last_error is not None), "a refused connection")
    assert "connection refused" in str(waiting.last_error)
    await waiting.stopService()
    assert set(reactor().getDelayedCalls()) - before == set()


@inline
async def test_a_password_is_used_and_never_shown(tmp_path: Path, connect: Connect) -> None:
    secured = RedisServer(tmp_path, password="pa55-word")
    secured.start()
    try:
        good = await connect(f"redis://:pa55-word@{HOST}:{secured.port}/1")
        b = per_hour(10)
        assert await good.check([Demand(b, 2, 2)]) is None
        secured.command("SELECT", 1)  # (its own connection: db 0 is untouched)
        assert secured.command("EXISTS", b.key) == 0
        bad = await connect(f"{HOST}:{secured.port}", password="wrong-secret", ready=False)
        await eventually(lambda: _true(bad.last_error is not None), "AUTH to be refused")
        assert not bad.healthy
        await fails(bad.check([Demand(b, 1, 1)]))
        for shown in (bad.display, str(bad.last_error), repr(bad.address), good.display):
            assert "wrong-secret" not in shown and "pa55-word" not in shown
    finally:
        secured.kill()
