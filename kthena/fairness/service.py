"""
The fairness queues as a part of the router's tree (L{FairQueues}): the queues of
L{kthena.fairness.fairness.Fairness}, the observer that hands every request's ticket back
and feeds the users' usage history when it ends, and the two metric families.

In the tree before the data plane: the plane drains first (queued requests may still go
on while requests in flight end and free their slots), then stopping this fails what is
still queued (503) and leaves no timer.

Metrics, with a bounded C{user_id} (a model's C{topUsers} users by recent usage by name,
everyone else as C{other}): the queue-duration histogram is observed as each request is
admitted (0 for one that went on at once); the queue-size gauge is set from the queues just
before each scrape is rendered (on the reactor thread), and only the current labels are
kept in either family, so a user who left the top N leaves no series behind.
"""

from __future__ import annotations

from prometheus_client import Gauge, Histogram
from twisted.application.service import Service
from zope.interface import implementer

from kthena.config.router import RouterConfig
from kthena.fairness.fairness import OTHER, Fairness, Ticket
from kthena.interfaces import IReconfigurable, IServerReactor
from kthena.pipeline.settle import Observer
from kthena.record import RequestRecord


class _Settled(Observer):
    """Each request's end: its ticket released, its tokens in its user's history."""

    def __init__(self, fairness: Fairness) -> None:
        self.fairness = fairness

    def ended(self, record: RequestRecord) -> None:
        ticket = record.ticket
        if not isinstance(ticket, Ticket):
            return
        record.ticket = None
        self.fairness.release(ticket)
        if record.dispatched:
            self.fairness.record_usage(
                ticket.model, ticket.user, record.input_tokens, record.output_tokens
            )


@implementer(IReconfigurable)
class FairQueues(Service):
    """
    @ivar fairness: the queues (the admit stage asks it).
    @ivar observer: settles each request (register it with the data plane's observers).
    """

    name = "fairness"

    def __init__(
        self,
        reactor: IServerReactor,
        config: RouterConfig,
        sizes: Gauge | None = None,
        durations: Histogram | None = None,
    ) -> None:
        """
        @param sizes: the C{kthena_router_fairness_queue_size} gauge (labels model, user_id).
        @param durations: the C{kthena_router_fairness_queue_duration_seconds} histogram.
        """
        self.sizes = sizes
        self.durations = durations
        self._sized: set[tuple[str, str]] = set()  # the gauge's series
        self._timed: set[tuple[str, str]] = set()  # the histogram's series
        self.fairness = Fairness(reactor, config.fairness, self._admitted)
        self.observer = _Settled(self.fairness)

    def reconfigure(self, config: RouterConfig) -> None:
        self.fairness.configure(config.fairness)

    def startService(self) -> None:
        super().startService()
        self.fairness.start()

    def stopService(self) -> None:
        super().stopService()
        self.fairness.stop()

    def _admitted(self, ticket: Ticket) -> None:
        if self.durations is not None:
            labels = (ticket.model, ticket.user_label)
            self.durations.labels(*labels).observe(ticket.waited)
            self._timed.add(labels)

    def before_scrape(self) -> None:
        """Set the gauge from the queues; drop the series of labels no longer current."""
        fairness = self.fairness
        models = [m.model for m in fairness.config.models]
        current = {(model, user) for model in models for user in fairness.named_users(model)}
        if self.sizes is not None:
            sizes = fairness.queue_sizes()
            for model in models:
                sizes.setdefault((model, OTHER), 0)
            _keep_only(self.sizes, self._sized, set(sizes))
            for labels, n in sizes.items():
                self.sizes.labels(*labels).set(n)
            self._sized.update(sizes)
        if self.durations is not None:
            _keep_only(self.durations, self._timed, current)

    def state(self) -> dict[str, dict[str, object]]:
        """Each queue, for C{/debug/router/state}."""
        return self.fairness.state()


def _keep_only(
    family: Gauge | Histogram, made: set[tuple[str, str]], wanted: set[tuple[str, str]]
) -> None:
    """Remove the series of C{family} in C{made} (those made so far) but not C{wanted}."""
    for labels in made - wanted:
        family.remove(*labels)
    made.intersection_update(wanted)
