"""
A connection's one deadline at a time, on one reactor call that moves instead of being
cancelled and made again.

A keep-alive connection changes deadlines several times a request (the head's, the
body's, the idle one between requests; a pooled connection's idle one), and a
C{callLater} and its C{cancel} cost ~3.5 us each time. L{Deadline} keeps one call and
moves it (C{reset}: 0.4 us for a later time, which the reactor re-sorts only when the
old one comes), and a cleared deadline leaves it to fire for nothing. Each deadline
fires at its exact time.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.interfaces import IDelayedCall, IReactorTime


class Deadline:
    __slots__ = ("_call", "_clock", "_then")

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self._call: IDelayedCall | None = None
        self._then: Callable[[], None] | None = None

    def armed(self) -> bool:
        """A deadline is set (and has not passed)."""
        return self._then is not None

    def set(self, seconds: float, then: Callable[[], None]) -> None:
        """Call C{then()} in C{seconds}, instead of what was set before."""
        self._then = then
        if self._call is None:
            self._call = self._clock.callLater(seconds, self._fire)
        else:
            self._call.reset(seconds)

    def clear(self) -> None:
        """No deadline (the call, if any, fires for nothing)."""
        self._then = None

    def stop(self) -> None:
        """No deadline and no call left (the connection is gone)."""
        self._then = None
        call, self._call = self._call, None
        if call is not None and call.active():
            call.cancel()

    def _fire(self) -> None:
        self._call = None
        then, self._then = self._then, None
        if then is not None:
            then()
