"""
The simulated inference engine: continuous batching on the reactor's clock.

It models what a router can observe of a vLLM or SGLang server, nothing more: at most
C{max_num_seqs} sequences run, the rest wait in arrival order; a sequence is admitted only
when the KV cache can hold its prompt and its whole output; its first token comes after the
queue wait plus a prefill cost per prompt token that is neither in the prefix cache nor
delivered by a remote prefill; then one token per C{itl} seconds.  Everything is driven by
an L{IReactorTime}, so tests replace time with a L{Clock} and get exact arithmetic.
"""

from __future__ import annotations

import enum
import itertools
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from twisted.internet.interfaces import IDelayedCall, IReactorTime


@dataclass(slots=True)
class EngineConfig:
    """
    The engine's knobs; mutable so the fault admin can slow a running engine down.

    @ivar slowdown: multiplies every prefill and decode cost (fault injection).
    """

    max_num_seqs: int = 256
    prefill_per_token: float = 0.0001
    itl: float = 0.02
    kv_blocks: int = 4096
    block_size: int = 16
    prefix_cache_blocks: int = 4096
    max_model_len: int = 8192
    max_loras: int = 4
    slowdown: float = 1.0


class SequenceState(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"
    ABORTED = "aborted"


class SequenceListener(Protocol):
    """What the HTTP layer gives the engine to receive one sequence's output."""

    def token(self, seq: SimSequence, index: int) -> None:
        """Output token C{index} (0-based) of C{seq} was generated."""

    def finished(self, seq: SimSequence) -> None:
        """C{seq} ended normally; C{seq.finish_reason} says why."""


class EngineObserver(Protocol):
    """Receives the engine's events as they happen, to keep its metrics."""

    def prefilled(self, seq: SimSequence) -> None:
        """C{seq} produced its first token (its TTFT and prompt accounting are final)."""

    def decoded(self, seq: SimSequence, gap: float) -> None:
        """C{seq} produced a token after the first, C{gap} seconds after the previous one."""

    def finished(self, seq: SimSequence) -> None:
        """C{seq} completed normally."""


class NullObserver:
    """An observer that keeps nothing."""

    def prefilled(self, seq: SimSequence) -> None:
        pass

    def decoded(self, seq: SimSequence, gap: float) -> None:
        pass

    def finished(self, seq: SimSequence) -> None:
        pass


def block_hashes(token_ids: Sequence[int], block_size: int) -> list[int]:
    """
    Chained hashes of the full blocks of a prompt, as vLLM's prefix cache keys them: a
    block's key covers every token before it, so equal keys mean equal prefixes.
    """
    hashes: list[int] = []
    parent = 0
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = hash((parent, tuple(token_ids[start : start + block_size])))
        hashes.append(parent)
    return hashes


class PrefixCache:
    """An LRU set of prompt-block hashes with a fixed capacity."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._blocks: OrderedDict[int, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._blocks)

    def match(self, hashes: Sequence[int]) -> int:
        """Count the leading blocks present, marking them recently used."""
        matched = 0
        for h in hashes:
            if h not in self._blocks:
                break
            self._blocks.move_to_end(h)
            matched += 1
        return matched

    def insert(self, hashes: Sequence[int]) -> None:
        if self.capacity <= 0:
            return
        for h in hashes:
            self._blocks[h] = None
            self._blocks.move_to_end(h)
        while len(self._blocks) > self.capacity:
            self._blocks.popitem(last=False)


def _blocks_for(tokens: int, block_size: int) -> int:
    return -(-tokens // block_size)


@dataclass(eq=False, slots=True)
class SimSequence:
    """
    One request inside the engine, with the timings the metrics are made of.

    @ivar remote_tokens: prompt tokens whose KV cache a remote prefill delivers (PD decode
        leg); they cost no prefill time and are not prefix-cache hits.
    """

    request_id: str
    prompt_token_ids: Sequence[int]
    max_tokens: int
    listener: SequenceListener
    lora: str | None = None
    remote_tokens: int = 0
    finish_reason_at_limit: str = "length"
    block_size: int = 16
    arrival: float = 0.0
    admitted_at: float | None = None
    first_token_at: float | None = None
    last_token_at: float | None = None
    finished_at: float | None = None
    cached_tokens: int = 0
    generated: int = 0
    reserved_blocks: int = 0
    state: SequenceState = SequenceState.WAITING
    finish_reason: str | None = None
    _timer: IDelayedCall | None = field(default=None, repr=False)

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def computed_prompt_tokens(self) -> int:
        """Prompt tokens this engine had to prefill itself."""
        return self.prompt_tokens - max(self.cached_tokens, self.remote_tokens)

    @property
    def used_blocks(self) -> int:
        """KV blocks this sequence occupies now: its prompt and what it has generated."""
        if self.state is not SequenceState.RUNNING:
            return 0
        return _blocks_for(self.prompt_tokens + self.generated, self.block_size)


class SimEngine:
    """
    Continuous batching over a FIFO waiting queue, with KV-cache admission control.

    The engine never loses a sequence: each one ends finished (its listener told) or
    aborted (by L{abort}, which frees its slot and blocks at once).
    """

    def __init__(
        self,
        clock: IReactorTime,
        config: EngineConfig,
        observer: EngineObserver | None = None,
    ) -> None:
        self.clock = clock
        self.config = config
        self.observer: EngineObserver = observer or NullObserver()
        self.prefix_cache = PrefixCache(config.prefix_cache_blocks)
        self.loras: dict[str, str] = {}
        self._waiting: deque[SimSequence] = deque()
        self._running: set[SimSequence] = set()
        self._reserved = 0
        self.prefix_queries = 0
        self.prefix_hits = 0
        self._ids = itertools.count()

    # -- state a router observes

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def used_blocks(self) -> int:
        return sum(seq.used_blocks for seq in self._running)

    @property
    def kv_usage(self) -> float:
        """Fraction of KV blocks that running sequences occupy, 0..1."""
        return min(1.0, self.used_blocks / self.config.kv_blocks)

    def running_loras(self) -> list[str]:
        return sorted({s.lora for s in self._running if s.lora})

    def waiting_loras(self) -> list[str]:
        return sorted({s.lora for s in self._waiting if s.lora})

    # -- LoRA adapters

    def load_lora(self, name: str, path: str) -> None:
        """
        @raise ValueError: when the adapter is loaded already or no slot is free.
        """
        if name in self.loras:
            raise ValueError(f"The lora adapter '{name}' has already been loaded.")
        if len(self.loras) >= self.config.max_loras:
            raise ValueError(f"No free LoRA slot: max_loras is {self.config.max_loras}.")
        self.loras[name] = path

    def unload_lora(self, name: str) -> None:
        """
        @raise KeyError: when no such adapter is loaded.
        """
        del self.loras[name]

    # -- requests

    def next_request_id(self) -> str:
        return f"{next(self._ids)}"

    def submit(
        self,
        prompt_token_ids: Sequence[int],
        max_tokens: int,
        listener: SequenceListener,
        *,
        request_id: str | None = None,
        lora: str | None = None,
        remote_tokens: int = 0,
        finish_reason_at_limit: str = "length",
    ) -> SimSequence:
        """Queue a sequence; it starts when a slot and enough KV blocks are free."""
        seq = SimSequence(
            request_id=request_id or self.next_request_id(),
            prompt_token_ids=prompt_token_ids,
            max_tokens=max_tokens,
            listener=listener,
            lora=lora,
            remote_tokens=min(remote_tokens, len(prompt_token_ids)),
            finish_reason_at_limit=finish_reason_at_limit,
            arrival=self.clock.seconds(),
            block_size=self.config.block_size,
        )
        self._waiting.append(seq)
        self._admit()
        return seq

    def abort(self, seq: SimSequence) -> None:
        """Stop a sequence wherever it is (the client went away); idempotent."""
        if seq.state is SequenceState.WAITING:
            self._waiting.remove(seq)
        elif seq.state is SequenceState.RUNNING:
            self._release(seq)
        else:
            return
        seq.state = SequenceState.ABORTED
        seq.finished_at = self.clock.seconds()
        self._admit()

    def _reservation(self, seq: SimSequence) -> int:
        need = _blocks_for(seq.prompt_tokens + seq.max_tokens, self.config.block_size)
        return min(need, self.config.kv_blocks)

    def _admit(self) -> None:
        config = self.config
        while self._waiting and len(self._running) < config.max_num_seqs:
            seq = self._waiting[0]
            need = self._reservation(seq)
            if self._running and self._reserved + need > config.kv_blocks:
                return
            self._waiting.popleft()
            self._start(seq, need)

    def _start(self, seq: SimSequence, reserved: int) -> None:
        config = self.config
        now = self.clock.seconds()
        seq.state = SequenceState.RUNNING
        seq.admitted_at = now
        seq.reserved_blocks = reserved
        self._reserved += reserved
        self._running.add(seq)
        hashes = block_hashes(seq.prompt_token_ids, config.block_size)
        matched = self.prefix_cache.match(hashes) * config.block_size
        # Like vLLM, the last prompt token is always computed, even on a full hit.
        seq.cached_tokens = max(0, min(matched, seq.prompt_tokens - 1))
        self.prefix_queries += seq.prompt_tokens
        self.prefix_hits += seq.cached_tokens
        delay = seq.computed_prompt_tokens * config.prefill_per_token * config.slowdown
        seq._timer = self.clock.callLater(delay, self._first_token, seq, hashes)

    def _first_token(self, seq: SimSequence, hashes: list[int]) -> None:
        now = self.clock.seconds()
        self.prefix_cache.insert(hashes)
        seq.first_token_at = seq.last_token_at = now
        seq.generated = 1
        self.observer.prefilled(seq)
        seq.listener.token(seq, 0)
        self._continue(seq)

    def _next_token(self, seq: SimSequence) -> None:
        now = self.clock.seconds()
        assert seq.last_token_at is not None
        gap = now - seq.last_token_at
        seq.last_token_at = now
        index = seq.generated
        seq.generated += 1
        self.observer.decoded(seq, gap)
        seq.listener.token(seq, index)
        self._continue(seq)

    def _continue(self, seq: SimSequence) -> None:
        if seq.state is not SequenceState.RUNNING:
            return  # the listener aborted it while receiving the token
        if seq.generated >= seq.max_tokens:
            self._finish(seq)
            return
        delay = self.config.itl * self.config.slowdown
        seq._timer = self.clock.callLater(delay, self._next_token, seq)

    def _finish(self, seq: SimSequence) -> None:
        self._release(seq)
        seq.state = SequenceState.FINISHED
        seq.finished_at = self.clock.seconds()
        seq.finish_reason = seq.finish_reason_at_limit
        self.observer.finished(seq)
        seq.listener.finished(seq)
        self._admit()

    def _release(self, seq: SimSequence) -> None:
        if seq._timer is not None and seq._timer.active():
            seq._timer.cancel()
        seq._timer = None
        self._running.discard(seq)
        self._reserved -= seq.reserved_blocks
        seq.reserved_blocks = 0
