"""
Deferreds their owners keep without keeping themselves alive through them.

A body reader's C{done} is a L{Deferred} whose canceller stops the reader. A canceller
holding the reader (C{Deferred(lambda _: self.stop())}) makes a reference cycle the
reader's owner cannot see: reader -> C{done} -> canceller -> reader. Such cycles are freed
only by CPython's cyclic collector, whose passes under load walk everything allocated since
the last one (a cycle a request was ~4% of the router's CPU). L{stopping} holds the stop
method weakly: the reader goes by reference counting as soon as nothing else holds it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from weakref import WeakMethod

from twisted.internet.defer import Deferred


def stopping(stop: Callable[[], object]) -> Deferred[Any]:
    """
    A new Deferred whose cancellation calls C{stop} (a bound method), held weakly: once
    its object is gone there is nothing left to stop.
    """
    method = WeakMethod(stop)

    def cancel(_: Deferred[Any]) -> None:
        bound = method()
        if bound is not None:
            bound()

    return Deferred(cancel)
