"""
SimEngine on a L{Clock}: queueing, timing arithmetic, KV accounting, prefix caching,
aborts, slowdown and LoRA bookkeeping.

The engine's costs are powers of two (prefill 0.25 s per token, 0.5 s per output token) so
that every instant a test names is exact in binary floating point.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import pytest
from twisted.internet.task import Clock

from kthena.sim.engine import (
    EngineConfig,
    PrefixCache,
    SequenceState,
    SimEngine,
    SimSequence,
    block_hashes,
)

PREFILL = 0.25
ITL = 0.5
STEP = 0.25


def make_engine(**overrides: Any) -> tuple[Clock, SimEngine]:
    settings: dict[str, Any] = {
        "max_num_seqs": 8,
        "prefill_per_token": PREFILL,
        "itl": ITL,
        "kv_blocks": 64,
        "block_size": 4,
        "prefix_cache_blocks": 64,
        "max_model_len": 1024,
        "max_loras": 2,
    }
    settings.update(overrides)
    clock = Clock()
    return clock, SimEngine(clock, EngineConfig(**settings))


def prompt(start: int, length: int) -> list[int]:
    """A prompt of distinct token ids, so prompts with different C{start} share nothing."""
    return list(range(start, start + length))


class Recorder:
    """A listener that remembers when each token and the end arrived."""

    def __init__(
        self,
        clock: Clock,
        on_token: Callable[[SimSequence, int], None] | None = None,
    ) -> None:
        self.clock = clock
        self.on_token = on_token
        self.tokens: list[tuple[int, float]] = []
        self.ends: list[tuple[str | None, float]] = []

    def token(self, seq: SimSequence, index: int) -> None:
        self.tokens.append((index, self.clock.seconds()))
        if self.on_token is not None:
            self.on_token(seq, index)

    def finished(self, seq: SimSequence) -> None:
        self.ends.append((seq.finish_reason, self.clock.seconds()))

    @property
    def indexes(self) -> list[int]:
        return [index for index, _ in self.tokens]

    @property
    def times(self) -> list[float]:
        return [at for _, at in self.tokens]


class Observer:
    """An engine observer that records every event."""

    def __init__(self) -> None:
        self.prefilled_seqs: list[str] = []
        self.gaps: list[float] = []
        self.finished_seqs: list[str] = []

    def prefilled(self, seq: SimSequence) -> None:
        self.prefilled_seqs.append(seq.request_id)

    def decoded(self, seq: SimSequence, gap: float) -> None:
        self.gaps.append(gap)

    def finished(self, seq: SimSequence) -> None:
        self.finished_seqs.append(seq.request_id)


def state(seq: SimSequence) -> SequenceState:
    """The state now (a call, so that mypy does not carry an earlier narrowing over)."""
    return seq.state


def advance(clock: Clock, seconds: float) -> None:
    """
    Advance the clock in steps of L{STEP}, the grain of every instant in these tests.

    One big C{clock.advance} would not do: a call scheduled by a call that fires during
    the advance is timed from the end of the advance, compressing what happened.
    """
    steps = round(seconds / STEP)
    assert steps * STEP == seconds, f"{seconds} is not a multiple of {STEP}"
    clock.pump([STEP] * steps)


def run_to_end(clock: Clock, limit: int = 10_000) -> None:
    """Advance the clock until nothing is scheduled any more."""
    for _ in range(limit):
        if not clock.getDelayedCalls():
            return
        clock.advance(STEP)
    raise AssertionError("the engine never went idle")


# -- timing


def test_first_token_after_prefill_of_every_prompt_token() -> None:
    clock, engine = make_engine()
    rec = Recorder(clock)
    seq = engine.submit(prompt(0, 8), 3, rec)
    assert state(seq) is SequenceState.RUNNING
    assert seq.admitted_at == 0.0
    assert seq.cached_tokens == 0
    assert seq.computed_prompt_tokens == 8
    clock.advance(8 * PREFILL - PREFILL)
    assert rec.tokens == []
    assert seq.generated == 0
    clock.advance(PREFILL)
    assert rec.tokens == [(0, 2.0)]
    assert seq.first_token_at == 2.0
    assert seq.generated == 1


def test_one_token_per_itl_then_finish_with_length() -> None:
    clock, engine = make_engine()
    rec = Recorder(clock)
    seq = engine.submit(prompt(0, 8), 4, rec)
    clock.advance(2.0)
    assert rec.indexes == [0]
    clock.advance(ITL / 2)
    assert rec.indexes == [0], "a token arrived before a whole itl had passed"
    clock.advance(ITL / 2)
    assert rec.tokens == [(0, 2.0), (1, 2.5)]
    run_to_end(clock)
    assert rec.tokens == [(0, 2.0), (1, 2.5), (2, 3.0), (3, 3.5)]
    assert rec.ends == [("length", 3.5)]
    assert state(seq) is SequenceState.FINISHED
    assert seq.finish_reason == "length"
    assert seq.finished_at == 3.5
    assert seq.last_token_at == 3.5
    assert seq.generated == 4
    assert engine.num_running == 0
    assert clock.getDelayedCalls() == []


@pytest.mark.parametrize("reason", ["stop", "length"])
def test_finish_reason_comes_from_finish_reason_at_limit(reason: str) -> None:
    clock, engine = make_engine()
    rec = Recorder(clock)
    seq = engine.submit(prompt(0, 4), 2, rec, finish_reason_at_limit=reason)
    assert rec.ends == []
    run_to_end(clock)
    assert seq.finish_reason == reason
    assert [r for r, _ in rec.ends] == [reason]


def test_single_token_output_finishes_at_first_token() -> None:
    clock, engine = make_engine()
    rec = Recorder(clock)
    seq = engine.submit(prompt(0, 4), 1, rec, finish_reason_at_limit="stop")
    advance(clock, 1.0)
    assert rec.tokens == [(0, 1.0)]
    assert rec.ends == [("stop", 1.0)]
    assert state(seq) is SequenceState.FINISHED
    assert clock.getDelayedCalls() == []


def test_observer_sees_prefill_decode_gaps_and_finish() -> None:
    clock = Clock()
    observer = Observer()
    engine = SimEngine(clock, EngineConfig(prefill_per_token=PREFILL, itl=ITL), observer)
    engine.submit(prompt(0, 4), 3, Recorder(clock), request_id="r1")
    run_to_end(clock)
    assert observer.prefilled_seqs == ["r1"]
    assert observer.gaps == [ITL, ITL]
    assert observer.finished_seqs == ["r1"]


def test_request_ids() -> None:
    clock, engine = make_engine()
    first = engine.submit(prompt(0, 4), 1, Recorder(clock))
    second = engine.submit(prompt(10, 4), 1, Recorder(clock))
    named = engine.submit(prompt(20, 4), 1, Recorder(clock), request_id="mine")
    assert first.request_id != second.request_id
    assert named.request_id == "mine"


# -- queueing


def test_fifo_queue_beyond_max_num_seqs() -> None:
    clock, engine = make_engine(max_num_seqs=2)
    recs = [Recorder(clock) for _ in range(4)]
    # Each prompt has 8 tokens (2 s of prefill) and asks for 2 tokens (one more itl).
    seqs = [engine.submit(prompt(100 * i, 8), 2, recs[i]) for i in range(4)]
    assert engine.num_running == 2
    assert engine.num_waiting == 2
    assert [s.state for s in seqs] == [
        SequenceState.RUNNING,
        SequenceState.RUNNING,
        SequenceState.WAITING,
        SequenceState.WAITING,
    ]
    # The first two finish at 2.5; the next two are admitted then, in arrival order.
    advance(clock, 2.5)
    assert [s.state for s in seqs[:2]] == [SequenceState.FINISHED] * 2
    assert seqs[2].admitted_at == seqs[3].admitted_at == 2.5
    assert engine.num_running == 2
    assert engine.num_waiting == 0
    run_to_end(clock)
    for seq in seqs[2:]:
        assert seq.first_token_at is not None
        # TTFT = queue wait + prefill cost of the uncached prompt tokens.
        ttft = seq.first_token_at - seq.arrival
        assert ttft == 2.5 + 8 * PREFILL == 4.5
    assert all(state(s) is SequenceState.FINISHED for s in seqs)


def test_admission_order_is_arrival_order() -> None:
    clock, engine = make_engine(max_num_seqs=1)
    admitted: list[str] = []
    seqs: list[SimSequence] = []

    def note(seq: SimSequence, index: int) -> None:
        if index == 0:
            admitted.append(seq.request_id)

    for name in "abcde":
        seqs.append(
            engine.submit(prompt(ord(name) * 10, 2), 1, Recorder(clock, note), request_id=name)
        )
    assert engine.num_waiting == 4
    run_to_end(clock)
    assert admitted == list("abcde")
    admit_times = [s.admitted_at for s in seqs]
    assert admit_times == [0.0, 0.5, 1.0, 1.5, 2.0]
    # One at a time: each starts when the previous one finished.
    for before, after in itertools.pairwise(seqs):
        assert after.admitted_at == before.finished_at


def test_waiting_count_drops_as_slots_free() -> None:
    clock, engine = make_engine(max_num_seqs=1)
    for i in range(3):
        engine.submit(prompt(10 * i, 4), 1, Recorder(clock))
    counts = [engine.num_waiting]
    for _ in range(3):
        clock.advance(1.0)  # 4 prompt tokens of prefill; one output token
        counts.append(engine.num_waiting)
    assert counts == [2, 1, 0, 0]
    assert engine.num_running == 0


# -- KV cache


def test_kv_usage_rises_with_generated_tokens_and_drops_to_zero() -> None:
    clock, engine = make_engine(kv_blocks=16, block_size=4)
    usage: list[float] = []
    rec = Recorder(clock, lambda seq, index: usage.append(engine.kv_usage))
    assert engine.kv_usage == 0.0
    engine.submit(prompt(0, 6), 7, rec)
    # The prompt occupies ceil(6/4) = 2 blocks while it is prefilled.
    assert engine.used_blocks == 2
    assert engine.kv_usage == 2 / 16
    run_to_end(clock)
    # After token i, 6 + i + 1 tokens are held: ceil of that over the block size.
    assert usage == [-(-(6 + i + 1) // 4) / 16 for i in range(7)]
    assert usage == [2 / 16, 2 / 16, 3 / 16, 3 / 16, 3 / 16, 3 / 16, 4 / 16]
    assert engine.used_blocks == 0
    assert engine.kv_usage == 0.0


def test_kv_usage_sums_running_sequences() -> None:
    clock, engine = make_engine(kv_blocks=10, block_size=4)
    engine.submit(prompt(0, 8), 4, Recorder(clock))
    engine.submit(prompt(100, 3), 4, Recorder(clock))
    assert engine.used_blocks == 2 + 1
    assert engine.kv_usage == pytest.approx(0.3)


def test_admission_waits_for_kv_reservation_of_prompt_and_output() -> None:
    clock, engine = make_engine(kv_blocks=8, block_size=4, max_num_seqs=10)
    # 8 + 8 tokens: 4 blocks reserved; prefill 2 s, then 7 more tokens: ends at 5.5.
    a = engine.submit(prompt(0, 8), 8, Recorder(clock))
    # 4 + 12 tokens: 4 blocks; prefill 1 s, then 11 tokens: ends at 6.5.
    b = engine.submit(prompt(100, 4), 12, Recorder(clock))
    assert a.reserved_blocks == b.reserved_blocks == 4
    # The cache is fully reserved though only 3 blocks are in use: nothing else fits.
    c = engine.submit(prompt(200, 2), 2, Recorder(clock))
    d = engine.submit(prompt(300, 1), 1, Recorder(clock))
    assert engine.used_blocks == 3
    assert engine.num_running == 2
    assert engine.num_waiting == 2
    assert state(c) is state(d) is SequenceState.WAITING
    advance(clock, 5.5 - ITL)
    assert state(c) is SequenceState.WAITING
    advance(clock, ITL)
    assert state(a) is SequenceState.FINISHED
    assert c.admitted_at == d.admitted_at == 5.5
    assert c.reserved_blocks == d.reserved_blocks == 1
    assert engine.num_waiting == 0


def test_fifo_head_blocks_smaller_requests_behind_it() -> None:
    clock, engine = make_engine(kv_blocks=8, block_size=4, max_num_seqs=10)
    engine.submit(prompt(0, 8), 12, Recorder(clock))  # 5 blocks
    big = engine.submit(prompt(100, 8), 8, Recorder(clock))  # 4 blocks: does not fit
    small = engine.submit(prompt(200, 1), 1, Recorder(clock))  # 1 block would fit
    assert state(big) is SequenceState.WAITING
    assert state(small) is SequenceState.WAITING
    assert engine.num_waiting == 2


def test_sequence_larger_than_the_cache_runs_alone() -> None:
    clock, engine = make_engine(kv_blocks=4, block_size=4, max_num_seqs=10)
    huge = engine.submit(prompt(0, 20), 10, Recorder(clock))
    assert state(huge) is SequenceState.RUNNING
    assert huge.reserved_blocks == 4  # capped at the cache size
    assert engine.kv_usage == 1.0  # 5 blocks in use, reported as full
    small = engine.submit(prompt(100, 1), 1, Recorder(clock))
    assert state(small) is SequenceState.WAITING
    run_to_end(clock)
    assert state(huge) is state(small) is SequenceState.FINISHED
    assert small.admitted_at == huge.finished_at


# -- prefix cache


def test_block_hashes_cover_full_blocks_only() -> None:
    assert block_hashes([], 4) == []
    assert block_hashes([1, 2, 3], 4) == []
    assert len(block_hashes([1, 2, 3, 4], 4)) == 1
    assert len(block_hashes(list(range(11)), 4)) == 2
    assert block_hashes(list(range(11)), 4) == block_hashes(list(range(8)), 4)


def test_block_hashes_chain_over_the_prefix() -> None:
    base = list(range(16))
    hashes = block_hashes(base, 4)
    assert len(hashes) == 4
    assert len(set(hashes)) == 4
    assert block_hashes(list(base), 4) == hashes  # same prefix, same hashes
    assert block_hashes([*base, 99, 98, 97, 96], 4)[:4] == hashes

    early = [1000, *base[1:]]
    changed = block_hashes(early, 4)
    assert all(x != y for x, y in zip(changed, hashes, strict=True))

    late = [*base[:8], 1000, *base[9:]]
    changed = block_hashes(late, 4)
    assert changed[:2] == hashes[:2]
    assert changed[2] != hashes[2]
    assert changed[3] != hashes[3]


def test_block_hashes_of_equal_blocks_at_different_positions_differ() -> None:
    hashes = block_hashes([7, 7, 7, 7, 7, 7, 7, 7], 4)
    assert hashes[0] != hashes[1]


def test_prefix_cache_match_counts_leading_blocks() -> None:
    cache = PrefixCache(8)
    cache.insert([1, 2, 3])
    assert len(cache) == 3
    assert cache.match([1, 2, 3]) == 3
    assert cache.match([1, 2, 4, 3]) == 2
    assert cache.match([4, 1, 2]) == 0
    assert cache.match([]) == 0
    cache.insert([1, 2])  # already present: no duplicates
    assert len(cache) == 3


def test_prefix_cache_evicts_least_recently_used() -> None:
    cache = PrefixCache(3)
    cache.insert([1, 2, 3])
    assert cache.match([1]) == 1  # 1 is now the most recently used
    cache.insert([4])  # evicts 2, the least recently used
    assert len(cache) == 3
    assert cache.match([2]) == 0
    assert cache.match([1]) == 1
    assert cache.match([3]) == 1
    assert cache.match([4]) == 1
    cache.insert([5, 6])  # 1 and 3 are older than 4
    assert cache.match([4]) == 1
    assert cache.match([1]) == 0
    assert cache.match([3]) == 0
    assert cache.match([5]) == 1
    assert len(cache) == 3


def test_prefix_cache_insert_refreshes_existing_blocks() -> None:
    cache = PrefixCache(2)
    cache.insert([1, 2])
    cache.insert([1])  # 2 is now the oldest
    cache.insert([3])
    assert cache.match([1]) == 1
    assert cache.match([2]) == 0


def test_prefix_cache_with_no_capacity_keeps_nothing() -> None:
    cache = PrefixCache(0)
    cache.insert([1, 2])
    assert len(cache) == 0
    assert cache.match([1]) == 0


def test_identical_prompt_hits_the_prefix_cache() -> None:
    clock, engine = make_engine(block_size=4)
    tokens = prompt(500, 10)  # two full blocks and two tokens
    first = engine.submit(tokens, 1, Recorder(clock))
    run_to_end(clock)
    assert first.cached_tokens == 0
    assert first.first_token_at == 10 * PREFILL
    assert engine.prefix_queries == 10
    assert engine.prefix_hits == 0

    start = clock.seconds()
    second = engine.submit(list(tokens), 1, Recorder(clock))
    assert second.cached_tokens == 8
    assert second.computed_prompt_tokens == 2
    run_to_end(clock)
    assert second.first_token_at is not None
    assert second.first_token_at - start == 2 * PREFILL
    assert engine.prefix_queries == 20
    assert engine.prefix_hits == 8


def test_full_prompt_hit_still_computes_the_last_token() -> None:
    clock, engine = make_engine(block_size=4)
    tokens = prompt(500, 8)  # exactly two blocks
    engine.submit(tokens, 1, Recorder(clock))
    run_to_end(clock)
    start = clock.seconds()
    second = engine.submit(tokens, 1, Recorder(clock))
    assert second.cached_tokens == 7
    assert second.computed_prompt_tokens == 1
    run_to_end(clock)
    assert second.first_token_at == start + PREFILL
    assert engine.prefix_queries == 16
    assert engine.prefix_hits == 7


def test_shared_prefix_hits_only_the_shared_blocks() -> None:
    clock, engine = make_engine(block_size=4)
    engine.submit(prompt(0, 12), 1, Recorder(clock))
    run_to_end(clock)
    # Same first block, then different tokens.
    other = engine.submit(prompt(0, 4) + prompt(900, 8), 1, Recorder(clock))
    assert other.cached_tokens == 4
    # Differs in the first token: no block matches, even though the rest is equal.
    shifted = engine.submit([999, *prompt(1, 11)], 1, Recorder(clock))
    assert shifted.cached_tokens == 0


def test_prefix_cache_is_filled_when_prefill_completes() -> None:
    clock, engine = make_engine(block_size=4)
    tokens = prompt(0, 8)
    engine.submit(tokens, 10, Recorder(clock))
    assert len(engine.prefix_cache) == 0
    clock.advance(8 * PREFILL)
    assert len(engine.prefix_cache) == 2
    # The first sequence is still decoding; a second one already benefits.
    second = engine.submit(tokens, 1, Recorder(clock))
    assert second.cached_tokens == 7


def test_prefix_cache_capacity_evicts_old_prompts() -> None:
    clock, engine = make_engine(block_size=4, prefix_cache_blocks=2)
    engine.submit(prompt(0, 8), 1, Recorder(clock))
    run_to_end(clock)
    engine.submit(prompt(100, 8), 1, Recorder(clock))  # evicts the first prompt's blocks
    run_to_end(clock)
    assert len(engine.prefix_cache) == 2
    again = engine.submit(prompt(0, 8), 1, Recorder(clock))
    assert again.cached_tokens == 0
    recent = engine.submit(prompt(100, 8), 1, Recorder(clock))
    assert recent.cached_tokens == 7


# -- remote prefill (PD decode leg)


def test_remote_tokens_skip_prefill_cost() -> None:
    clock, engine = make_engine()
    rec = Recorder(clock)
    seq = engine.submit(prompt(0, 12), 2, rec, remote_tokens=8)
    assert seq.remote_tokens == 8
    assert seq.cached_tokens == 0
    assert seq.computed_prompt_tokens == 4
    clock.advance(4 * PREFILL)
    assert rec.tokens == [(0, 1.0)]
    assert engine.prefix_hits == 0


def test_remote_tokens_are_capped_at_the_prompt() -> None:
    clock, engine = make_engine()
    rec = Recorder(clock)
    seq = engine.submit(prompt(0, 12), 1, rec, remote_tokens=100)
    assert seq.remote_tokens == 12
    assert seq.computed_prompt_tokens == 0
    clock.advance(0)
    assert rec.tokens == [(0, 0.0)]


def test_remote_tokens_and_prefix_hits_do_not_add_up() -> None:
    clock, engine = make_engine(block_size=4)
    tokens = prompt(0, 12)
    engine.submit(tokens, 1, Recorder(clock))
    run_to_end(clock)
    seq = engine.submit(tokens, 1, Recorder(clock), remote_tokens=4)
    assert seq.cached_tokens == 11
    assert seq.computed_prompt_tokens == 1


# -- aborts


def test_abort_waiting_sequence() -> None:
    clock, engine = make_engine(max_num_seqs=1)
    recs = [Recorder(clock) for _ in range(3)]
    a, b, c = (engine.submit(prompt(100 * i, 4), 1, recs[i]) for i in range(3))
    clock.advance(0.5)
    engine.abort(b)
    assert state(b) is SequenceState.ABORTED
    assert b.finished_at == 0.5
    assert engine.num_waiting == 1
    assert engine.num_running == 1
    run_to_end(clock)
    assert state(a) is SequenceState.FINISHED
    assert state(c) is SequenceState.FINISHED
    assert c.admitted_at == a.finished_at == 1.0
    assert recs[1].tokens == []
    assert recs[1].ends == []
    assert b.admitted_at is None


def test_abort_running_sequence_frees_slot_and_blocks() -> None:
    clock, engine = make_engine(max_num_seqs=1, kv_blocks=8, block_size=4)
    rec_a = Recorder(clock)
    a = engine.submit(prompt(0, 8), 24, rec_a)  # reserves all 8 blocks
    b = engine.submit(prompt(100, 8), 24, Recorder(clock))
    advance(clock, 3.0)  # first token at 2.0, second at 2.5, third at 3.0
    assert rec_a.indexes == [0, 1, 2]
    assert state(b) is SequenceState.WAITING
    engine.abort(a)
    assert state(a) is SequenceState.ABORTED
    assert a.finished_at == 3.0
    assert a.reserved_blocks == 0
    assert a.used_blocks == 0
    assert a.generated == 3
    assert state(b) is SequenceState.RUNNING
    assert b.admitted_at == 3.0
    assert b.reserved_blocks == 8
    assert engine.used_blocks == 2  # only b's prompt
    assert engine.num_running == 1
    assert engine.num_waiting == 0
    run_to_end(clock)
    assert rec_a.indexes == [0, 1, 2], "an aborted sequence kept generating"
    assert rec_a.ends == []
    assert a.finish_reason is None
    assert state(b) is SequenceState.FINISHED


def test_abort_during_prefill_cancels_the_timer() -> None:
    clock, engine = make_engine()
    rec = Recorder(clock)
    seq = engine.submit(prompt(0, 8), 4, rec)
    assert len(clock.getDelayedCalls()) == 1
    engine.abort(seq)
    assert clock.getDelayedCalls() == []
    assert len(engine.prefix_cache) == 0
    assert engine.num_running == 0
    assert engine.kv_usage == 0.0


def test_abort_is_idempotent() -> None:
    clock, engine = make_engine(max_num_seqs=1)
    a = engine.submit(prompt(0, 4), 8, Recorder(clock))
    b = engine.submit(prompt(100, 4), 8, Recorder(clock))
    c = engine.submit(prompt(200, 4), 8, Recorder(clock))
    engine.abort(b)
    engine.abort(b)
    assert engine.num_waiting == 1
    engine.abort(a)
    assert state(c) is SequenceState.RUNNING
    engine.abort(a)
    assert state(c) is SequenceState.RUNNING
    assert engine.num_running == 1
    assert a.finished_at == b.finished_at == 0.0
    advance(clock, 1.0)
    engine.abort(a)
    assert a.finished_at == 0.0
    run_to_end(clock)
    engine.abort(c)  # finished: nothing to do
    assert state(c) is SequenceState.FINISHED
    assert c.finish_reason == "length"
    assert engine.num_running == engine.num_waiting == 0


def test_listener_may_abort_while_receiving_a_token() -> None:
    clock, engine = make_engine()

    def stop_at_two(seq: SimSequence, index: int) -> None:
        if index == 1:
            engine.abort(seq)

    rec = Recorder(clock, stop_at_two)
    seq = engine.submit(prompt(0, 4), 10, rec)
    run_to_end(clock)
    assert rec.indexes == [0, 1]
    assert rec.ends == []
    assert state(seq) is SequenceState.ABORTED
    assert engine.num_running == 0
    assert clock.getDelayedCalls() == []


def test_listener_may_abort_at_the_last_token() -> None:
    clock, engine = make_engine()
    rec = Recorder(clock, lambda seq, index: engine.abort(seq))
    seq = engine.submit(prompt(0, 4), 1, rec)
    run_to_end(clock)
    assert rec.indexes == [0]
    assert rec.ends == []
    assert state(seq) is SequenceState.ABORTED


# -- slowdown


def test_slowdown_multiplies_prefill_and_decode_costs() -> None:
    clock, engine = make_engine(slowdown=2.0)
    rec = Recorder(clock)
    engine.submit(prompt(0, 8), 3, rec)
    run_to_end(clock)
    assert rec.times == [4.0, 5.0, 6.0]


def test_slowdown_changed_while_running_applies_to_later_tokens() -> None:
    clock, engine = make_engine()
    rec = Recorder(clock)
    engine.submit(prompt(0, 4), 4, rec)
    clock.advance(1.0)  # first token; the second is due at 1.5
    engine.config.slowdown = 4.0
    run_to_end(clock)
    assert rec.times == [1.0, 1.5, 3.5, 5.5]


# -- LoRA


def test_load_and_unload_lora() -> None:
    _, engine = make_engine(max_loras=2)
    engine.load_lora("a", "/adapters/a")
    assert engine.loras == {"a": "/adapters/a"}
    with pytest.raises(ValueError) as loaded:
        engine.load_lora("a", "/elsewhere")
    assert str(loaded.value) == "The lora adapter 'a' has already been loaded."
    assert engine.loras == {"a": "/adapters/a"}
    engine.load_lora("b", "/adapters/b")
    with pytest.raises(ValueError) as full:
        engine.load_lora("c", "/adapters/c")
    assert str(full.value) == "No free LoRA slot: max_loras is 2."
    assert sorted(engine.loras) == ["a", "b"]
    engine.unload_lora("a")
    with pytest.raises(KeyError):
        engine.unload_lora("a")
    engine.load_lora("c", "/adapters/c")
    assert engine.loras == {"b": "/adapters/b", "c": "/adapters/c"}


def test_running_and_waiting_loras() -> None:
    clock, engine = make_engine(max_num_seqs=3)
    assert engine.running_loras() == []
    assert engine.waiting_loras() == []
    engine.submit(prompt(0, 4), 1, Recorder(clock), lora="zeta")
    engine.submit(prompt(100, 4), 1, Recorder(clock))
    engine.submit(prompt(200, 4), 1, Recorder(clock), lora="alpha")
    engine.submit(prompt(300, 4), 1, Recorder(clock), lora="zeta")
    engine.submit(prompt(400, 4), 1, Recorder(clock))
    engine.submit(prompt(500, 4), 1, Recorder(clock), lora="beta")
    assert engine.running_loras() == ["alpha", "zeta"]
    assert engine.waiting_loras() == ["beta", "zeta"]
    run_to_end(clock)
    assert engine.running_loras() == []
    assert engine.waiting_loras() == []
