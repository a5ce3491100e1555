"""
One model's usage history: the tokens each user used over a sliding window, weighted
(C{input_weight * input + output_weight * output}), the key of the fairness order, and the
top users by it (who is named in metric labels).

The window is kept in C{SLOTS} slots of C{window / SLOTS} seconds on the reactor's clock:
tokens recorded at time t count until the end of the window that begins with their slot,
that is for between C{window - window / SLOTS} and C{window} seconds. Memory is one entry
per user and slot with usage in the window; a user whose usage left the window is
forgotten. Raw input and output counts are kept, so new weights apply to the history.
"""

from __future__ import annotations

import heapq
import math
from collections import deque

SLOTS = 60


class _Slot:
    __slots__ = ("start", "users")

    def __init__(self, start: float) -> None:
        self.start = start
        self.users: dict[str, list[float]] = {}  # user -> [input, output]


class _Total:
    __slots__ = ("input", "output", "slots")

    def __init__(self) -> None:
        self.input = 0.0
        self.output = 0.0
        self.slots = 0  # how many slots hold some of it: forgotten at 0


class UsageHistory:
    """
    @ivar version: changes whenever some user's usage may have gone down (tokens left the
        window, the weights changed): a queue keyed by usage re-sorts then.
    """

    def __init__(self, window: float, input_weight: float, output_weight: float) -> None:
        self._slots: deque[_Slot] = deque()
        self._totals: dict[str, _Total] = {}
        self.version = 0
        self._top: frozenset[str] | None = None
        self._top_n = -1
        self._top_floor = 0.0
        self.configure(window, input_weight, output_weight)

    def configure(self, window: float, input_weight: float, output_weight: float) -> None:
        self.window = window
        self._slot_width = window / SLOTS
        self.input_weight = input_weight
        self.output_weight = output_weight
        self._changed()

    def _changed(self) -> None:
        self.version += 1
        self._top = None

    def advance(self, now: float) -> None:
        """Forget the slots whose window ended."""
        slots = self._slots
        if not slots or slots[0].start + self.window > now:
            return
        totals = self._totals
        while slots and slots[0].start + self.window <= now:
            for user, (used_in, used_out) in slots.popleft().users.items():
                total = totals[user]
                total.slots -= 1
                if total.slots == 0:
                    del totals[user]
                else:
                    total.input -= used_in
                    total.output -= used_out
        self._changed()

    def record(self, now: float, user: str, input_tokens: float, output_tokens: float) -> None:
        self.advance(now)
        slots = self._slots
        start = math.floor(now / self._slot_width) * self._slot_width
        if not slots or slots[-1].start < start:
            slots.append(_Slot(start))
        slot = slots[-1]  # after a longer window's first record, an earlier grid's slot
        total = self._totals.get(user)
        if total is None:
            total = self._totals[user] = _Total()
        used = slot.users.get(user)
        if used is None:
            used = slot.users[user] = [0.0, 0.0]
            total.slots += 1
        used[0] += input_tokens
        used[1] += output_tokens
        total.input += input_tokens
        total.output += output_tokens
        top = self._top
        if (
            top is not None
            and self._top_n > 0
            and user not in top
            and (len(top) < self._top_n or self.usage(user) >= self._top_floor)
        ):
            self._top = None

    def usage(self, user: str) -> float:
        """The user's weighted usage in the window (as of the last L{advance})."""
        total = self._totals.get(user)
        if total is None:
            return 0.0
        return self.input_weight * total.input + self.output_weight * total.output

    def total(self) -> float:
        """Every user's weighted usage in the window."""
        wi, wo = self.input_weight, self.output_weight
        return sum((wi * t.input + wo * t.output for t in self._totals.values()), 0.0)

    def users(self) -> list[str]:
        return list(self._totals)

    def top(self, n: int) -> frozenset[str]:
        """
        The (at most) C{n} users with the most weighted usage in the window, among those
        with some (ties: the smaller name). Cached until it may have changed.
        """
        if self._top is not None and self._top_n == n:
            return self._top
        usage = self.usage
        ranked = heapq.nsmallest(
            n, (u for u in self._totals if usage(u) > 0), key=lambda u: (-usage(u), u)
        )
        self._top = frozenset(ranked)
        self._top_n = n
        self._top_floor = usage(ranked[-1]) if ranked else 0.0
        return self._top
