"""
The last routing decisions, for C{/debug/routing/decisions}: the records of the requests
most recently sent to pods (in flight ones included), newest last.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator

from zope.interface import implementer

from kthena.interfaces import IRequestObserver
from kthena.record import RequestRecord

DECISIONS_KEPT = 256


@implementer(IRequestObserver)
class DecisionRing:
    def __init__(self, size: int = DECISIONS_KEPT) -> None:
        self.size = size
        self._records: deque[RequestRecord] = deque(maxlen=size)

    def __iter__(self) -> Iterator[RequestRecord]:
        return iter(self._records)

    def __reversed__(self) -> Iterator[RequestRecord]:
        return reversed(self._records)

    def __len__(self) -> int:
        return len(self._records)

    def started(self, record: RequestRecord) -> None:
        self._records.append(record)

    def attempt_started(self, record: RequestRecord) -> None:
        pass

    def attempt_ended(self, record: RequestRecord) -> None:
        pass

    def ended(self, record: RequestRecord) -> None:
        pass
