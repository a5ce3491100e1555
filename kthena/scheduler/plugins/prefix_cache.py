"""
C{prefix-cache}: favours pods that recently served a request sharing the prompt's prefix.

The rendered prompt is cut into C{blockSizeToHash}-character blocks (64: vLLM's 16-token
blocks at about 4 characters a token), each hashed together with the previous block's
hash (so one hash stands for the whole prefix), starting from the model's name. An LRU
of at most C{maxHashCacheSize} hashes remembers which pods served each prefix; a pod's
score is its longest matched prefix over the prompt's blocks, x 100. After a success the
serving pod is recorded for every block (the post-schedule hook). Pods that leave the
config are dropped from the index.
"""

from __future__ import annotations

import zlib
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from itertools import compress, repeat
from operator import not_
from typing import Any

from zope.interface import implementer

from kthena.interfaces import IPostScheduleHook, IPrefixIndex, IScorePlugin
from kthena.pods import PodEndpoint
from kthena.scheduler.plugins.args import check_args

_SCRATCH = "prefix-cache.hashes"
POSITIONS_KEPT = 64
"""Candidate sets whose pod places are kept (all dropped past this)."""


def prefix_hashes(model: str, prompt: str, block_size: int, max_blocks: int) -> list[int]:
    """Chained hashes of the prompt's blocks (a block's hash covers all before it)."""
    hashes: list[int] = []
    # surrogatepass: JSON may carry a lone surrogate ("\ud800"), which UTF-8 cannot encode.
    previous = zlib.crc32(model.encode("utf-8", "surrogatepass"))
    data = prompt.encode("utf-8", "surrogatepass")
    append = hashes.append
    for start in range(0, min(len(data), block_size * max_blocks), block_size):
        previous = hash((previous, data[start : start + block_size]))
        append(previous)
    return hashes


@implementer(IScorePlugin, IPostScheduleHook, IPrefixIndex)
class PrefixCache:
    name = "prefix-cache"

    def __init__(
        self,
        block_size: int = 64,
        max_blocks: int = 128,
        max_hashes: int = 50_000,
        top_k: int = 5,
    ) -> None:
        self.block_size = block_size
        self.max_blocks = max_blocks
        self.max_hashes = max_hashes
        self.top_k = top_k
        self._index: OrderedDict[int, list[str]] = OrderedDict()
        """Each prefix hash to the keys of the pods that served it, the most recent last (a
        list, not an ordered dict: at most C{2 x topKMatches} keys, and a third of the
        memory of a full index)."""
        self.entries = 0
        """(block, pod) pairs held, kept as the index changes (read from another thread)."""
        self._positions: dict[tuple[PodEndpoint, ...], tuple[dict[str, int], frozenset[str]]]
        self._positions = {}
        """Per candidate set: each pod's key to its place, and the keys (sets repeat from
        one request to the next; building these per request costs a pass over the pods)."""

    @classmethod
    def from_args(cls, args: Mapping[str, Any]) -> PrefixCache:
        checked = check_args(
            cls.name,
            args,
            {"blockSizeToHash": int, "maxBlocksToMatch": int, "maxHashCacheSize": int,
             "topKMatches": int},
        )  # fmt: skip
        for key, value in checked.items():
            if value < 1:
                raise ValueError(f"{cls.name}: {key} must be at least 1")
        return cls(
            checked.get("blockSizeToHash", 64),
            checked.get("maxBlocksToMatch", 128),
            checked.get("maxHashCacheSize", 50_000),
            checked.get("topKMatches", 5),
        )

    def __len__(self) -> int:
        return len(self._index)

    def _hashes(self, request: Any) -> list[int]:
        hashes: list[int] | None = request.scratch.get(_SCRATCH)
        if hashes is None:
            hashes = prefix_hashes(request.model, request.prompt, self.block_size, self.max_blocks)
            request.scratch[_SCRATCH] = hashes
        return hashes

    def _places(self, pods: Sequence[PodEndpoint]) -> tuple[dict[str, int], frozenset[str]]:
        key = tuple(pods)
        kept = self._positions.get(key)
        if kept is None:
            if len(self._positions) >= POSITIONS_KEPT:
                self._positions.clear()
            places = {p.key: i for i, p in enumerate(key)}
            kept = self._positions[key] = (places, frozenset(places))
        return kept

    def score(self, request: Any, pods: Sequence[PodEndpoint]) -> list[float]:
        hashes = self._hashes(request)
        scores = [0.0] * len(pods)
        if not hashes:
            return scores
        places, keys = self._places(pods)
        need = min(self.top_k, len(places))
        unmatched = set(keys)
        scale = 100 / len(hashes)
        # The longest prefix first: a hash found stands for every block before it. Each
        # level's holders, looked up at once; the levels that hold no unmatched pod are
        # skipped in C (the selector is lazy, so it sees the pods matched so far).
        levels = list(map(self._index.get, hashes, repeat(())))
        levels.reverse()
        depth = len(hashes)
        useful = map(not_, map(unmatched.isdisjoint, levels))
        for length in compress(range(depth, 0, -1), useful):
            new = unmatched.intersection(levels[depth - length])
            unmatched -= new
            for pod in new:
                scores[places[pod]] = length * scale
            if len(places) - len(unmatched) >= need:
                break
        return scores

    def scheduled(self, request: Any, pod: PodEndpoint) -> None:
        index = self._index
        get = index.get
        key = pod.key
        most = self.top_k * 2
        entries = self.entries
        for h in self._hashes(request):
            holders = get(h)
            if holders is None:
                index[h] = [key]
                entries += 1
                continue
            index.move_to_end(h)
            if holders[-1] == key:
                continue
            if key in holders:
                holders.remove(key)
                holders.append(key)
                continue
            holders.append(key)
            entries += 1
            if len(holders) > most:  # one over: the least recent pod goes
                del holders[0]
                entries -= 1
        while len(index) > self.max_hashes:
            _, evicted = index.popitem(last=False)
            entries -= len(evicted)
        self.entries = entries

    def forget_pods(self, keys: Iterable[str]) -> None:
        """Drop pods that left the config from every prefix they held."""
        gone = set(keys)
        if not gone:
            return
        self._positions.clear()  # they hold the pods that left
        for h, holders in list(self._index.items()):
            kept = [key for key in holders if key not in gone]
            if len(kept) == len(holders):
                continue
            self.entries -= len(holders) - len(kept)
            if kept:
                holders[:] = kept
            else:
                del self._index[h]
