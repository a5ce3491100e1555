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
from typing import Any

from zope.interface import implementer

from kthena.interfaces import IPostScheduleHook, IPrefixIndex, IScorePlugin
from kthena.pods import PodEndpoint
from kthena.scheduler.plugins.args import check_args

_SCRATCH = "prefix-cache.hashes"


def prefix_hashes(model: str, prompt: str, block_size: int, max_blocks: int) -> list[int]:
    """Chained hashes of the prompt's blocks (a block's hash covers all before it)."""
    hashes: list[int] = []
    # surrogatepass: JSON may carry a lone surrogate ("\ud800"), which UTF-8 cannot encode.
    previous = zlib.crc32(model.encode("utf-8", "surrogatepass"))
    data = prompt.encode("utf-8", "surrogatepass")
    for start in range(0, min(len(data), block_size * max_blocks), block_size):
        previous = hash((previous, data[start : start + block_size]))
        hashes.append(previous)
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
        self._index: OrderedDict[int, OrderedDict[str, None]] = OrderedDict()
        self.entries = 0
        """(block, pod) pairs held, kept as the index changes (read from another thread)."""

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

    def score(self, request: Any, pods: Sequence[PodEndpoint]) -> list[float]:
        hashes = self._hashes(request)
        if not hashes:
            return [0.0] * len(pods)
        wanted = {p.key for p in pods}
        matched: dict[str, int] = {}
        # The longest prefix first: a hash found stands for every block before it.
        for length in range(len(hashes), 0, -1):
            holders = self._index.get(hashes[length - 1])
            if holders is None:
                continue
            for pod in holders:
                if pod in wanted and pod not in matched:
                    matched[pod] = length
            if len(matched) >= min(self.top_k, len(wanted)):
                break
        scale = 100 / len(hashes)
        return [matched.get(p.key, 0) * scale for p in pods]

    def scheduled(self, request: Any, pod: PodEndpoint) -> None:
        index = self._index
        for h in self._hashes(request):
            holders = index.get(h)
            if holders is None:
                holders = index[h] = OrderedDict()
            else:
                index.move_to_end(h)
            if pod.key not in holders:
                self.entries += 1
            holders[pod.key] = None
            holders.move_to_end(pod.key)
            while len(holders) > self.top_k * 2:
                holders.popitem(last=False)
                self.entries -= 1
        while len(index) > self.max_hashes:
            _, evicted = index.popitem(last=False)
            self.entries -= len(evicted)

    def forget_pods(self, keys: Iterable[str]) -> None:
        """Drop pods that left the config from every prefix they held."""
        gone = set(keys)
        if not gone:
            return
        for h in list(self._index):
            holders = self._index[h]
            for key in gone & holders.keys():
                del holders[key]
                self.entries -= 1
            if not holders:
                del self._index[h]
