"""
Fault injection for the simulator, switchable while it runs (C{/sim/faults}), so a test can
make a pod go bad and recover without restarting it.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass, fields
from typing import Any


@dataclass(slots=True)
class Faults:
    """
    What goes wrong, and how often.

    @ivar error_rate: share (0..1) of inference requests answered with C{error_status}.
    @ivar error_status: the HTTP status of injected errors (400..599).
    @ivar abort_rate: share of inference requests whose connection is dropped before any
        response header is sent.
    @ivar drop_after_tokens: drop the connection after this many output tokens (streams:
        after that many token events; non-streams: instead of the response); None: never.
    @ivar slowdown: multiplies prefill and decode time (1 is normal speed).
    @ivar metrics_down: C{/metrics} answers 503 (a router's scrapes fail) while
        inference goes on.
    """

    error_rate: float = 0.0
    error_status: int = 500
    abort_rate: float = 0.0
    drop_after_tokens: int | None = None
    slowdown: float = 1.0
    metrics_down: bool = False

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def update(self, changes: object) -> None:
        """
        Apply a partial update, all or nothing.

        @raise ValueError: naming the first unknown field or bad value.
        """
        if not isinstance(changes, dict):
            raise ValueError("the body must be a JSON object")
        known = {f.name for f in fields(self)}
        candidate = Faults(**self.as_dict())
        for key, value in changes.items():
            if key not in known:
                raise ValueError(f"unknown field '{key}'; known: {', '.join(sorted(known))}")
            setattr(candidate, key, _check(key, value))
        for f in fields(self):
            setattr(self, f.name, getattr(candidate, f.name))

    def reset(self) -> None:
        self.update(Faults().as_dict())


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check(key: str, value: object) -> object:
    if key in ("error_rate", "abort_rate"):
        if not _is_number(value) or not 0 <= value <= 1:  # type: ignore[operator]
            raise ValueError(f"{key} must be a number from 0 to 1")
        return float(value)  # type: ignore[arg-type]
    if key == "error_status":
        if not isinstance(value, int) or isinstance(value, bool) or not 400 <= value <= 599:
            raise ValueError("error_status must be an HTTP error status (400..599)")
        return value
    if key == "metrics_down":
        if not isinstance(value, bool):
            raise ValueError("metrics_down must be true or false")
        return value
    if key == "drop_after_tokens":
        if value is None:
            return None
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError("drop_after_tokens must be a whole number >= 0, or null")
        return value
    # slowdown
    if not _is_number(value) or not 0 < value < math.inf:  # type: ignore[operator]
        raise ValueError("slowdown must be a number > 0")
    return float(value)  # type: ignore[arg-type]


class FaultDice:
    """Draws whether a request is hit, from a seeded generator so runs repeat."""

    def __init__(self, faults: Faults, seed: int | None = None) -> None:
        self.faults = faults
        self._random = random.Random(seed)

    def error(self) -> bool:
        return self._hit(self.faults.error_rate)

    def abort(self) -> bool:
        return self._hit(self.faults.abort_rate)

    def _hit(self, rate: float) -> bool:
        return rate > 0 and self._random.random() < rate
