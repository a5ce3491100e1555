"""
One model's fair queue: requests wait here until the model's concurrency and QPS allow
them on, best first.

The order among queued requests: the priority class first (in the config's order), then
the user's recent weighted usage (L{kthena.fairness.usage}; less first, read when a
request is taken, so usage recorded while waiting counts), then first come first served
within a user; between users of equal usage, whose oldest request came first.

Each class is a L{kthena.fairness.order.ClassQueue}: taking a request costs O(log users),
cancelling one O(1).

Time is the reactor's: one delayed call per queue for the oldest request's timeout (the
queue's timeout is the same for all, so the oldest times out first), and one for the QPS
bucket when only it holds the queue back. Neither exists while the queue is empty.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from itertools import count

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from kthena.config.fairness import SHEDDABLE, FairnessConfig, ModelFairness
from kthena.errors import ErrorType, ProxyError
from kthena.fairness.order import ClassQueue, Waiter
from kthena.fairness.ticket import Ticket
from kthena.fairness.usage import UsageHistory

log = Logger()

OTHER = "other"
"""The label of every user outside the top N by recent usage."""

_EPSILON = 1e-9


class ModelQueue:
    """
    One model's queue; L{kthena.fairness.fairness.Fairness} keeps one per configured model.

    @ivar settings: C{None} once the model left the config (the queue then only counts
        the tickets still out, until they are released).
    @ivar in_flight: admitted and not yet released.
    """

    def __init__(
        self, model: str, clock: IReactorTime, on_admit: Callable[[Ticket], None] | None
    ) -> None:
        self.model = model
        self.clock = clock
        self.on_admit = on_admit
        self.settings: ModelFairness | None = None
        self.priorities: tuple[str, ...] = ()
        self.top_users = 0
        self.history = UsageHistory(300.0, 1.0, 2.0)
        self.in_flight = 0
        self.stopped = False
        self._seq = count()
        self._arrivals: OrderedDict[int, Waiter] = OrderedDict()
        self._classes: list[ClassQueue] = []
        self._ranks: dict[str, int] = {}
        self._default_rank = 0
        self._shed_rank: int | None = None
        self._per_user: dict[str, int] = {}
        self._tokens = 0.0
        self._tokens_at = 0.0
        self._timeout_call: IDelayedCall | None = None
        self._pace_call: IDelayedCall | None = None
        self._pumping = False

    def __len__(self) -> int:
        return len(self._arrivals)

    # settings

    def configure(self, settings: ModelFairness, config: FairnessConfig) -> None:
        """New settings; the queued requests stay, re-ranked if the classes changed."""
        now = self.clock.seconds()
        self._refill(now)
        old = self.settings
        self.settings = settings
        if settings.qps is not None:
            capacity = max(settings.qps, 1.0)
            if old is None or old.qps is None:
                self._tokens = capacity
            else:
                self._tokens = min(self._tokens, capacity)
            self._tokens_at = now
        self.top_users = config.top_users
        self.history.configure(config.window, config.input_weight, config.output_weight)
        if config.priorities != self.priorities:
            self._set_classes(config)
        self._pump()

    def _set_classes(self, config: FairnessConfig) -> None:
        self.priorities = config.priorities
        self._ranks = {name: i for i, name in enumerate(config.priorities)}
        self._default_rank = self._ranks[config.default_priority]
        self._shed_rank = self._ranks.get(SHEDDABLE)
        self._classes = [ClassQueue() for _ in config.priorities]
        for waiter in self._arrivals.values():
            waiter.rank = self._rank(waiter.priority)
            self._classes[waiter.rank].push(waiter, self.history)

    def _rank(self, priority: str | None) -> int:
        if priority is None:
            return self._default_rank
        return self._ranks.get(priority, self._default_rank)

    def disable(self) -> None:
        """The model left the config: every queued request goes on at once, in order."""
        self.settings = None
        self._schedule()
        now = self.clock.seconds()
        while self._arrivals:
            self._admit_next(now)

    # admission

    def admit_now(self, user: str, priority: str | None) -> Ticket | None:
        """A ticket if the request may go on at once (room, nobody queued), else C{None}."""
        settings = self.settings
        assert settings is not None
        now = self.clock.seconds()
        if not self._arrivals and self._can_admit(now, settings):
            self._take(settings)
            return self._ticket(now, user, self._rank(priority), 0.0)
        return None

    def admit(self, user: str, priority: str | None) -> Deferred[Ticket]:
        ticket = self.admit_now(user, priority)
        if ticket is not None:
            return succeed(ticket)
        settings = self.settings
        assert settings is not None
        now = self.clock.seconds()
        rank = self._rank(priority)
        if self.stopped:
            return fail(ProxyError(503, ErrorType.DRAINING, "the router is shutting down"))
        victim = None
        if len(self._arrivals) >= settings.max_length:
            if rank == self._shed_rank or self._shed_rank is None:
                return fail(self._full())
            shed = self._classes[self._shed_rank]
            if not shed.count:
                return fail(self._full())
            self.history.advance(now)
            victim = shed.lowest(self.history)
            self._remove(victim)
        waiter = Waiter(self._cancelled, next(self._seq), user, priority, rank, now)
        self._arrivals[waiter.seq] = waiter
        self._classes[rank].push(waiter, self.history)
        self._per_user[user] = self._per_user.get(user, 0) + 1
        self._schedule()
        if victim is not None:
            victim.deferred.errback(
                ProxyError(
                    503,
                    ErrorType.SHED,
                    f"shed from the full fairness queue of model {self.model} "
                    "to make room for higher-priority work",
                )
            )
        return waiter.deferred

    def _full(self) -> ProxyError:
        return ProxyError(
            503,
            ErrorType.SHED,
            f"the fairness queue of model {self.model} is full "
            f"({len(self._arrivals)} requests waiting)",
        )

    def release(self, ticket: Ticket) -> None:
        self.in_flight -= 1
        self._pump()

    def _refill(self, now: float) -> None:
        settings = self.settings
        if settings is None or settings.qps is None:
            return
        level = self._tokens + (now - self._tokens_at) * settings.qps
        self._tokens = min(max(settings.qps, 1.0), level)
        self._tokens_at = now

    def _can_admit(self, now: float, settings: ModelFairness) -> bool:
        if settings.max_concurrency is not None and self.in_flight >= settings.max_concurrency:
            return False
        if settings.qps is not None:
            self._refill(now)
            if self._tokens < 1.0 - _EPSILON:
                return False
        return True

    def _take(self, settings: ModelFairness | None) -> None:
        self.in_flight += 1
        if settings is not None and settings.qps is not None:
            self._tokens -= 1.0

    def _ticket(self, now: float, user: str, rank: int, waited: float) -> Ticket:
        self.history.advance(now)
        label = user if user in self.history.top(self.top_users) else OTHER
        ticket = Ticket(self.model, user, label, self.priorities[rank], waited, self)
        if self.on_admit is not None:
            try:
                self.on_admit(ticket)
            except Exception:
                log.failure("fairness admission observer failed (model {model})", model=self.model)
        return ticket

    def _pump(self) -> None:
        """Let queued requests on while there is room; then set the timers."""
        if self._pumping:
            return  # a callback of an admission: the loop below sees what it changed
        self._pumping = True
        try:
            settings = self.settings
            if settings is not None:
                now = self.clock.seconds()
                while self._arrivals and self._can_admit(now, settings):
                    self._admit_next(now)
        finally:
            self._pumping = False
        self._schedule()

    def _admit_next(self, now: float) -> None:
        self.history.advance(now)
        for queue in self._classes:
            if queue.count:
                waiter = queue.pop(self.history)
                break
        else:  # pragma: no cover - the arrivals and the classes hold the same requests
            raise AssertionError("a queued request in no class")
        del self._arrivals[waiter.seq]
        self._forget_user(waiter.user)
        self._take(self.settings)
        waited = now - waiter.enqueued_at
        waiter.deferred.callback(self._ticket(now, waiter.user, waiter.rank, waited))

    def _remove(self, waiter: Waiter) -> None:
        del self._arrivals[waiter.seq]
        self._classes[waiter.rank].remove(waiter, self.history)
        self._forget_user(waiter.user)

    def _forget_user(self, user: str) -> None:
        left = self._per_user[user] - 1
        if left:
            self._per_user[user] = left
        else:
            del self._per_user[user]

    def _cancelled(self, waiter: Waiter) -> None:
        if waiter.seq in self._arrivals:
            self._remove(waiter)
            self._schedule()

    # time

    def _schedule(self) -> None:
        settings = self.settings
        if settings is None or not self._arrivals:
            self._cancel_timers()
            return
        now = self.clock.seconds()
        oldest = next(iter(self._arrivals.values()))
        self._timeout_call = self._set(
            self._timeout_call, oldest.enqueued_at + settings.timeout - now, self._on_timeout
        )
        held_by_concurrency = (
            settings.max_concurrency is not None and self.in_flight >= settings.max_concurrency
        )
        if settings.qps is not None and not held_by_concurrency:
            self._refill(now)
            if self._tokens < 1.0 - _EPSILON:
                delay = (1.0 - self._tokens) / settings.qps
                self._pace_call = self._set(self._pace_call, delay, self._on_pace)
                return
        if self._pace_call is not None:
            self._pace_call.cancel()
            self._pace_call = None

    def _set(self, call: IDelayedCall | None, delay: float, f: Callable[[], None]) -> IDelayedCall:
        delay = max(0.0, delay)
        if call is not None:
            if abs(call.getTime() - (self.clock.seconds() + delay)) > _EPSILON:
                call.reset(delay)
            return call
        return self.clock.callLater(delay, f)

    def _cancel_timers(self) -> None:
        if self._timeout_call is not None:
            self._timeout_call.cancel()
            self._timeout_call = None
        if self._pace_call is not None:
            self._pace_call.cancel()
            self._pace_call = None

    def _on_pace(self) -> None:
        self._pace_call = None
        self._pump()

    def _on_timeout(self) -> None:
        self._timeout_call = None
        settings = self.settings
        if settings is None:
            return
        now = self.clock.seconds()
        expired = []
        for waiter in self._arrivals.values():
            if waiter.enqueued_at + settings.timeout > now + _EPSILON:
                break
            expired.append(waiter)
        for waiter in expired:
            self._remove(waiter)
        self._schedule()
        for waiter in expired:
            waiter.deferred.errback(
                ProxyError(
                    504,
                    ErrorType.QUEUE_TIMEOUT,
                    f"waited {settings.timeout:g}s in the fairness queue of model {self.model}",
                )
            )

    def stop(self) -> None:
        """Fail every queued request (503, draining); from now on nothing waits."""
        self.stopped = True
        waiters = list(self._arrivals.values())
        for waiter in waiters:
            self._remove(waiter)
        self._cancel_timers()
        for waiter in waiters:
            waiter.deferred.errback(
                ProxyError(503, ErrorType.DRAINING, "the router is shutting down")
            )

    # views

    def label(self, user: str) -> str:
        self.history.advance(self.clock.seconds())
        return user if user in self.history.top(self.top_users) else OTHER

    def sizes(self) -> dict[str, int]:
        """Queued requests per user label."""
        self.history.advance(self.clock.seconds())
        top = self.history.top(self.top_users)
        sizes: dict[str, int] = {}
        for user, n in self._per_user.items():
            label = user if user in top else OTHER
            sizes[label] = sizes.get(label, 0) + n
        return sizes

    def state(self) -> dict[str, object]:
        now = self.clock.seconds()
        history = self.history
        history.advance(now)
        top = history.top(self.top_users)
        total = history.total()
        users: dict[str, dict[str, float]] = {}

        def entry(user: str) -> dict[str, float]:
            label = user if user in top else OTHER
            found = users.get(label)
            if found is None:
                found = users[label] = {"queued": 0, "usage": 0.0, "usage_share": 0.0}
            return found

        for user, n in self._per_user.items():
            entry(user)["queued"] += n
        for user in history.users():
            entry(user)["usage"] += history.usage(user)
        for found in users.values():
            found["usage_share"] = found["usage"] / total if total > 0 else 0.0
        oldest = next(iter(self._arrivals.values()), None)
        settings = self.settings
        self._refill(now)
        return {
            "length": len(self._arrivals),
            "oldest_wait_seconds": None if oldest is None else now - oldest.enqueued_at,
            "in_flight": self.in_flight,
            "classes": {name: self._classes[i].count for i, name in enumerate(self.priorities)},
            "users": users,
            "recent_usage": total,
            "qps_tokens": None if settings is None or settings.qps is None else self._tokens,
            "settings": None
            if settings is None
            else {
                "max_concurrency": settings.max_concurrency,
                "qps": settings.qps,
                "timeout_seconds": settings.timeout,
                "max_length": settings.max_length,
                "window_seconds": history.window,
                "input_weight": history.input_weight,
                "output_weight": history.output_weight,
                "top_users": self.top_users,
            },
        }
