"""
The scheduling framework, as Kthena's: filter plugins in order (a filter leaving no pod
fails the scheduling), then score plugins whose 0-100 scores are weighted and summed,
then candidates ranked best first (ties broken at random). Post-schedule hooks run when
a candidate served the request. Every plugin call is timed into
C{kthena_router_scheduler_plugin_duration_seconds}, and every decision keeps each
candidate's score per plugin, for C{/debug/routing/decisions}.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Any

from zope.interface import implementer

from kthena import prompt
from kthena.interfaces import (
    IFilterPlugin,
    IPostScheduleHook,
    IPrefixIndex,
    IScheduler,
    IScorePlugin,
)
from kthena.pods import PodEndpoint
from kthena.store import RouteMatch

Timer = Callable[[str, str, str, float], None]
"""Records one plugin call: (model, plugin, "filter" | "score", seconds)."""


@dataclass(eq=False, slots=True)
class SchedulingRequest:
    """
    What the plugins see of a request.

    @ivar model: the model the client asked for (an adapter name for LoRA requests).
    @ivar scratch: per-request state plugins share with their post-schedule hook.
    """

    model: str
    match: RouteMatch
    pods: Sequence[PodEndpoint]
    body: dict[str, Any]
    scratch: dict[str, Any] = field(default_factory=dict)
    _prompt: str | None = None

    @property
    def lora(self) -> str | None:
        return self.model if self.match.is_lora else None

    @property
    def prompt(self) -> str:
        """The prompt as the engine sees it (chat rendered as ChatML), built once."""
        if self._prompt is None:
            self._prompt = prompt.render(self.body)
        return self._prompt


@dataclass(slots=True)
class Decision:
    """
    Why the candidates are in this order.

    @ivar scored: the pods that passed the filters, in the order scores refer to.
    @ivar by_plugin: per score plugin: each scored pod's raw 0-100 score, in order.
    @ivar weighted: each scored pod's weighted sum, in order.
    @ivar filtered: per filter plugin: the pods it removed.
    @ivar failed_filter: the filter that left no pod, if any.
    @ivar algorithm: the scheduler's name for what ranked (the C{algorithm} label).
    """

    candidates: list[PodEndpoint]
    scored: list[PodEndpoint] = field(default_factory=list)
    by_plugin: dict[str, Sequence[float]] = field(default_factory=dict)
    weighted: list[float] = field(default_factory=list)
    filtered: dict[str, list[str]] = field(default_factory=dict)
    failed_filter: str | None = None
    request: SchedulingRequest | None = None
    algorithm: str = "custom"

    @property
    def totals(self) -> dict[str, float]:
        """Each scored pod's weighted sum, by pod key."""
        return {p.key: t for p, t in zip(self.scored, self.weighted, strict=True)}

    @property
    def scores(self) -> dict[str, dict[str, float]]:
        """Per scored pod (by key): per score plugin, the raw score."""
        return {
            p.key: {plugin: scores[i] for plugin, scores in self.by_plugin.items()}
            for i, p in enumerate(self.scored)
        }

    def why(self) -> str:
        if self.failed_filter is not None:
            return f"filter {self.failed_filter} left no pod"
        if not self.candidates:
            return "no pod"
        if len(self.scored) == 1 and not self.by_plugin:
            return f"{self.scored[0].name}: the only pod left, nothing to rank"
        best = self.candidates[0]
        parts = [f"{best.name}: total {self.totals.get(best.key, 0.0):.1f}"]
        for plugin, score in self.scores.get(best.key, {}).items():
            parts.append(f"{plugin}={score:.1f}")
        removed = [f"{p} removed {', '.join(pods)}" for p, pods in self.filtered.items() if pods]
        return "; ".join([" ".join(parts), *removed])


def _adapter_holders_first(
    ranked: list[PodEndpoint], request: SchedulingRequest
) -> list[PodEndpoint]:
    """
    For a LoRA request, the pods known to serve the adapter come first, in their ranked
    order, even without the C{lora-affinity} filter (a pod without it answers 404); the
    others stay as later candidates (a pod may have loaded it since its last scrape).
    """
    adapter = request.lora
    if adapter is None:
        return ranked
    holders = [p for p in ranked if p.serves_adapter(adapter)]
    if not holders or len(holders) == len(ranked):
        return ranked
    return holders + [p for p in ranked if not p.serves_adapter(adapter)]


def _weighted_sum(weights: Sequence[float]) -> Callable[..., list[float]]:
    """
    A function of one score list per plugin giving each pod's weighted sum in one pass
    (C{sum} over each pod's column, in C) instead of a list per plugin (at 100 pods each
    pass costs ~10 us). C{sum(column, 0.0)} adds the terms in plugin order, as a running
    total would, so the totals are the same floats; a weight of 1 multiplies nothing.
    """
    weights = tuple(weights)
    plain = all(w == 1 for w in weights)

    def total(*scores: list[float]) -> list[float]:
        columns = scores if plain else [
            s if w == 1 else [x * w for x in s] for s, w in zip(scores, weights, strict=True)
        ]  # fmt: skip
        return [sum(column, 0.0) for column in zip(*columns, strict=True)]

    return total


@implementer(IScheduler)
class Scheduler:
    """Runs the configured plugins; one instance per config generation."""

    def __init__(
        self,
        filters: Sequence[IFilterPlugin],
        scores: Sequence[tuple[IScorePlugin, float]],
        hooks: Sequence[IPostScheduleHook] = (),
        timer: Timer | None = None,
        rng: random.Random | None = None,
        skip_scores_for_one_pod: bool = False,
    ) -> None:
        self.filters = list(filters)
        self.skip_scores_for_one_pod = skip_scores_for_one_pod
        self.scores = list(scores)
        self.hooks = list(hooks)
        self.timer = timer
        self._random = rng or random.Random()
        self.algorithm = "+".join(s.name for s, _ in self.scores) or "filters-only"
        """The C{algorithm} label of C{kthena_lb_decisions_total}: the score plugins."""
        self._total = _weighted_sum([w for _, w in self.scores]) if self.scores else None

    def schedule(self, request: SchedulingRequest) -> Decision:
        pods = list(request.pods)
        decision = Decision(candidates=[], request=request, algorithm=self.algorithm)
        timer = self.timer
        model = request.match.model_label(request.model)
        clock = time.perf_counter
        now = clock()
        for plugin in self.filters:
            kept = plugin.filter(request, pods)
            if timer is not None:
                then, now = now, clock()
                timer(model, plugin.name, "filter", now - then)
            if len(kept) != len(pods):
                kept_keys = {p.key for p in kept}
                decision.filtered[plugin.name] = [p.name for p in pods if p.key not in kept_keys]
                pods = list(kept)
            if not pods:
                decision.failed_filter = plugin.name
                return decision
        decision.scored = pods
        if len(pods) == 1 and self.skip_scores_for_one_pod:
            # One pod left: nothing to rank (skipScoresForOnePod: no score plugin is asked).
            decision.candidates = pods
            decision.weighted = [0.0]
            return decision
        by_plugin = decision.by_plugin
        every = []
        for scorer, _ in self.scores:
            scores = scorer.score(request, pods)
            if timer is not None:
                then, now = now, clock()
                timer(model, scorer.name, "score", now - then)
            by_plugin[scorer.name] = scores
            every.append(scores)
        totals = [0.0] * len(pods) if self._total is None else self._total(*every)
        decision.candidates = _adapter_holders_first(self._ranked(pods, totals), request)
        decision.weighted = totals
        # The decision lives as long as the request (a stream's: minutes) and holds this
        # request for the post-schedule hooks, which read what the scores left in scratch:
        # the rendered prompt (as long as the body's text) goes, built again if asked for.
        request._prompt = None
        return decision

    def _ranked(self, pods: list[PodEndpoint], totals: list[float]) -> list[PodEndpoint]:
        """
        The pods by total, best first, equal totals in random order. Without equal totals
        (the usual case: one set() says so) a float-keyed sort of the indices is enough;
        otherwise a random second key per pod orders the equals. An C{itemgetter} of the
        order picks the pods in one C call (half a C{map} of C{__getitem__}).
        """
        if len(pods) < 2:
            return list(pods)  # an itemgetter of one index gives the pod, not a tuple
        if len(set(totals)) == len(totals):
            order = sorted(range(len(totals)), key=totals.__getitem__, reverse=True)
            return list(itemgetter(*order)(pods))
        draw = self._random.random
        draws = [draw() for _ in pods]
        ranked = sorted(zip(totals, draws, range(len(pods)), strict=True), reverse=True)
        return [pods[i] for _, _, i in ranked]

    def scheduled(self, decision: Decision, pod: PodEndpoint) -> None:
        """C{pod} served the request: let the hooks learn from it."""
        if decision.request is None:
            return
        for hook in self.hooks:
            hook.scheduled(decision.request, pod)

    def prefix_entries(self) -> int:
        plugins = {*self.filters, *(s for s, _ in self.scores), *self.hooks}
        return sum(p.entries for p in plugins if IPrefixIndex.providedBy(p))

    def forget_pods(self, keys: set[str]) -> None:
        """Pods left the config: plugins keeping per-pod state drop it."""
        for plugin in {*self.filters, *(s for s, _ in self.scores), *self.hooks}:
            forget = getattr(plugin, "forget_pods", None)
            if forget is not None:
                forget(keys)
