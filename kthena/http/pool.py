"""
Idle keep-alive connections to pods, kept per pod for the next request.

At most C{max_idle} are kept per pod (a cap on idle connections, not on concurrency: a
burst opens what it needs, and the surplus closes when it ends); each closes after
C{idle_timeout} unused, which must stay below the pods' own keep-alive so that the router,
not the pod, closes an idle connection (else a request may meet one the pod is closing:
see L{kthena.http.connection.NotSentError}). The most recently used is taken first, so the
others age out when traffic drops.
"""

from __future__ import annotations

from functools import partial

from twisted.internet.defer import CancelledError, Deferred, gatherResults
from twisted.internet.error import ConnectingCancelledError
from twisted.internet.interfaces import IProtocol, IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Factory
from twisted.python.failure import Failure

from kthena.http.connection import Key, PodConnection
from kthena.http.deadline import Deadline


class _Connections(Factory):
    """Builds a pod's connections; quiet (no two log lines per connection)."""

    noisy = False

    def __init__(self, pool: ConnectionPool, key: Key) -> None:
        self.pool = pool
        self.key = key

    def buildProtocol(self, addr: object) -> PodConnection:
        return PodConnection(self.pool, self.key, Deadline(self.pool.clock))


class ConnectionPool:
    def __init__(self, clock: IReactorTime, max_idle: int, idle_timeout: float) -> None:
        self.clock = clock
        self.max_idle = max_idle
        self.idle_timeout = idle_timeout
        self.closed = False
        self._idle: dict[Key, list[PodConnection]] = {}

    def take(self, key: Key) -> PodConnection | None:
        """An idle connection to C{key}'s pod, no longer idle; None when there is none."""
        idle = self._idle.get(key)
        if not idle:
            return None
        connection = idle.pop()
        connection.idle_deadline.clear()
        return connection

    def connect(self, key: Key, endpoint: IStreamClientEndpoint) -> Deferred[PodConnection]:
        """
        A new connection to C{key}'s pod through C{endpoint} (connect timeout, TCP_NODELAY,
        TLS: L{kthena.podclient.PodEndpoints}). Cancelled, it fails with L{CancelledError},
        as a cancelled request does.
        """
        connecting: Deferred[IProtocol] = endpoint.connect(_Connections(self, key))
        connecting.addErrback(_cancelled)
        return connecting  # type: ignore[return-value]

    def release(self, connection: PodConnection) -> None:
        """A connection done with its request: kept idle, or closed when enough are."""
        if self.closed:
            connection.close()
            return
        idle = self._idle.setdefault(connection.key, [])
        idle.append(connection)
        connection.idle_deadline.set(self.idle_timeout, partial(self._discard, connection))
        if len(idle) > self.max_idle:
            self._discard(idle[0])

    def lost(self, connection: PodConnection) -> None:
        """A connection closed (by either side): no longer kept."""
        idle = self._idle.get(connection.key)
        if idle is not None and connection in idle:
            idle.remove(connection)
            if not idle:
                del self._idle[connection.key]
        connection.idle_deadline.stop()

    def count(self, key: Key) -> int:
        return len(self._idle.get(key, ()))

    def close(self) -> Deferred[None]:
        """Close every idle connection (on shutdown); later releases close at once."""
        self.closed = True
        idle = [c for connections in self._idle.values() for c in connections]
        for connection in idle:
            self.lost(connection)
        closing = [c.close() for c in idle]
        done: Deferred[None] = gatherResults(closing).addCallback(lambda _: None)
        return done

    def _discard(self, connection: PodConnection) -> None:
        self.lost(connection)
        connection.close()


def _cancelled(failure: Failure) -> Failure:
    if failure.check(ConnectingCancelledError):
        raise CancelledError()
    return failure
