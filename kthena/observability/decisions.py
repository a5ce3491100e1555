"""
The last routing decisions, for C{/debug/routing/decisions}: the records of the requests
most recently sent to pods (in flight ones included), newest last.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator

from kthena.pipeline.settle import Observer
from kthena.record import RequestRecord

DECISIONS_KEPT = 256


class DecisionRing(Observer):
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
