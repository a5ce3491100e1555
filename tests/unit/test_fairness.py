"""
The fairness queue on a Clock: the order (class, then recent usage, then first come), the
bounds (concurrency, QPS, length, timeout), shedding, cancelling, reconfiguring, the label
rule, the hooks for metrics and the debug view, and that nothing is left behind.
"""

from __future__ import annotations

import json
import random
import statistics
from dataclasses import dataclass, field
from typing import Any

import pytest
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.python.failure import Failure

from kthena.config.fairness import FairnessConfig, ModelFairness
from kthena.errors import ErrorType, ProxyError
from kthena.fairness.fairness import OTHER, Fairness, Ticket
from kthena.fairness.usage import SLOTS, UsageHistory

M = "qwen"


def config(**model: Any) -> FairnessConfig:
    top = {k: model.pop(k) for k in ("window", "top_users", "priorities") if k in model}
    return FairnessConfig(models=(ModelFairness(M, **model),), **top)


@dataclass
class Outcome:
    """What became of one admit: the ticket, or the failure, and when."""

    user: str
    deferred: Deferred[Ticket]
    ticket: Ticket | None = None
    failure: Failure | None = None
    at: float | None = None

    @property
    def pending(self) -> bool:
        return self.ticket is None and self.failure is None

    def status(self) -> tuple[int, ErrorType]:
        assert self.failure is not None
        error = self.failure.value
        assert isinstance(error, ProxyError)
        return error.status, error.error_type


@dataclass
class Harness:
    clock: Clock = field(default_factory=Clock)
    fairness: Fairness = field(init=False)
    admitted: list[str] = field(default_factory=list)  # names, in admission order
    observed: list[Ticket] = field(default_factory=list)

    def configure(self, fairness_config: FairnessConfig) -> Harness:
        self.fairness = Fairness(self.clock, fairness_config, on_admit=self.observed.append)
        return self

    def admit(self, user: str, priority: str | None = None, name: str = "") -> Outcome:
        d = self.fairness.admit(M, user, priority)
        outcome = Outcome(name or user, d)

        def ok(ticket: Ticket) -> None:
            outcome.ticket, outcome.at = ticket, self.clock.seconds()
            self.admitted.append(outcome.user)

        def failed(f: Failure) -> None:
            outcome.failure, outcome.at = f, self.clock.seconds()

        d.addCallbacks(ok, failed)
        return outcome

    def release(self, outcome: Outcome) -> None:
        assert outcome.ticket is not None
        self.fairness.release(outcome.ticket)

    def queued(self) -> int:
        return sum(self.fairness.queue_sizes().values())


def harness(**model: Any) -> Harness:
    return Harness().configure(config(**model))


def test_a_model_without_fairness_passes_at_once() -> None:
    h = harness(max_concurrency=1)
    outcomes = [Outcome("u", h.fairness.admit("other-model", "u")) for _ in range(100)]
    tickets: list[Ticket] = []
    for o in outcomes:
        o.deferred.addCallback(tickets.append)
    assert len(tickets) == 100
    assert all(t.queue is None and t.waited == 0 and t.priority == "standard" for t in tickets)
    for t in tickets:
        h.fairness.release(t)
    assert h.observed == []  # only models with fairness are observed
    nothing = Harness().configure(FairnessConfig())
    assert nothing.admit("u").ticket is not None
    assert nothing.fairness.state() == {}


def test_room_admits_at_once_and_the_rest_waits_for_a_release() -> None:
    h = harness(max_concurrency=2)
    a, b, c = h.admit("a"), h.admit("b"), h.admit("c")
    assert a.ticket is not None and b.ticket is not None and c.pending
    assert h.fairness.queue_sizes() == {(M, OTHER): 1}
    h.clock.advance(3)
    h.release(a)
    assert c.ticket is not None and c.ticket.waited == 3.0 and c.at == 3.0
    assert [t.waited for t in h.observed] == [0.0, 0.0, 3.0]  # every admission, 0 included
    assert h.clock.getDelayedCalls() == []


def test_admit_now_answers_without_a_deferred_or_not_at_all() -> None:
    h = harness(max_concurrency=1)
    first = h.fairness.admit_now(M, "a", "critical")
    assert first is not None and first.priority == "critical" and first.waited == 0
    assert h.fairness.admit_now(M, "b") is None  # would wait: nothing queued, no timer
    assert h.queued() == 0 and h.clock.getDelayedCalls() == []
    free = h.fairness.admit_now("no-fairness", "b", "bogus")
    assert free is not None and free.queue is None and free.priority == "standard"
    waiting = h.admit("c")
    h.fairness.release(first)
    assert waiting.ticket is not None
    assert h.fairness.admit_now(M, "d") is None
    assert [t.user for t in h.observed] == ["a", "c"]


def test_order_is_class_then_usage_then_first_come() -> None:
    h = harness(max_concurrency=1)
    h.fairness.record_usage(M, "heavy", 50, 25)  # 100 weighted
    h.fairness.record_usage(M, "light", 6, 2)  # 10 weighted
    running = h.admit("running")
    arrivals = [
        ("heavy", "standard", "h1"),
        ("light", "sheddable", "s1"),
        ("light", "standard", "l1"),
        ("heavy", "standard", "h2"),
        ("new", "standard", "n1"),  # no usage: first among its class
        ("light", "standard", "l2"),
        ("heavy", "critical", "c1"),  # the heaviest user, but critical
        ("tie-a", None, "a1"),  # not given: the default class (standard)
        ("tie-b", "unknown-class", "b1"),  # not configured: the default class too
        ("tie-a", "standard", "a2"),
    ]
    outcomes = [h.admit(user, priority, name) for user, priority, name in arrivals]
    assert all(o.pending for o in outcomes)
    h.release(running)
    for _ in outcomes:
        got = [x for x in outcomes if x.ticket is not None and not x.ticket.released]
        assert len(got) == 1
        h.release(got[0])
    # ties between users of equal usage go by arrival of their oldest request
    assert h.admitted == [
        "running", "c1", "n1", "a1", "b1", "a2", "l1", "l2", "h1", "h2", "s1",
    ]  # fmt: skip
    assert [t.priority for t in h.observed][1:3] == ["critical", "standard"]


def test_usage_recorded_while_waiting_counts() -> None:
    h = harness(max_concurrency=1)
    running = h.admit("running")
    a, b = h.admit("a"), h.admit("b")
    h.fairness.record_usage(M, "a", 100, 0)  # a's earlier response ends while a waits
    h.release(running)
    assert b.ticket is not None and a.pending


def test_critical_overtakes_queued_standard() -> None:
    h = harness(max_concurrency=1)
    running = h.admit("u")
    standard = [h.admit("u", "standard", f"s{i}") for i in range(3)]
    h.clock.advance(1)
    critical = h.admit("u", "critical", "c")
    h.release(running)
    assert critical.ticket is not None and critical.ticket.waited == 0
    assert all(s.pending for s in standard)


def test_a_light_user_waits_much_less_than_a_heavy_one() -> None:
    """
    One slot; the heavy user keeps four requests outstanding (1000 tokens each way), the
    light one sends one request at a time (10 tokens each way) after a pause. Each
    request holds the slot for a second. First come first served, the light user would
    queue behind the heavy user's three; by usage it waits only for the one running.
    """
    h = harness(max_concurrency=1, timeout=600.0)
    waits: dict[str, list[float]] = {"heavy": [], "light": []}
    tokens = {"heavy": 1000, "light": 10}
    end = 600.0

    def submit(user: str) -> None:
        if h.clock.seconds() < end:
            h.fairness.admit(M, user).addCallback(run, user)

    def run(ticket: Ticket, user: str) -> None:
        waits[user].append(ticket.waited)
        h.clock.callLater(1.0, finish, ticket, user)

    def finish(ticket: Ticket, user: str) -> None:
        h.fairness.record_usage(M, user, tokens[user], tokens[user])
        h.fairness.release(ticket)
        if user == "heavy":
            submit(user)
        else:
            h.clock.callLater(2.5, submit, user)

    for _ in range(4):
        submit("heavy")
    h.clock.callLater(0.5, submit, "light")
    while h.clock.getDelayedCalls():
        h.clock.advance(0.25)
    light, heavy = statistics.median(waits["light"]), statistics.median(waits["heavy"])
    assert light * 4 < heavy, (light, heavy)
    assert len(waits["light"]) > 100 and len(waits["heavy"]) > 100
    assert max(waits["light"]) <= 1.0  # never more than the request running
    assert h.queued() == 0


def test_a_full_queue_refuses_sheddable_work_first() -> None:
    h = harness(max_concurrency=1, max_length=2)
    h.admit("u")
    queued = [h.admit("u", "standard"), h.admit("u", "standard")]
    shed = h.admit("light", "sheddable")
    assert shed.status() == (503, ErrorType.SHED)
    standard = h.admit("u", "critical")
    assert standard.status() == (503, ErrorType.SHED)  # nothing to shed: refused
    assert all(o.pending for o in queued)
    assert h.queued() == 2


def test_a_full_queue_evicts_the_lowest_ranked_sheddable_request() -> None:
    h = harness(max_concurrency=1, max_length=4)
    h.fairness.record_usage(M, "heavy", 100, 0)
    h.admit("running")
    heavy = h.admit("heavy", "sheddable", "heavy")
    light = [h.admit("light", "sheddable", f"light{i}") for i in range(2)]
    standard = h.admit("u", "standard")
    assert h.queued() == 4
    # the heavy user's request ranks last, though it came first
    first = h.admit("u", "standard")
    assert heavy.status() == (503, ErrorType.SHED)
    assert first.pending and h.queued() == 4
    # then the light user's newest
    second = h.admit("u", "critical")
    assert light[1].status() == (503, ErrorType.SHED)
    assert light[0].pending and second.pending and standard.pending
    # a sheddable arrival never evicts its peers
    assert h.admit("light", "sheddable").status() == (503, ErrorType.SHED)
    assert light[0].pending


def test_zero_length_means_nothing_waits() -> None:
    h = harness(max_concurrency=1, max_length=0)
    assert h.admit("u").ticket is not None
    assert h.admit("u", "critical").status() == (503, ErrorType.SHED)
    assert h.clock.getDelayedCalls() == []


def test_queued_longer_than_the_timeout_is_504_and_leaves() -> None:
    h = harness(max_concurrency=1, timeout=10.0)
    running = h.admit("running")
    first = h.admit("a")
    h.clock.advance(4)
    second = h.admit("b")
    h.clock.advance(5.99)
    assert first.pending and second.pending
    h.clock.advance(0.01)
    assert first.status() == (504, ErrorType.QUEUE_TIMEOUT) and first.at == 10.0
    assert second.pending and h.queued() == 1
    h.clock.advance(4)
    assert second.status() == (504, ErrorType.QUEUE_TIMEOUT) and second.at == 14.0
    assert h.queued() == 0 and h.clock.getDelayedCalls() == []
    h.release(running)
    assert h.admit("c").ticket is not None  # the slot was freed, nothing else came out


def test_cancel_removes_at_once_and_fires_nothing_else() -> None:
    h = harness(max_concurrency=1)
    running = h.admit("running")
    gone, kept = h.admit("gone"), h.admit("kept")
    gone.deferred.cancel()
    assert gone.failure is not None and gone.failure.check(CancelledError)
    assert h.fairness.state()[M]["length"] == 1
    h.release(running)
    assert kept.ticket is not None
    kept.deferred.cancel()  # already fired: the caller holds the ticket
    assert kept.ticket is not None and not kept.ticket.released
    h.release(kept)
    assert h.fairness.state()[M]["in_flight"] == 0
    last = h.admit("last")
    assert last.ticket is not None
    alone = h.admit("alone")
    alone.deferred.cancel()
    assert h.clock.getDelayedCalls() == []  # the timeout timer went with it


def test_releasing_twice_is_harmless() -> None:
    h = harness(max_concurrency=1)
    first = h.admit("a")
    h.release(first)
    h.release(first)
    assert first.ticket is not None and first.ticket.released
    second, third = h.admit("b"), h.admit("c")
    assert second.ticket is not None and third.pending  # one slot, not two
    assert h.fairness.state()[M]["in_flight"] == 1


def test_qps_paces_admissions_with_one_delayed_call() -> None:
    h = harness(qps=2.0, timeout=600.0)
    outcomes = [h.admit(f"u{i}") for i in range(8)]
    assert [o.at for o in outcomes[:2]] == [0.0, 0.0]  # a bucket of one second: 2
    calls = h.clock.getDelayedCalls()
    assert len(calls) == 2  # the oldest's timeout, and one wake-up for the next token
    assert sorted(c.getTime() for c in calls) == [0.5, 600.0]
    while h.clock.getDelayedCalls():
        assert len(h.clock.getDelayedCalls()) <= 2
        h.clock.advance(0.25)
    assert [o.at for o in outcomes] == pytest.approx([0, 0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0])
    # a bucket refills only to its capacity
    h.clock.advance(100)
    later = [h.admit("v") for _ in range(3)]
    assert [o.pending for o in later] == [False, False, True]


def test_qps_below_one_still_admits_one_at_a_time() -> None:
    h = harness(qps=0.5)
    a, b = h.admit("a"), h.admit("b")
    assert a.ticket is not None and b.pending
    h.clock.advance(2)
    assert b.ticket is not None and b.ticket.waited == 2


def test_qps_and_concurrency_together() -> None:
    h = harness(qps=10.0, max_concurrency=1)
    a, b = h.admit("a"), h.admit("b")
    assert b.pending
    assert len(h.clock.getDelayedCalls()) == 1  # the slot, not the bucket, holds b back
    h.clock.advance(5)
    assert b.pending
    h.release(a)
    assert b.ticket is not None


def test_usage_leaves_the_window() -> None:
    history = UsageHistory(300.0, 1.0, 2.0)
    history.record(0.0, "a", 10, 5)
    history.record(150.0, "a", 1, 0)
    assert history.usage("a") == 21
    slot = 300.0 / SLOTS
    history.advance(300.0 - slot)
    assert history.usage("a") == 21
    history.advance(300.0)
    assert history.usage("a") == 1
    history.advance(450.0)
    assert history.usage("a") == 0 and history.users() == []  # forgotten, not kept at 0
    history.record(451.0, "a", 2, 2)
    history.configure(300.0, 0.0, 1.0)  # new weights apply to the history
    assert history.usage("a") == 2


def test_usage_that_left_the_window_reorders_the_queue() -> None:
    h = harness(max_concurrency=1, timeout=600.0)
    h.fairness.record_usage(M, "a", 1000, 0)
    h.clock.advance(100)
    h.fairness.record_usage(M, "b", 10, 0)
    h.clock.advance(150)
    running = h.admit("running")
    a, b = h.admit("a"), h.admit("b")
    h.clock.advance(50)  # t=300: a's usage left the window, b's has not
    h.release(running)
    assert a.ticket is not None and b.pending


def test_reconfigure_keeps_the_queue_and_applies_the_new_settings() -> None:
    h = harness(max_concurrency=1, timeout=60.0)
    h.admit("running")
    outcomes = [h.admit(f"u{i}", name=f"q{i}") for i in range(4)]
    h.clock.advance(20)

    @dataclass
    class RouterConfig:
        fairness: FairnessConfig

    h.fairness.reconfigure(RouterConfig(config(max_concurrency=3, timeout=30.0)))
    assert h.admitted == ["running", "q0", "q1"]
    assert outcomes[2].pending and outcomes[3].pending
    h.clock.advance(9.99)
    assert outcomes[2].pending
    h.clock.advance(0.01)  # the new timeout counts from when they came
    assert outcomes[2].status() == (504, ErrorType.QUEUE_TIMEOUT)
    assert outcomes[3].status() == (504, ErrorType.QUEUE_TIMEOUT)
    assert h.clock.getDelayedCalls() == []


def test_new_classes_rerank_the_queued_requests() -> None:
    h = harness(max_concurrency=1)
    running = h.admit("running")
    low, high = h.admit("u", "standard", "low"), h.admit("u", "critical", "high")
    h.fairness.configure(
        config(max_concurrency=1, priorities=("standard", "critical", "sheddable"))
    )
    h.release(running)
    assert low.ticket is not None and high.pending


def test_a_model_leaving_the_config_admits_its_queue_in_order() -> None:
    h = harness(max_concurrency=1)
    running = h.admit("running")
    outcomes = [h.admit("u", "standard", "a"), h.admit("u", "critical", "c"), h.admit("v")]
    h.fairness.configure(FairnessConfig())
    assert h.admitted == ["running", "c", "a", "v"]
    assert h.clock.getDelayedCalls() == []
    assert not h.fairness.configured(M)
    assert h.admit("w").ticket is not None  # no fairness now
    state = h.fairness.state()
    assert state[M]["in_flight"] == 4 and state[M]["settings"] is None
    for o in [running, *outcomes]:
        h.release(o)
    assert h.fairness.state() == {}  # the retired queue is gone with its last ticket


def test_a_model_back_in_the_config_counts_its_tickets_still_out() -> None:
    h = harness(max_concurrency=1)
    running = h.admit("running")
    h.fairness.configure(FairnessConfig())
    h.fairness.configure(config(max_concurrency=1))
    waiting = h.admit("u")
    assert waiting.pending
    h.release(running)
    assert waiting.ticket is not None


def test_user_labels_name_only_the_top_users() -> None:
    h = harness(max_concurrency=1, top_users=2, window=60.0, timeout=120.0)
    for i, user in enumerate(["a", "b", "c", "d", "e"]):
        h.fairness.record_usage(M, user, 10 * (i + 1), 0)
    assert h.fairness.user_label(M, "e") == "e" and h.fairness.user_label(M, "d") == "d"
    assert h.fairness.user_label(M, "a") == OTHER
    assert h.fairness.user_label(M, "nobody") == OTHER
    assert h.fairness.user_label("no-fairness", "e") == OTHER
    h.fairness.record_usage(M, "a", 1000, 0)
    assert h.fairness.named_users(M) == {"a", "e", OTHER}
    h.admit("running")
    for i in range(200):
        h.admit(f"user{i}")
    h.admit("a")
    h.admit("e")
    sizes = h.fairness.queue_sizes()
    assert sizes == {(M, OTHER): 200, (M, "a"): 1, (M, "e"): 1}
    users = h.fairness.state()[M]["users"]
    assert isinstance(users, dict) and set(users) <= {"a", "e", OTHER}
    h.clock.advance(60)  # the window passed: nobody is named any more
    assert h.fairness.named_users(M) == {OTHER}
    assert set(h.fairness.queue_sizes()) == {(M, OTHER)}


def test_labels_of_admissions_follow_the_rule() -> None:
    h = harness(max_concurrency=10, top_users=1)
    h.fairness.record_usage(M, "big", 100, 0)
    h.fairness.record_usage(M, "small", 1, 0)
    h.admit("big")
    h.admit("small")
    assert [(t.user, t.user_label) for t in h.observed] == [("big", "big"), ("small", OTHER)]


def test_the_debug_state() -> None:
    h = harness(max_concurrency=1, qps=5.0, top_users=1)
    h.fairness.record_usage(M, "a", 30, 0)
    h.fairness.record_usage(M, "b", 10, 0)
    h.admit("a")
    h.admit("a", "critical")
    h.clock.advance(2)
    h.admit("b", "sheddable")
    state = h.fairness.state()
    json.dumps(state)
    assert state[M] == {
        "length": 2,
        "oldest_wait_seconds": 2.0,
        "in_flight": 1,
        "classes": {"critical": 1, "standard": 0, "sheddable": 1},
        "users": {
            "a": {"queued": 1, "usage": 30.0, "usage_share": 0.75},
            OTHER: {"queued": 1, "usage": 10.0, "usage_share": 0.25},
        },
        "recent_usage": 40.0,
        "qps_tokens": 5.0,
        "settings": {
            "max_concurrency": 1,
            "qps": 5.0,
            "timeout_seconds": 60.0,
            "max_length": 1000,
            "window_seconds": 300.0,
            "input_weight": 1.0,
            "output_weight": 2.0,
            "top_users": 1,
        },
    }


def test_stop_fails_the_queue_as_draining_and_leaves_no_timer() -> None:
    h = harness(max_concurrency=1, qps=1.0)
    running = h.admit("running")
    queued = [h.admit(f"u{i}") for i in range(3)]
    h.fairness.stop()
    assert all(o.status() == (503, ErrorType.DRAINING) for o in queued)
    assert h.clock.getDelayedCalls() == [] and h.queued() == 0
    assert h.admit("late").status() == (503, ErrorType.DRAINING)  # it would have to wait
    h.release(running)
    h.clock.advance(1)
    assert h.admit("room").ticket is not None  # the drain's requests may finish
    h.fairness.start()
    assert h.admit("queued-again").pending


def test_admissions_that_release_at_once_do_not_recurse() -> None:
    h = harness(max_concurrency=1, max_length=5000)
    running = h.admit("running")
    released: list[Ticket] = []
    depth = [0, 0]  # now, deepest

    def release_at_once(ticket: Ticket) -> None:
        depth[0] += 1
        depth[1] = max(depth)
        released.append(ticket)
        h.fairness.release(ticket)
        depth[0] -= 1

    for i in range(2000):
        h.fairness.admit(M, f"u{i % 7}").addCallback(release_at_once)
    h.release(running)
    assert len(released) == 2000 and h.queued() == 0
    assert depth[1] == 1  # the one loop let each on: no admission inside another
    assert h.clock.getDelayedCalls() == []


@dataclass
class _Pending:
    seq: int
    user: str
    rank: int
    at: float
    outcome: Outcome


CLASSES = ("critical", "standard", "sheddable")


class _RandomRun:
    """Random traffic on one queue, and the rule it must keep, written out."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.slots = self.rng.randint(1, 3)
        self.h = harness(
            max_concurrency=self.slots, timeout=30.0, max_length=self.rng.randint(3, 12)
        )
        self.records: list[tuple[float, str, int, int]] = []
        self.pending: list[_Pending] = []
        self.holding: list[Outcome] = []
        self.seq = 0

    def usage(self, user: str, now: float) -> float:
        """The history's rule: slots of window/SLOTS, each counted for one window."""
        slot = 300.0 / SLOTS
        return sum(
            i + 2 * o
            for t, u, i, o in self.records
            if u == user and (t // slot) * slot + 300.0 > now
        )

    def arrive(self) -> None:
        user, rank = f"u{self.rng.randrange(5)}", self.rng.randrange(3)
        outcome = self.h.admit(user, CLASSES[rank])
        if outcome.ticket is not None:
            self.holding.append(outcome)
        elif outcome.failure is not None:
            assert outcome.status() == (503, ErrorType.SHED)
        else:
            entry = _Pending(self.seq, user, rank, self.h.clock.seconds(), outcome)
            self.seq += 1
            self.pending.append(entry)
            # runs after the harness's own callbacks have set the outcome
            outcome.deferred.addBoth(self.fired, entry)

    def fired(self, result: object, entry: _Pending) -> None:
        outcome = entry.outcome
        if outcome.ticket is not None:
            self.check_best(entry)
            self.holding.append(outcome)
        elif outcome.failure is not None and outcome.failure.check(ProxyError):
            status = outcome.status()
            if status[0] == 504:
                assert entry.at + 30.0 <= self.h.clock.seconds()
                assert entry.at == min(p.at for p in self.pending)
            else:
                assert status == (503, ErrorType.SHED) and entry.rank == 2
        self.pending.remove(entry)

    def check_best(self, entry: _Pending) -> None:
        now = self.h.clock.seconds()
        best_rank = min(p.rank for p in self.pending)
        oldest: dict[str, int] = {}
        for p in self.pending:
            if p.rank == best_rank:
                oldest[p.user] = min(oldest.get(p.user, p.seq), p.seq)
        user = min(oldest, key=lambda u: (self.usage(u, now), oldest[u]))
        assert entry.seq == oldest[user], (self.seed, entry, self.pending)

    def step(self) -> None:
        rng, h = self.rng, self.h
        op = rng.random()
        if op < 0.45:
            self.arrive()
        elif op < 0.7 and self.holding:
            done = self.holding.pop(rng.randrange(len(self.holding)))
            h.release(done)
            if rng.random() < 0.2:
                h.release(done)
        elif op < 0.78 and self.pending:
            rng.choice(self.pending).outcome.deferred.cancel()
        elif op < 0.9:
            user, i, o = f"u{rng.randrange(5)}", rng.randint(0, 50), rng.randint(0, 50)
            self.records.append((h.clock.seconds(), user, i, o))
            h.fairness.record_usage(M, user, i, o)
        else:
            h.clock.advance(rng.choice([0.5, 3.0, 10.0, 31.0]))
        state = h.fairness.state()[M]
        assert state["length"] == len(self.pending) == h.queued()
        assert state["in_flight"] == len(self.holding)
        if self.pending:
            assert len(self.holding) == self.slots  # nothing waits while a slot is free


@pytest.mark.parametrize("seed", range(25))
def test_random_traffic_keeps_the_order_and_leaks_nothing(seed: int) -> None:
    """
    Random arrivals, releases, cancels, usage and time: every admission from the queue is
    the best queued request by the rule, every 504 the oldest, and at the end nothing is
    queued, counted in flight or scheduled.
    """
    run = _RandomRun(seed)
    for _ in range(400):
        run.step()
    for entry in list(run.pending):
        entry.outcome.deferred.cancel()
    for outcome in list(run.holding):
        run.h.release(outcome)
    assert run.pending == [] and run.h.queued() == 0
    assert run.h.fairness.state()[M]["in_flight"] == 0
    assert run.h.clock.getDelayedCalls() == []


def test_an_observer_that_fails_does_not_break_the_queue() -> None:
    clock = Clock()

    def broken(ticket: Ticket) -> None:
        raise RuntimeError("metrics broke")

    fairness = Fairness(clock, config(max_concurrency=1), on_admit=broken)
    tickets: list[Ticket] = []
    with capturedLogs() as events:
        fairness.admit(M, "a").addCallback(tickets.append)
        fairness.admit(M, "b").addCallback(tickets.append)
        fairness.release(tickets[0])
    assert len(tickets) == 2
    assert [e["log_failure"].check(RuntimeError) for e in events] == [RuntimeError] * 2
