"""
The garbage collector's view of a long-running router process.

CPython's cyclic collector walks every tracked object on a full collection; in a router
that is mostly what never dies (modules, the config, routes, the scheduler's tables), and
each full pass under load stalls every request in flight for tens of milliseconds: the
tail of the latency distribution. Once the router has started, L{FrozenHeap} moves what is
alive then into the permanent generation (C{gc.freeze}), so that full passes walk only what
requests allocated. After a reload the previous generation's objects are let go: unfreeze,
collect, freeze again. It is for a process of its own (C{twistd kthena-router}); an
application that embeds the router keeps its own collector policy.
"""

from __future__ import annotations

import gc

from twisted.application.service import Service
from zope.interface import implementer

from kthena.config.router import RouterConfig
from kthena.interfaces import IReconfigurable


@implementer(IReconfigurable)
class FrozenHeap(Service):
    """The last child of the router's tree: it freezes what the others built."""

    name = "frozen heap"

    def startService(self) -> None:
        super().startService()
        _refreeze()

    def reconfigure(self, config: RouterConfig) -> None:
        _refreeze()

    def stopService(self) -> None:
        super().stopService()
        gc.unfreeze()


def _refreeze() -> None:
    gc.unfreeze()
    gc.collect()
    gc.freeze()
