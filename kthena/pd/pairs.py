"""
Prefill/decode pairs for one request to a ModelServer with a C{pdGroup}, as Kthena pairs
them: the scheduler ranks the decode pods; each decode candidate, best first, is paired
with the best prefill pod of its own group (the value of its C{groupKey} label), the
prefill pods of that group ranked by the same scheduler (filters and scores apply to both
roles). Pairs never cross groups; a pod without the group label pairs with nobody.

Retries go down the pairs: the k-th pair of a group takes the group's k-th prefill
candidate (round the ranking), so that a failing prefill pod is not the next pair's too.
A group's prefill ranking is made only when one of its decode pods is reached.

A route's C{pdPolicy} (ours) sends some requests straight to a decode pod, with no
prefill leg: every pair of a prompt estimated under C{decodeOnlyBelowTokens}; the first
pair only when the best decode pod holds at least C{decodeOnlyPrefixHit} of the prompt's
prefix by the C{prefix-cache} score (a retry goes on to the ordinary pairs).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from kthena.config.resources import ModelServer, PDPolicy
from kthena.pods import PodEndpoint
from kthena.scheduler.framework import Decision

Rank = Callable[[Sequence[PodEndpoint]], Decision]
"""The scheduler on a set of pods (the request's plugins, filters and scores)."""


@dataclass(frozen=True, slots=True)
class Pair:
    """@ivar prefill: C{None} for a request sent straight to the decode pod."""

    group: str
    prefill: PodEndpoint | None
    decode: PodEndpoint


@dataclass(slots=True)
class Roles:
    """A PD server's pods by group and role."""

    prefill: dict[str, list[PodEndpoint]] = field(default_factory=dict)
    decode: list[PodEndpoint] = field(default_factory=list)
    group_of: dict[str, str] = field(default_factory=dict)  # pod key -> group

    @classmethod
    def of(cls, server: ModelServer, pods: Sequence[PodEndpoint]) -> Roles:
        group = server.pd_group
        assert group is not None, f"{server.meta.key} has no pdGroup"
        roles = cls()
        for pod in pods:
            value = pod.pod.meta.labels.get(group.group_key)
            role = server.pd_role(pod.pod)
            if not value or role is None:
                continue
            roles.group_of[pod.key] = value
            if role == "decode":
                roles.decode.append(pod)
            else:
                roles.prefill.setdefault(value, []).append(pod)
        return roles


@dataclass(slots=True)
class PDPlan:
    """
    One request's pairs, made as the dispatcher asks for them.

    @ivar decode: the decode pods' decision (only pods of groups with a prefill pod,
        unless every pair is decode-only).
    @ivar prefill: each group's prefill decision, once made.
    @ivar direct: the decode pods (keys) sent to straight, with no prefill leg.
    @ivar every_round: they are on retries too (a short prompt); else only at first.
    @ivar why_direct: why they are (the policy's condition met), for the debug views.
    """

    roles: Roles
    rank: Rank
    decode: Decision
    direct: frozenset[str] = frozenset()
    every_round: bool = False
    why_direct: str | None = None
    prefill: dict[str, Decision] = field(default_factory=dict)

    @classmethod
    def make(
        cls,
        server: ModelServer,
        pods: Sequence[PodEndpoint],
        rank: Rank,
        policy: PDPolicy | None = None,
        estimate: int = 0,
    ) -> PDPlan:
        """@param estimate: the prompt's estimated tokens (for C{decodeOnlyBelowTokens})."""
        roles = Roles.of(server, pods)
        below = policy.below_tokens if policy is not None else None
        if below is not None and estimate < below:
            decision = rank(roles.decode)
            keys = frozenset(p.key for p in decision.candidates)
            return cls(roles, rank, decision, keys, True, f"prompt under {below} tokens")
        plan = cls(
            roles, rank, rank([p for p in roles.decode if roles.group_of[p.key] in roles.prefill])
        )
        hit = policy.prefix_hit if policy is not None else None
        if hit is not None and plan.decode.candidates:
            best = plan.decode.candidates[0]
            share = plan.decode.scores.get(best.key, {}).get("prefix-cache", 0.0) / 100
            if share >= hit:
                plan.direct = frozenset((best.key,))
                plan.why_direct = f"{best.name} holds {share:.2f} of the prefix (>= {hit})"
        return plan

    def pairs(self) -> Iterator[Pair]:
        """
        The pairs, best first: each decode candidate with its group's next prefill pod,
        round after round (so that a retry's pair has the group's next prefill pod even
        when there is one decode pod); the consumer takes as many as it has attempts.
        A direct decode pod has no prefill leg: in every round for short prompts, in
        the first for a prefix hit. Ends when a round makes no pair.
        """
        taken: dict[str, int] = {}
        first = True
        while True:
            made = False
            for decode in self.decode.candidates:
                group = self.roles.group_of[decode.key]
                if decode.key in self.direct and (first or self.every_round):
                    made = True
                    yield Pair(group, None, decode)
                    continue
                ranking = self._prefills(group)
                if not ranking:
                    continue
                k = taken.get(group, 0)
                taken[group] = k + 1
                made = True
                yield Pair(group, ranking[k % len(ranking)], decode)
            if not made:
                return
            first = False

    def _prefills(self, group: str) -> list[PodEndpoint]:
        if group not in self.roles.prefill:
            return []
        decision = self.prefill.get(group)
        if decision is None:
            decision = self.prefill[group] = self.rank(self.roles.prefill[group])
        return decision.candidates
