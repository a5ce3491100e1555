"""
Where the JWT signing keys come from: a JWKS file or URL, read at start, every
C{refreshInterval}, and when a token names a key that is not known yet (a key rotation
at the identity provider).

That last refresh is bounded, since anyone can send a token with a made-up C{kid}: at
most one read is in flight (every request waiting for keys waits for that one), one
starts at most every L{MIN_ON_DEMAND} seconds, and a request waits at most
L{KEY_WAIT_TIMEOUT} seconds for it. A read that fails keeps the last good key set; the
failure is logged once per streak of failures.

A JWKS file is read on the reactor thread: a key set is a few kilobytes from a local
file (a Kubernetes Secret or ConfigMap is tmpfs), read at start and every few minutes
(on-demand reads are rate-limited), which costs tens of microseconds; the config files
themselves are read the same way. A file over L{MAX_JWKS_BYTES} is refused unread. A URL
is fetched with treq on the reactor, over an HTTP client of its own (no cookies kept, no
redirects followed: a key set comes from where the config says), the whole fetch bounded
by L{FETCH_TIMEOUT}.
"""

from __future__ import annotations

from http.cookiejar import DefaultCookiePolicy
from typing import Any

from treq.client import HTTPClient
from treq.cookies import IndexableCookieJar
from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent
from zope.interface import implementer

from kthena.config.identity import IdentityConfig, JwtConfig
from kthena.failures import describe
from kthena.identity.keys import EMPTY, MAX_JWKS_BYTES, KeySet, KeySetError
from kthena.interfaces import IReconfigurable, IServerReactor
from kthena.podclient import BodyCollector, client_pool

log = Logger()

MIN_ON_DEMAND = 10.0
"""Seconds between two reads of the key set asked for by unknown keys."""
KEY_WAIT_TIMEOUT = 5.0
"""Seconds a request waits for a read of the key set to bring its key."""
FETCH_TIMEOUT = 10.0
"""Seconds a fetch of a JWKS URL may take, connection, headers and body."""
CONNECT_TIMEOUT = 5.0

_ACCEPT = Headers({b"accept": [b"application/jwk-set+json, application/json"]})


class JwksFetchError(Exception):
    """A JWKS URL answered something other than a key set."""


def _source(jwt: JwtConfig | None) -> tuple[str | None, str | None] | None:
    return None if jwt is None else (jwt.jwks_file, jwt.jwks_url)


@implementer(IReconfigurable)
class JwksService(Service):
    """
    The current key set (L{keys}) of the config's C{identity.jwt}; idle without one.

    Stopping it stops the loop, cancels a read in flight, lets waiting requests go on
    (to their 401) and closes its connection pool: nothing is left on the reactor.

    @ivar keys: the last good key set (L{EMPTY} until the first arrives).
    @ivar loads: key sets read successfully (for tests and the debug view).
    @ivar failures: reads that failed in a row (0 after a good one).
    """

    name = "jwks"

    def __init__(
        self,
        reactor: IServerReactor,
        config: IdentityConfig,
        agent: IAgent | None = None,
        *,
        min_on_demand: float = MIN_ON_DEMAND,
        key_wait_timeout: float = KEY_WAIT_TIMEOUT,
        fetch_timeout: float = FETCH_TIMEOUT,
    ) -> None:
        """
        @param agent: the agent for JWKS URLs (tests pass an in-memory one); by default
            an Agent over a pool of its own, built when a URL is first fetched.
        """
        self.reactor = reactor
        self.jwt = config.jwt
        self.keys: KeySet = EMPTY
        self.loads = 0
        self.failures = 0
        self.min_on_demand = min_on_demand
        self.key_wait_timeout = key_wait_timeout
        self.fetch_timeout = fetch_timeout
        self._agent = agent
        self._pool: HTTPConnectionPool | None = None
        self._http: HTTPClient | None = None
        self._loop: LoopingCall | None = None
        self._reading: Deferred[None] | None = None
        self._last_start: float | None = None
        self._waiters: list[Deferred[None]] = []
        self._generation = 0  # reads started before a stop or a new source are ignored

    # -- lifecycle

    def startService(self) -> None:
        super().startService()
        self._start_loop(now=True)

    def stopService(self) -> Deferred[None]:
        super().stopService()
        self._stop_loop()
        self._cancel_reading()
        self._release_waiters()
        if self._pool is None:
            return succeed(None)
        d: Deferred[None] = self._pool.closeCachedConnections()
        return d

    def reconfigure(self, config: Any) -> None:
        """
        Take C{config.identity.jwt}: a new key source drops the old keys and reads the
        new one now; a new interval applies from now.
        """
        identity: IdentityConfig = config.identity
        old, self.jwt = self.jwt, identity.jwt
        if _source(old) != _source(self.jwt):
            self._cancel_reading()  # its waiters wait for the new source's keys
            self.keys = EMPTY
            self._last_start = None
            self.failures = 0
            if self.running:
                self._stop_loop()
                self._start_loop(now=True)
        elif (
            self.running
            and old is not None
            and self.jwt is not None
            and old.refresh_interval != self.jwt.refresh_interval
        ):
            self._stop_loop()
            self._start_loop(now=False)

    def _cancel_reading(self) -> None:
        self._generation += 1
        reading, self._reading = self._reading, None
        if reading is not None:
            reading.cancel()

    def _start_loop(self, now: bool) -> None:
        if self.jwt is None:
            self._release_waiters()
            return
        self._loop = LoopingCall(self._tick)
        self._loop.clock = self.reactor
        self._loop.start(self.jwt.refresh_interval, now=now).addErrback(
            lambda f: log.failure("the JWKS refresh loop stopped", f)
        )

    def _stop_loop(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None

    def _tick(self) -> None:
        self._start_read()

    # -- reading

    def refresh(self) -> Deferred[None]:
        """
        Read the key set now, unless a read is in flight; fires (never fails) when the
        read in flight ends, at once when there is nothing to read.
        """
        self._start_read()
        if self._reading is None:
            return succeed(None)
        done: Deferred[None] = Deferred()
        self._waiters.append(done)
        return done

    def _start_read(self) -> None:
        if self._reading is not None or self.jwt is None:
            return
        self._last_start = self.reactor.seconds()
        reading = Deferred.fromCoroutine(self._read(self.jwt, self._generation))
        if reading.called:  # a file is read at once
            self._release_waiters()
        else:  # a URL takes a while
            self._reading = reading
            reading.addBoth(self._read_ended, reading)

    def wait_for_keys(self) -> Deferred[None] | None:
        """
        For a token whose key is unknown: a Deferred that fires when a read of the key set
        ends (then look again), failing with L{twisted.internet.defer.TimeoutError} after
        C{key_wait_timeout}; or C{None} when no read is in flight and the last one started
        less than C{min_on_demand} seconds ago (the key is unknown: answer now).
        """
        if self.jwt is None or not self.running:
            return None
        if self._reading is None:
            last = self._last_start
            if last is not None and self.reactor.seconds() - last < self.min_on_demand:
                return None
            self._start_read()
            if self._reading is None:  # read at once (a file): look again now
                return succeed(None)
        waiter: Deferred[None] = Deferred(self._forget)
        self._waiters.append(waiter)
        waiter.addTimeout(self.key_wait_timeout, self.reactor)
        return waiter

    def _forget(self, waiter: Deferred[None]) -> None:
        if waiter in self._waiters:
            self._waiters.remove(waiter)

    def _read_ended(self, _: object, reading: Deferred[None]) -> None:
        if self._reading is reading:
            self._reading = None
            self._release_waiters()

    def _release_waiters(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.called:
                waiter.callback(None)

    async def _read(self, jwt: JwtConfig, generation: int) -> None:
        try:
            if jwt.jwks_url is not None:
                keys = KeySet.from_json(await self._fetch(jwt.jwks_url))
            else:
                keys = KeySet.from_json(_read_file(str(jwt.jwks_file)))
        except Exception as e:
            if generation == self._generation:  # not stopped, the source unchanged
                self._failed(jwt, e)
        else:
            if generation == self._generation:
                self._loaded(jwt, keys)

    def _loaded(self, jwt: JwtConfig, keys: KeySet) -> None:
        if self.failures:
            log.info(
                "JWKS from {source} read again after {count} failures",
                source=jwt.source,
                count=self.failures,
            )
        if keys.kids != self.keys.kids or keys.size != self.keys.size:
            log.info(
                "JWKS from {source}: {size} keys ({skipped} left out), kids {kids}",
                source=jwt.source,
                size=keys.size,
                skipped=keys.skipped,
                kids=", ".join(sorted(keys.kids)),
            )
        self.keys = keys
        self.loads += 1
        self.failures = 0

    def _failed(self, jwt: JwtConfig, error: Exception) -> None:
        if self.failures == 0:
            log.warn(
                "reading the JWKS from {source} failed ({why}); keeping the last good key "
                "set ({size} keys)",
                source=jwt.source,
                why=describe(error),
                size=self.keys.size,
            )
        self.failures += 1

    async def _fetch(self, url: str) -> bytes:
        deadline = self.reactor.seconds() + self.fetch_timeout
        # treq wants the reactor for its own timeout (unused: the whole fetch is bounded
        # here); without one it would import the global reactor.
        reactor: Any = self.reactor
        request = self._client().get(
            url, headers=_ACCEPT, allow_redirects=False, unbuffered=True, reactor=reactor
        )
        try:
            response = await request.addTimeout(self.fetch_timeout, self.reactor)
            collector = BodyCollector(MAX_JWKS_BYTES)
            response.deliverBody(collector)
            remaining = max(0.0, deadline - self.reactor.seconds())
            body: bytes = await collector.done.addTimeout(remaining, self.reactor)
        except Exception:
            if self.reactor.seconds() >= deadline:  # the cancel's error says "cancelled"
                raise JwksFetchError(f"no answer within {self.fetch_timeout:g}s") from None
            raise
        if response.code != 200:
            raise JwksFetchError(f"answered {response.code}, not 200")
        return body

    def _client(self) -> HTTPClient:
        if self._http is None:
            agent = self._agent
            if agent is None:
                self._pool = client_pool(self.reactor, 1)
                self._pool.persistent = False
                agent = Agent(self.reactor, connectTimeout=CONNECT_TIMEOUT, pool=self._pool)
            jar = IndexableCookieJar(policy=DefaultCookiePolicy(allowed_domains=[]))
            self._http = HTTPClient(agent, cookiejar=jar)
        return self._http


def _read_file(path: str) -> bytes:
    with open(path, "rb") as f:
        data = f.read(MAX_JWKS_BYTES + 1)
    if len(data) > MAX_JWKS_BYTES:
        raise KeySetError(f"the key set is over {MAX_JWKS_BYTES} bytes")
    return data
