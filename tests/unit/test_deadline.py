"""
L{kthena.http.deadline.Deadline}: each deadline fires at its exact time, once, whatever
was set or cleared before; a cleared or stopped one never fires; under steady traffic
(a deadline set and cleared per request) the reactor call is made once, not per request.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.interfaces import IDelayedCall
from twisted.internet.task import Clock

from kthena.http.deadline import Deadline


class CountingClock(Clock):
    def __init__(self) -> None:
        super().__init__()
        self.made = 0

    def callLater(
        self, delay: float, callable: Callable[..., object], *args: object, **kw: object
    ) -> IDelayedCall:
        self.made += 1
        return super().callLater(delay, callable, *args, **kw)


def test_a_deadline_fires_at_its_time_once() -> None:
    clock = CountingClock()
    fired: list[float] = []
    deadline = Deadline(clock)
    deadline.set(10, lambda: fired.append(clock.seconds()))
    assert deadline.armed()
    clock.advance(9.999)
    assert fired == []
    clock.advance(0.001)
    assert fired == [10.0] and not deadline.armed()
    clock.advance(100)
    assert fired == [10.0] and clock.getDelayedCalls() == []


def test_a_later_deadline_keeps_the_call_and_fires_at_the_later_time() -> None:
    clock = CountingClock()
    fired: list[tuple[str, float]] = []
    deadline = Deadline(clock)
    deadline.set(10, lambda: fired.append(("head", clock.seconds())))
    clock.advance(5)
    deadline.set(60, lambda: fired.append(("idle", clock.seconds())))
    assert clock.made == 1
    clock.advance(5)  # the call's own time: it waits the rest
    assert fired == []
    clock.advance(54.9)
    assert fired == []
    clock.advance(0.1)
    assert fired == [("idle", 65.0)]


def test_a_sooner_deadline_moves_the_call() -> None:
    clock = CountingClock()
    fired: list[tuple[str, float]] = []
    deadline = Deadline(clock)
    deadline.set(60, lambda: fired.append(("idle", clock.seconds())))
    clock.advance(1)
    deadline.set(10, lambda: fired.append(("head", clock.seconds())))
    clock.advance(10)
    assert fired == [("head", 11.0)]
    clock.advance(100)
    assert fired == [("head", 11.0)]


def test_cleared_and_stopped_deadlines_never_fire() -> None:
    clock = CountingClock()
    fired: list[str] = []
    deadline = Deadline(clock)
    deadline.set(10, lambda: fired.append("cleared"))
    deadline.clear()
    assert not deadline.armed()
    clock.advance(20)
    assert fired == [] and clock.getDelayedCalls() == []  # it fired for nothing
    deadline.set(10, lambda: fired.append("stopped"))
    deadline.stop()
    assert clock.getDelayedCalls() == []
    clock.advance(20)
    assert fired == []


def test_steady_traffic_makes_no_call_per_request() -> None:
    clock = CountingClock()
    fired: list[str] = []
    deadline = Deadline(clock)
    for _ in range(1000):  # a keep-alive connection: head deadline, then idle, 10 ms apart
        deadline.set(10, lambda: fired.append("head"))
        clock.advance(0.005)
        deadline.clear()
        deadline.set(60, lambda: fired.append("idle"))
        clock.advance(0.005)
    assert fired == [] and clock.made <= 3  # the first call, and one re-made when it fired
    clock.advance(60)
    assert fired == ["idle"]
