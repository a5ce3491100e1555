"""
Stage 8, settle: a request's end, exactly once whatever happened, and the one place its
observers are registered and told (metrics, access log, decision ring; later the limiters
charging real usage and the fairness history).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from kthena.interfaces import IRequestObserver
from kthena.record import RequestRecord

log = Logger()


@implementer(IRequestObserver)
class Observer:
    """An observer that takes no event: a subclass overrides those it needs."""

    def started(self, record: RequestRecord) -> None:
        pass

    def attempt_started(self, record: RequestRecord) -> None:
        pass

    def attempt_ended(self, record: RequestRecord) -> None:
        pass

    def ended(self, record: RequestRecord) -> None:
        pass


_EVENTS = ("started", "attempt_started", "attempt_ended", "ended")


@implementer(IRequestObserver)
class Observers:
    """
    Every registered observer, told in order; one that raises is logged, not fatal.

    Each event keeps the observers' bound methods in a list of its own, made when an
    observer is added (without the events an L{Observer} leaves alone): telling them
    is then a plain loop.
    """

    def __init__(self, observers: Iterable[IRequestObserver] = ()) -> None:
        self.observers: list[IRequestObserver] = []
        self._told: dict[str, list[Callable[[RequestRecord], object]]] = {
            event: [] for event in _EVENTS
        }
        for observer in observers:
            self.add(observer)

    def add(self, observer: IRequestObserver, first: bool = False) -> None:
        """Tell C{observer} of every request from now on (before the others if C{first})."""
        at = 0 if first else len(self.observers)
        self.observers.insert(at, observer)
        for event, told in self._told.items():
            tell = getattr(observer, event)
            if getattr(tell, "__func__", None) is not getattr(Observer, event):
                told.insert(at, tell)  # the events it ignores cost nothing

    def _tell(self, event: str, record: RequestRecord) -> None:
        for tell in self._told[event]:
            try:
                tell(record)
            except Exception:
                log.failure(
                    "observer {observer} failed on {event} of {request_id}",
                    observer=type(getattr(tell, "__self__", tell)).__name__,
                    event=event,
                    request_id=record.request_id,
                )

    def started(self, record: RequestRecord) -> None:
        self._tell("started", record)

    def attempt_started(self, record: RequestRecord) -> None:
        self._tell("attempt_started", record)

    def attempt_ended(self, record: RequestRecord) -> None:
        self._tell("attempt_ended", record)

    def ended(self, record: RequestRecord) -> None:
        self._tell("ended", record)


class Settlement:
    def __init__(self, clock: IReactorTime, observers: Observers) -> None:
        self.clock = clock
        self.observers = observers

    def settle(self, record: RequestRecord, client_gone: bool = False) -> None:
        """End C{record}: its last times and status, then every observer is told."""
        if record.finished is None:
            record.finished = self.clock.seconds()
        if not record.status:
            record.status = 499 if client_gone else 502
        self.observers.ended(record)
