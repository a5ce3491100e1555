"""
An admitted request's ticket (L{Ticket}): what the fairness queue counts in flight until
the request ends and hands it back.
"""

from __future__ import annotations

from typing import Protocol

from kthena.config.fairness import ModelFairness


class Releases(Protocol):
    """The queue a ticket goes back to (L{kthena.fairness.queue.ModelQueue}): what the
    release needs of it, and whether the queue may go once idle."""

    model: str
    in_flight: int
    settings: ModelFairness | None

    def release(self, ticket: Ticket) -> None: ...


class Ticket:
    """
    An admitted request: hand it back to L{kthena.fairness.fairness.Fairness.release}
    when the request ends, whatever happened (releasing twice is harmless).

    @ivar user_label: C{user} when among the model's top users by recent usage when it
        was admitted, else C{"other"} (the C{user_id} label).
    @ivar priority: the class it was ranked in.
    @ivar waited: seconds it spent queued (0 when it went on at once).
    @ivar queue: the queue that counts it in flight (C{None}: the model has no fairness).
    """

    __slots__ = ("model", "priority", "queue", "released", "user", "user_label", "waited")

    def __init__(
        self,
        model: str,
        user: str,
        user_label: str,
        priority: str,
        waited: float,
        queue: Releases | None,
    ) -> None:
        self.model = model
        self.user = user
        self.user_label = user_label
        self.priority = priority
        self.waited = waited
        self.released = False
        self.queue = queue

    def __repr__(self) -> str:
        return (
            f"<Ticket {self.model} {self.user!r} {self.priority} waited={self.waited:.3f}s"
            f"{' released' if self.released else ''}>"
        )
