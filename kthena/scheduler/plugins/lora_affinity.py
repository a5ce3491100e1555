"""
C{lora-affinity}: for a request naming a LoRA adapter, only pods serving that adapter
(loaded, from the pod's C{/v1/models}, or running it, from its metrics) pass.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from zope.interface import implementer

from kthena.interfaces import IFilterPlugin
from kthena.pods import PodEndpoint
from kthena.scheduler.plugins.args import check_args


@implementer(IFilterPlugin)
class LoraAffinity:
    name = "lora-affinity"

    @classmethod
    def from_args(cls, args: Mapping[str, Any]) -> LoraAffinity:
        check_args(cls.name, args, {})
        return cls()

    def filter(self, request: Any, pods: Sequence[PodEndpoint]) -> list[PodEndpoint]:
        adapter = request.lora
        if adapter is None:
            return list(pods)
        return [p for p in pods if p.serves_adapter(adapter)]
