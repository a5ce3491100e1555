"""
The requests being handled, so that a shutdown can wait for them (the drain) and the
views can count them.
"""

from __future__ import annotations

from typing import Protocol

from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater

from kthena.record import RequestRecord


class Running(Protocol):
    """A request in flight: its record, and how to stop it."""

    @property
    def record(self) -> RequestRecord: ...

    def cancel(self) -> None: ...


class InFlight:
    def __init__(self) -> None:
        self._running: dict[int, Running] = {}
        self._idle_waiters: list[Deferred[None]] = []

    def __len__(self) -> int:
        return len(self._running)

    def records(self) -> list[RequestRecord]:
        return [r.record for r in self._running.values()]

    def add(self, running: Running) -> None:
        self._running[id(running)] = running

    def remove(self, running: Running) -> None:
        self._running.pop(id(running), None)
        if not self._running:
            waiters, self._idle_waiters = self._idle_waiters, []
            for waiter in waiters:
                waiter.callback(None)

    async def drain(self, clock: IReactorTime, timeout: float) -> int:
        """
        Wait for the requests in flight, up to C{timeout} seconds, then cancel what is left.

        @return: how many had to be cancelled.
        """
        if self._running:
            idle: Deferred[None] = Deferred()
            self._idle_waiters.append(idle)
            timer = deferLater(clock, timeout, lambda: None)
            await DeferredList([idle, timer], fireOnOneCallback=True, consumeErrors=True)
            if not timer.called:
                timer.cancel()
            if idle in self._idle_waiters:
                self._idle_waiters.remove(idle)
        left = list(self._running.values())
        for running in left:
            running.cancel()
        return len(left)
