"""
A connection's one deadline at a time, on one reactor call that moves instead of being
cancelled and made again.

A keep-alive connection changes deadlines several times a request (the head's, the
body's, the idle one between requests; a pooled connection's idle one), and a
C{callLater} and its C{cancel} cost ~3.5 us each time. L{Deadline} keeps one call: a
deadline later than the call's time leaves the call as it is (when it fires, it finds
the deadline further on and waits the rest), a sooner one moves it (C{reset}), a cleared
one leaves it to fire for nothing. Under steady traffic that is no timer operation at
all; each deadline still fires at its exact time.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.interfaces import IDelayedCall, IReactorTime


class Deadline:
    __slots__ = ("_call", "_clock", "_due", "_then")

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self._call: IDelayedCall | None = None
        self._due = 0.0
        self._then: Callable[[], None] | None = None

    def armed(self) -> bool:
        """A deadline is set (and has not passed)."""
        return self._then is not None

    def set(self, seconds: float, then: Callable[[], None]) -> None:
        """Call C{then()} in C{seconds}, instead of what was set before."""
        due = self._clock.seconds() + seconds
        self._due, self._then = due, then
        call = self._call
        if call is None:
            self._call = self._clock.callLater(seconds, self._fire)
        elif due < call.getTime():
            call.reset(seconds)

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
        then = self._then
        if then is None:
            return
        remaining = self._due - self._clock.seconds()
        if remaining > 0:  # moved later since the call was made
            self._call = self._clock.callLater(remaining, self._fire)
            return
        self._then = None
        then()
