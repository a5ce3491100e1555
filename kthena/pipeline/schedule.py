"""
Stage 5, schedule: the matched server's pods that may take the request (the healthy ones;
all that serve when none is healthy, better a slow answer than none), the input-token
estimate, then the scheduler's plugins: filters, weighted scores, ranked candidates. The
decision (every candidate's score per plugin) goes into the record. For a prefill/decode
server the candidates are its decode pods, and the record keeps the plan that pairs each
with a prefill pod of its group (L{kthena.pd.pairs}).

The scheduler is rebuilt when its config section changes, and otherwise kept, so that a
reload does not forget what the prefix index learned.
"""

from __future__ import annotations

from collections.abc import Sequence

from twisted.logger import Logger

from kthena.config.resources import ModelServer
from kthena.config.router import RouterConfig
from kthena.errors import ErrorType, ProxyError
from kthena.interfaces import IScheduler, ITokenEstimator
from kthena.pd.pairs import PDPlan
from kthena.pipeline.health import Health
from kthena.pipeline.parse import Parsed
from kthena.pods import PodEndpoint
from kthena.record import RequestRecord
from kthena.scheduler.build import build_scheduler
from kthena.scheduler.framework import Decision, SchedulingRequest, Timer
from kthena.store import Datastore, RouteMatch

log = Logger()


class Scheduling:
    """
    @ivar scheduler: the current generation's scheduler.
    """

    def __init__(
        self,
        store: Datastore,
        health: Health,
        estimator: ITokenEstimator,
        config: RouterConfig,
        timer: Timer | None = None,
        scheduler: IScheduler | None = None,
    ) -> None:
        """
        @param scheduler: a fixed scheduler (tests); built from the config otherwise.
        """
        self.store = store
        self.health = health
        self.estimator = estimator
        self.timer = timer
        self._fixed = scheduler is not None
        self.scheduler: IScheduler = scheduler or build_scheduler(config.scheduler, timer)
        self._section = config.scheduler
        self._known = set(store.pods)
        self._degraded: set[str] = set()

    def reconfigure(self, config: RouterConfig) -> None:
        """A new generation (after the store took its resources)."""
        if config.scheduler != self._section and not self._fixed:
            self.scheduler = build_scheduler(config.scheduler, self.timer)
        else:
            self.scheduler.forget_pods(self._known - set(self.store.pods))
        self._section = config.scheduler
        self._known = set(self.store.pods)

    def schedulable(
        self, server: ModelServer, record: RequestRecord | None = None
    ) -> list[PodEndpoint]:
        """
        The server's pods that may take a request now (see the module docstring); for a
        prefill/decode server, per role (no healthy prefill pod: all its prefill pods,
        rather than no pair at all). Falling back to unhealthy pods is logged once per
        server and marked in the record.
        """
        pods = self.store.server_pods(server)
        if not pods:
            return pods
        if server.pd_group is None:
            roles = {"": pods}
        else:
            roles = {role: [p for p in pods if server.pd_role(p.pod) == role]
                     for role in ("decode", "prefill")}  # fmt: skip
        chosen: list[PodEndpoint] = []
        fallen: list[str] = []
        for role, members in roles.items():
            healthy = self.health.healthy(members)
            if healthy or not members:
                chosen.extend(healthy)
            else:
                chosen.extend(members)
                fallen.append(f"{role} pod" if role else "pod")
        key = server.meta.key
        if not fallen:
            self._degraded.discard(key)
            return chosen
        if key not in self._degraded:
            self._degraded.add(key)
            log.warn(
                "no healthy {what} serves {server}: scheduling among all of them",
                what=" and no healthy ".join(fallen),
                server=key,
            )
        if record is not None:
            record.unhealthy_fallback = True
        return chosen

    def schedule(
        self, record: RequestRecord, parsed: Parsed, match: RouteMatch
    ) -> list[PodEndpoint]:
        """
        The candidates, best first.

        @raise ProxyError: 503 when the server has no pod, or the filters left none.
        """
        pods = self.schedulable(match.server, record)
        if not pods:
            raise ProxyError(503, ErrorType.NO_PODS, f"no ready pod serves {match.server.meta.key}")
        if record.input_estimate is None:  # admission estimates it for limited routes
            record.input_estimate = self.estimator.estimate(parsed.body)

        def rank(pods: Sequence[PodEndpoint]) -> Decision:
            request = SchedulingRequest(parsed.model, match, pods, parsed.body)
            decision: Decision = self.scheduler.schedule(request)
            return decision

        if match.server.pd_group is not None:  # the decode pods ranked; pairs as needed
            policy, estimate = match.route.pd_policy, record.input_estimate
            plan = PDPlan.make(match.server, pods, rank, policy, estimate)
            record.pd_plan = plan
            decision = plan.decode
        else:
            decision = rank(pods)
        record.decision = decision
        candidates: list[PodEndpoint] = decision.candidates
        if not candidates:
            raise ProxyError(503, ErrorType.SCHEDULING, f"no pod to take it: {decision.why()}")
        return candidates

    def prefix_entries(self) -> int:
        """The current scheduler's prefix-index entries (read from the metrics thread)."""
        return self.scheduler.prefix_entries()

    def served(self, record: RequestRecord, pod: PodEndpoint) -> None:
        """C{pod} answered 2xx: the post-schedule hooks (the prefix index) learn from it."""
        if record.decision is not None:
            self.scheduler.scheduled(record.decision, pod)
