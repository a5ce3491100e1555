"""
The order inside one priority class of a fair queue (L{ClassQueue}): per user, that
user's requests in arrival order, and a heap of the users keyed by (recent usage, arrival
of their oldest request); and what waits in it (L{Waiter}).

Usage only grows between two expiries of the history, so a stale key is too small and is
mended when it reaches the top of the heap; when tokens leave the window (the history's
C{version} changes) the heap is rebuilt. Taking a request costs O(log users); cancelling
one costs O(1) (plus a heap push when it was its user's oldest).
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred

from kthena.fairness.usage import UsageHistory


class Waiter:
    """
    A request waiting in a queue; cancelling its Deferred (the client left) tells
    C{cancelled}.
    """

    __slots__ = ("deferred", "enqueued_at", "priority", "rank", "seq", "user")

    def __init__(
        self,
        cancelled: Callable[[Waiter], None],
        seq: int,
        user: str,
        priority: str | None,
        rank: int,
        at: float,
    ) -> None:
        self.seq = seq
        self.user = user
        self.priority = priority
        self.rank = rank
        self.enqueued_at = at
        self.deferred: Deferred[Any] = Deferred(lambda _: cancelled(self))


class ClassQueue:
    """One priority class of one model's queue."""

    __slots__ = ("count", "heap", "users", "version")

    def __init__(self) -> None:
        self.users: dict[str, OrderedDict[int, Waiter]] = {}
        self.heap: list[tuple[float, int, str]] = []  # (usage, seq of user's oldest, user)
        self.count = 0
        self.version = -1  # the history's version the heap's keys were read at

    def push(self, waiter: Waiter, history: UsageHistory) -> None:
        queued = self.users.get(waiter.user)
        if queued is None:
            queued = self.users[waiter.user] = OrderedDict()
            heapq.heappush(self.heap, (history.usage(waiter.user), waiter.seq, waiter.user))
        queued[waiter.seq] = waiter
        self.count += 1

    def remove(self, waiter: Waiter, history: UsageHistory) -> None:
        queued = self.users[waiter.user]
        oldest = next(iter(queued))
        del queued[waiter.seq]
        self.count -= 1
        if not queued:
            del self.users[waiter.user]  # its heap entry is stale: dropped when reached
        elif oldest == waiter.seq:
            heapq.heappush(self.heap, (history.usage(waiter.user), next(iter(queued)), waiter.user))
        if len(self.heap) > 2 * len(self.users) + 16:
            self._rebuild(history)

    def _rebuild(self, history: UsageHistory) -> None:
        self.heap = [(history.usage(u), next(iter(q)), u) for u, q in self.users.items()]
        heapq.heapify(self.heap)
        self.version = history.version

    def pop(self, history: UsageHistory) -> Waiter:
        """The best request of the class (the class is not empty)."""
        if self.version != history.version:
            self._rebuild(history)
        heap, users = self.heap, self.users
        while True:
            used, seq, user = heap[0]
            queued = users.get(user)
            if queued is None or next(iter(queued)) != seq:
                heapq.heappop(heap)  # stale: the user's oldest left
                continue
            now_used = history.usage(user)
            if now_used != used:
                heapq.heapreplace(heap, (now_used, seq, user))  # used more since
                continue
            waiter = queued.popitem(last=False)[1]
            self.count -= 1
            if queued:
                heapq.heapreplace(heap, (now_used, next(iter(queued)), user))
            else:
                heapq.heappop(heap)
                del users[user]
            return waiter

    def lowest(self, history: UsageHistory) -> Waiter:
        """The request that would be taken last (the class is not empty)."""
        user = max(self.users, key=lambda u: (history.usage(u), next(iter(self.users[u]))))
        return next(reversed(self.users[user].values()))
