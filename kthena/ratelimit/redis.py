"""
Token buckets in Redis (L{RedisBuckets}), shared exactly by every router process that
uses the same Redis: the rules of L{kthena.ratelimit.buckets}, in Lua.

Why it is built this way:
  - one script per check and one per settle (L{kthena.ratelimit.lua}), with all the
    call's buckets as its keys:
    Redis runs a script alone, so a check is all or nothing across processes, no lock;
  - the time is Redis's (C{TIME} inside the script): the routers' clocks never matter;
  - Kthena's layout (a hash at Kthena's key, fields C{tokens} and C{last_update} in
    seconds, expiring when unused): Kthena's routers and ours can share one Redis;
  - EVALSHA, the scripts being loaded when a connection is made; a NOSCRIPT (a C{SCRIPT
    FLUSH}, a failover) loads the script again and runs the call with EVAL (it did not
    run), so no call is lost or applied twice;
  - a call never waits longer than C{timeout}: it fails with L{BackendError} (not
    connected, connection lost, too slow) and the caller's policy decides what that
    means. A call that timed out may still have been applied by Redis.

txredisapi is untyped and installs the global reactor when imported: it is imported only
when a connection is made, and only its protocol is used (RESP, AUTH, SELECT), behind
L{_Link}. Twisted's C{ClientService} connects and reconnects on the reactor given,
backing off by L{reconnect_delay}, up to C{max_delay}.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit

from twisted.application.internet import ClientService
from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, fail, gatherResults, succeed
from twisted.internet.defer import TimeoutError as DeferredTimeoutError
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.interfaces import IAddress, IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from kthena.failures import describe
from kthena.interfaces import IBucketBackend
from kthena.ratelimit.buckets import BucketSpec, Demand, Refusal, retry_after
from kthena.ratelimit.lua import CHECK, LEVELS, SCRIPTS, SETTLE, Script
from kthena.redact import redact_text, redact_url

log = Logger()


class BackendError(Exception):
    """Redis did not answer a call: not connected, the connection failed, or too slow."""


@dataclass(frozen=True, slots=True)
class RedisAddress:
    """Where a Redis is and how to log in; C{str()} never shows the password."""

    host: str
    port: int = 6379
    db: int | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}" + ("" if self.db is None else f"/{self.db}")


def parse_address(address: str, password: str | None = None) -> RedisAddress:
    """
    C{host:port}, C{redis://[[user]:password@]host[:port][/db]} or Redis's password-only
    C{redis://password@host}. C{password}, when given, wins over one in the address.

    @raise ValueError: a message showing the address without its password.
    """
    text = address.strip()
    shown = redact_url(text if "://" in text else f"redis://{text}")
    try:
        parts = urlsplit(text if "://" in text else f"redis://{text}")
        port = parts.port or 6379
        db = parts.path.strip("/")
        number = int(db) if db else None
    except ValueError:
        raise ValueError(f"invalid Redis address {shown!r}: expected host:port") from None
    if parts.scheme != "redis" or not parts.hostname:
        raise ValueError(f"invalid Redis address {shown!r}: expected redis://host:port[/db]")
    user, secret = parts.username or None, parts.password
    if secret is None and user is not None:
        user, secret = None, user  # the password-only form
    if password is None and secret is not None:
        password = unquote(secret)
    return RedisAddress(parts.hostname, port, number, user and unquote(user), password)


def reconnect_delay(attempt: int, initial: float = 0.1, maximum: float = 2.0) -> float:
    """
    Seconds before the C{attempt}th try in a row (1, 2, ...): doubling from C{initial},
    never above C{maximum}; shortened at random by up to a quarter, so routers that lost
    the same Redis do not all come back in step.
    """
    delay = min(maximum, initial * 2.0 ** min(attempt - 1, 64))
    return delay * random.uniform(0.75, 1.0)


def _number(value: float) -> str:
    """Lua reads repr's shortest exact form; txredisapi would send floats with 6 decimals."""
    return repr(float(value))


class _Link:
    """One ready connection: the typed face of a txredisapi protocol."""

    def __init__(self, protocol: Any) -> None:
        self._protocol = protocol

    def call(self, *args: str | bytes) -> Deferred[Any]:
        try:
            d: Deferred[Any] = self._protocol.execute_command(*args)
        except Exception:  # txredisapi raises "Not connected" at once
            return fail()
        return d


@implementer(IStreamClientEndpoint)
class _Watched:
    """An endpoint that reports why an attempt to connect failed (for C{last_error})."""

    def __init__(self, endpoint: IStreamClientEndpoint, failed: Callable[[str], None]) -> None:
        self._endpoint = endpoint
        self._failed = failed

    def connect(self, factory: Any) -> Deferred[Any]:
        def failed(failure: Failure) -> Failure:
            if not failure.check(CancelledError):
                self._failed(f"cannot connect: {describe(failure.value)}")
            return failure

        d: Deferred[Any] = self._endpoint.connect(factory)
        return d.addErrback(failed)


class _Factory(Factory):
    """
    Builds txredisapi's protocol for each connection C{ClientService} makes. The
    protocol calls C{stopTrying} and C{connectionError} on its factory when AUTH or
    SELECT fail; C{isLazy} makes it log that rather than fail a Deferred nobody holds.
    """

    noisy = False
    isLazy = True

    def __init__(
        self, address: RedisAddress, built: Callable[[Any], None], error: Callable[[str], None]
    ) -> None:
        self.address = address
        self._built = built
        self.connectionError = error

    def buildProtocol(self, addr: IAddress | None) -> Protocol | None:
        import txredisapi  # installs the global reactor: not at module level

        a = self.address
        protocol = txredisapi.RedisProtocol(
            "utf-8", password=a.password, dbid=a.db, convertNumbers=False, username=a.username
        )
        protocol.factory = self
        self._built(protocol)
        return protocol  # type: ignore[no-any-return]

    def stopTrying(self) -> None:
        """Not stopped: a password fixed in Redis heals; the backoff grows meanwhile."""


@implementer(IBucketBackend)
class RedisBuckets(Service):
    """
    The buckets in one Redis, over one connection (calls are pipelined on it).

    A service: C{startService} starts connecting and returns at once; calls fail with
    L{BackendError} until a connection is ready, and while it is lost. C{stopService}
    closes the connection and fires when it is closed, leaving no timer behind.

    @ivar timeout: the longest a call waits, in seconds (read at each call: a reload may
        change it).
    @ivar display: where, for the logs and the debug view (never the password).
    @ivar last_error: what went wrong last (kept after a recovery), or C{None}.
    """

    name = "redis"

    def __init__(
        self,
        reactor: IReactorTime,
        address: str,
        password: str | None = None,
        timeout: float = 0.05,
        *,
        max_delay: float = 2.0,
        connect_timeout: float = 2.0,
    ) -> None:
        """
        @param reactor: the reactor (its TCP and name resolution are used to connect).
        @param address: C{host:port} or C{redis://[:password@]host:port[/db]}.
        @param max_delay: the longest wait between two attempts to reconnect.
        """
        self.reactor = reactor
        self.address = parse_address(address, password)
        self.display = f"redis {self.address}"
        self.timeout = timeout
        self.last_error: str | None = None
        self._link: _Link | None = None
        self._ok = False
        self._rejected = 0  # connections made but refused (AUTH, SELECT) in a row
        endpoint = HostnameEndpoint(
            reactor, self.address.host, self.address.port, timeout=connect_timeout
        )
        self._client = ClientService(
            _Watched(endpoint, self._failed_to_connect),
            _Factory(self.address, self._connecting, self._failed_to_connect),
            retryPolicy=self._retry_delay,
            clock=reactor,
        )
        self._max_delay = max_delay

    def _retry_delay(self, attempt: int) -> float:
        # ClientService counts failed attempts only; connections Redis refused count too
        return reconnect_delay(max(attempt, self._rejected), 0.1, self._max_delay)

    @property
    def healthy(self) -> bool:
        """Connected, and the last call (or the scripts' loading) succeeded."""
        return self._link is not None and self._ok

    def startService(self) -> None:
        super().startService()
        self._client.startService()

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return self._client.stopService()

    # -- the backend

    def check(self, demands: Sequence[Demand]) -> Deferred[Refusal | None]:
        if not demands:
            return succeed(None)
        args: list[str] = []
        for d in demands:
            b = d.bucket
            args += (_number(b.capacity), _number(b.per_second), _number(d.take))
            args += (_number(d.need), str(b.expire))
        run = self._run(CHECK, [d.bucket.key for d in demands], args)
        return run.addCallback(_refusal, demands)

    def settle(self, charges: Sequence[tuple[BucketSpec, float]]) -> Deferred[None]:
        charges = [(b, amount) for b, amount in charges if amount]
        if not charges:
            return succeed(None)
        args: list[str] = []
        for b, amount in charges:
            args += (_number(b.capacity), _number(b.per_second), _number(amount), str(b.expire))
        return self._run(SETTLE, [b.key for b, _ in charges], args).addCallback(lambda _: None)

    def levels(self, buckets: Sequence[BucketSpec]) -> Deferred[list[float | None]]:
        if not buckets:
            return succeed([])
        args: list[str] = []
        for b in buckets:
            args += (_number(b.capacity), _number(b.per_second))
        run = self._run(LEVELS, [b.key for b in buckets], args)
        return run.addCallback(lambda reply: [None if v is None else float(v) for v in reply])

    # -- calls

    def _run(self, script: Script, keys: list[str], numbers: list[str]) -> Deferred[Any]:
        """
        EVALSHA C{script}, EVAL after a NOSCRIPT; a BackendError after C{timeout}. The
        numbers go as one argument, and every argument as bytes: txredisapi encodes each
        argument in Python (microseconds apiece), which dozens of them made the cost of
        a call.
        """
        link = self._link
        if link is None:
            self._ok = False
            return fail(BackendError(f"not connected to {self.display}"))
        args = (b"%d" % len(keys), *(k.encode() for k in keys), " ".join(numbers).encode())
        d = link.call(b"EVALSHA", script.sha, *args)
        d.addErrback(self._unknown_script, link, script, args)
        d.addTimeout(self.timeout, self.reactor)
        return d.addCallbacks(self._answered, self._call_failed)

    def _unknown_script(
        self, failure: Failure, link: _Link, script: Script, args: tuple[bytes, ...]
    ) -> Deferred[Any] | Failure:
        if not failure.getErrorMessage().startswith("NOSCRIPT"):
            return failure
        log.info("{redis} lost its scripts: loading them again", redis=self.display)
        link.call("SCRIPT", "LOAD", script.text).addErrback(lambda _: None)  # the EVAL says
        return link.call(b"EVAL", script.text, *args)

    def _answered(self, reply: Any) -> Any:
        self._ok = True
        return reply

    def _call_failed(self, failure: Failure) -> Failure:
        if failure.check(DeferredTimeoutError):
            why = f"no answer within {self.timeout:g}s"
        else:
            why = _describe(failure.value)
        self._ok = False
        self.last_error = redact_text(f"{self.display}: {why}")
        return Failure(BackendError(self.last_error))

    # -- the connection

    def _connecting(self, protocol: Any) -> None:
        """A connection is made: it is used once Redis accepted its AUTH and SELECT."""
        self._rejected += 1
        link = _Link(protocol)
        protocol.whenConnected().addCallback(lambda _: self._ready(link))
        protocol.whenDisconnected().addCallback(lambda _: self._gone(link))

    def _ready(self, link: _Link) -> None:
        self._rejected = 0
        self._link, self._ok = link, False
        log.info("connected to {redis}", redis=self.display)
        loads = [link.call("SCRIPT", "LOAD", s.text) for s in SCRIPTS]
        loaded = gatherResults(loads, consumeErrors=True)
        loaded.addCallbacks(self._answered, lambda f: self._call_failed(f.value.subFailure))
        loaded.addErrback(lambda _: None)  # kept in last_error

    def _gone(self, link: _Link) -> None:
        if self._link is link:
            self._link = None
            if self.running:
                self.last_error = f"{self.display}: the connection was lost"
                log.warn("lost the connection to {redis}: reconnecting", redis=self.display)

    def _failed_to_connect(self, why: str) -> None:
        first = self.last_error is None or not self.last_error.endswith(why)
        self.last_error = redact_text(f"{self.display}: {why}")
        if first and self.running:
            log.warn("{error}; retrying", error=self.last_error)


def _refusal(reply: Any, demands: Sequence[Demand]) -> Refusal | None:
    if reply is None:
        return None
    index, level = int(reply[0]), float(reply[1])
    demand = demands[index]
    return Refusal(index, level, retry_after(demand.bucket, level, demand.need))


def _describe(error: BaseException | None) -> str:
    """txredisapi's errors in words (its ConnectionError is not the builtin one)."""
    name = type(error).__name__
    if name == "ConnectionError":
        return "the connection was lost" if "Lost" in str(error) else "not connected"
    if name == "ResponseError":
        return f"Redis answered {error}"
    return describe(error)
