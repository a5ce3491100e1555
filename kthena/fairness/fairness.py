"""
The fairness stage's state: one fair queue (L{kthena.fairness.queue.ModelQueue}) per model
the C{fairness} config lists, each with its own usage history; requests for any other
model go on at once.

A request asks L{Fairness.admit} and gets a L{Ticket} when it may go on (or a 504 after
the model's timeout, or a 503 when the queue is full and it is the work to shed); it hands
the ticket to L{Fairness.release} when it ends, whatever happened. Cancelling the
Deferred (the client left) takes the request out of the queue at once. On the hot path,
L{Fairness.admit_now} answers the common case (room, nobody queued) without a Deferred.

Labels: a user is named (in C{user_id} labels and the debug view) while among the model's
C{topUsers} users by weighted usage in the window, with some usage; every other user is
C{"other"}. So a model has at most C{topUsers + 1} label values at any time; a user's label
changes when their usage ranks them in or out (L{Fairness.named_users} tells which series
are current, for a collector that drops the others).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime

from kthena.config.fairness import FairnessConfig
from kthena.fairness.queue import OTHER, ModelQueue
from kthena.fairness.ticket import Ticket

__all__ = ["OTHER", "Fairness", "HasFairness", "Ticket"]


class HasFairness(Protocol):
    """What L{Fairness.reconfigure} reads of the router config."""

    @property
    def fairness(self) -> FairnessConfig: ...


class Fairness:
    """
    @param on_admit: called with every ticket of a model with fairness as it is admitted
        (at once, C{waited} 0, or from the queue): the queue-duration histogram's hook.
    """

    def __init__(
        self,
        clock: IReactorTime,
        config: FairnessConfig | None = None,
        on_admit: Callable[[Ticket], None] | None = None,
    ) -> None:
        self.clock = clock
        self.on_admit = on_admit
        self.config = FairnessConfig()
        self._queues: dict[str, ModelQueue] = {}
        self._stopped = False
        self.configure(config or FairnessConfig())

    # settings

    def reconfigure(self, config: HasFairness) -> None:
        self.configure(config.fairness)

    def configure(self, config: FairnessConfig) -> None:
        """
        New settings apply to the queues as they are; a model no longer listed lets its
        queued requests on at once, in order.
        """
        self.config = config
        wanted = {m.model: m for m in config.models}
        for name, queue in list(self._queues.items()):
            if name not in wanted and queue.settings is not None:
                queue.disable()
                if queue.in_flight <= 0 and self._queues.get(name) is queue:
                    del self._queues[name]
        for name, settings in wanted.items():
            found = self._queues.get(name)
            if found is None:
                found = self._queues[name] = ModelQueue(name, self.clock, self.on_admit)
                found.stopped = self._stopped
            found.configure(settings, config)

    def configured(self, model: str) -> bool:
        """Whether C{model} has a fair queue."""
        queue = self._queues.get(model)
        return queue is not None and queue.settings is not None

    # requests

    def admit_now(self, model: str, user: str, priority: str | None = None) -> Ticket | None:
        """
        L{admit}'s answer when it is immediate, without a Deferred (the common case, for
        callers on the hot path): a L{Ticket}, or C{None} when the request would have to
        wait or be refused (then call L{admit}). Nothing changes when it answers C{None}.
        """
        queue = self._queues.get(model)
        if queue is None or queue.settings is None:
            if priority is None or priority not in self.config.priorities:
                priority = self.config.default_priority
            return Ticket(model, user, OTHER, priority, 0.0, None)
        return queue.admit_now(user, priority)

    def admit(self, model: str, user: str, priority: str | None = None) -> Deferred[Ticket]:
        """
        A Deferred that fires with a L{Ticket} when the request may go on: at once when
        C{model} has no fairness, or there is room and nothing is queued.

        @param priority: the priority class; not given or not configured: the config's
            default class (L{FairnessConfig.default_priority}).
        @return: fails with L{ProxyError} 504 (C{queue_timeout}) after the model's
            timeout, 503 (C{shed}) when the queue is full and this is the request to shed,
            503 (C{draining}) on L{stop}. Cancelling it takes the request out of the queue.
        """
        queue = self._queues.get(model)
        if queue is None or queue.settings is None:
            ticket = self.admit_now(model, user, priority)
            assert ticket is not None
            return succeed(ticket)
        return queue.admit(user, priority)

    def release(self, ticket: Ticket) -> None:
        """The ticket's request ended: its concurrency slot goes to the next. Idempotent."""
        if ticket.released:
            return
        ticket.released = True
        queue = ticket.queue
        if queue is None:
            return
        queue.release(ticket)
        idle = queue.settings is None and queue.in_flight <= 0
        model = queue.model
        if idle and self._queues.get(model) is queue:
            del self._queues[model]

    def record_usage(self, model: str, user: str, input_tokens: int, output_tokens: int) -> None:
        """A response's usage, for the model's history (ignored when it has no fairness)."""
        queue = self._queues.get(model)
        if queue is not None and queue.settings is not None:
            queue.history.record(self.clock.seconds(), user, input_tokens, output_tokens)

    # lifecycle

    def stop(self) -> None:
        """
        Every queued request fails with 503 (C{draining}), no timer is left, and from now
        on a request that would have to wait is refused the same way (one with room still
        goes on: the requests draining may finish).
        """
        self._stopped = True
        for queue in list(self._queues.values()):
            queue.stop()

    def start(self) -> None:
        """Undo L{stop} (the service started again)."""
        self._stopped = False
        for queue in self._queues.values():
            queue.stopped = False

    # views

    def user_label(self, model: str, user: str) -> str:
        """C{user} while among the model's top users by recent usage, else C{"other"}."""
        queue = self._queues.get(model)
        if queue is None or queue.settings is None:
            return OTHER
        return queue.label(user)

    def named_users(self, model: str) -> frozenset[str]:
        """The label values of C{model} now, C{"other"} included."""
        queue = self._queues.get(model)
        if queue is None or queue.settings is None:
            return frozenset({OTHER})
        queue.history.advance(self.clock.seconds())
        return queue.history.top(queue.top_users) | {OTHER}

    def queue_sizes(self) -> dict[tuple[str, str], int]:
        """
        Queued requests per (model, user label), for the C{kthena_router_fairness_queue_size}
        gauge; pairs with none queued are left out (set them to 0 or drop their series).
        """
        return {
            (model, label): n
            for model, queue in self._queues.items()
            if queue.settings is not None
            for label, n in queue.sizes().items()
        }

    def state(self) -> dict[str, dict[str, object]]:
        """A JSON-ready view per model (debug): queue, classes, users, in flight, settings."""
        return {model: queue.state() for model, queue in self._queues.items()}
