"""
Stage 8, settle: a request's end, exactly once whatever happened, and the one place its
observers are registered and told (metrics, access log, decision ring; later the limiters
charging real usage and the fairness history).
"""

from __future__ import annotations

from collections.abc import Iterable

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from kthena.interfaces import IRequestObserver
from kthena.record import RequestRecord

log = Logger()


@implementer(IRequestObserver)
class Observers:
    """Every registered observer, told in order; one that raises is logged, not fatal."""

    def __init__(self, observers: Iterable[IRequestObserver] = ()) -> None:
        self.observers = list(observers)

    def add(self, observer: IRequestObserver) -> None:
        self.observers.append(observer)

    def _tell(self, event: str, record: RequestRecord) -> None:
        for observer in self.observers:
            try:
                getattr(observer, event)(record)
            except Exception:
                log.failure(
                    "observer {observer} failed on {event} of {request_id}",
                    observer=observer.__class__.__name__,
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
