"""
The router process freezes its startup heap (the GC's full passes then walk only what
requests allocate) and lets go of a previous generation's objects on reload.
"""

from __future__ import annotations

import gc
import sys
import weakref
from collections.abc import Iterator
from pathlib import Path

import pytest
from twisted.internet.testing import MemoryReactorClock

from kthena.heap import FrozenHeap
from kthena.tap import Options, makeService
from tests.unit.proxyfixtures import router_config


class Node:
    """An object in a reference cycle: only the cyclic collector frees it."""

    def __init__(self) -> None:
        self.me = self


@pytest.fixture
def heap() -> Iterator[FrozenHeap]:
    heap = FrozenHeap()
    yield heap
    if heap.running:
        heap.stopService()
    gc.unfreeze()


def test_starting_freezes_what_is_alive(heap: FrozenHeap) -> None:
    assert gc.get_freeze_count() == 0
    heap.startService()
    assert gc.get_freeze_count() > 0
    heap.stopService()
    assert gc.get_freeze_count() == 0


def test_a_reload_lets_the_previous_generation_go(heap: FrozenHeap) -> None:
    node = Node()
    gone = weakref.ref(node)
    heap.startService()
    del node  # the old config's objects, say
    gc.collect()
    assert gone() is not None  # frozen: no collection sees it
    heap.reconfigure(router_config())
    assert gone() is None
    assert gc.get_freeze_count() > 0


def test_the_router_process_ends_its_tree_with_the_frozen_heap(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Built, not started: the tap must not touch the global reactor here.
    if "twisted.internet.reactor" not in sys.modules:
        monkeypatch.setitem(sys.modules, "twisted.internet.reactor", MemoryReactorClock())
    path = tmp_path / "router.yaml"
    path.write_text("listen: tcp:0\nobservability: {accessLog: {enabled: false}}\n")
    options = Options()
    options.parseOptions(["--config", str(path)])
    router = makeService(options)
    assert isinstance(list(router)[-1], FrozenHeap)  # type: ignore[call-overload]
