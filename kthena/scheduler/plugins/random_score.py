"""C{random}: a uniformly random score, so that pods are chosen uniformly."""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import Any

from zope.interface import implementer

from kthena.interfaces import IScorePlugin
from kthena.pods import PodEndpoint
from kthena.scheduler.plugins.args import check_args


@implementer(IScorePlugin)
class RandomScore:
    name = "random"

    def __init__(self, rng: random.Random | None = None) -> None:
        self._random = rng or random.Random()

    @classmethod
    def from_args(cls, args: Mapping[str, Any]) -> RandomScore:
        check_args(cls.name, args, {})
        return cls()

    def score(self, request: Any, pods: Sequence[PodEndpoint]) -> list[float]:
        draw = self._random.random
        return [draw() * 100 for _ in pods]
