"""SGLang-style bootstrap rooms on a L{Clock}, and the PD roles."""

from __future__ import annotations

import pytest
from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from kthena.sim.pd import SGLANG_DEFAULT_BOOTSTRAP_PORT, BootstrapRooms, Role


class Outcome:
    """What a Deferred fired with, collected without letting failures go unhandled."""

    def __init__(self, d: Deferred[int]) -> None:
        self.results: list[int] = []
        self.failures: list[Failure] = []
        d.addCallbacks(self.results.append, self.failures.append)

    @property
    def pending(self) -> bool:
        return not self.results and not self.failures

    def failed_with(self) -> type[BaseException]:
        assert self.results == []
        assert len(self.failures) == 1
        error = self.failures[0].value
        assert error is not None
        return type(error)


def make_rooms(ttl: float = 60.0) -> tuple[Clock, BootstrapRooms]:
    clock = Clock()
    return clock, BootstrapRooms(clock, ttl=ttl)


def test_wait_before_ready_fires_on_ready() -> None:
    clock, rooms = make_rooms()
    outcome = Outcome(rooms.wait(7, timeout=5.0))
    clock.advance(4.0)
    assert outcome.pending
    rooms.ready(7, 123)
    assert outcome.results == [123]
    assert outcome.failures == []
    # The timeout of the answered wait is gone: only the room's expiry remains.
    assert len(clock.getDelayedCalls()) == 1
    clock.advance(10.0)
    assert outcome.results == [123]
    assert outcome.failures == []


def test_every_waiter_of_a_room_is_answered() -> None:
    _, rooms = make_rooms()
    first = Outcome(rooms.wait(1, timeout=5.0))
    second = Outcome(rooms.wait(1, timeout=9.0))
    other_room = Outcome(rooms.wait(2, timeout=5.0))
    rooms.ready(1, 40)
    assert first.results == second.results == [40]
    assert other_room.pending


def test_wait_after_ready_fires_at_once() -> None:
    clock, rooms = make_rooms()
    rooms.ready(3, 99)
    d = rooms.wait(3, timeout=1.0)
    assert d.called
    outcome = Outcome(d)
    assert outcome.results == [99]
    # A ready room can be claimed more than once while it is kept.
    clock.advance(30.0)
    assert Outcome(rooms.wait(3, timeout=1.0)).results == [99]
    # No timeout was scheduled for the immediate answers.
    assert len(clock.getDelayedCalls()) == 1


def test_wait_times_out() -> None:
    clock, rooms = make_rooms()
    outcome = Outcome(rooms.wait(5, timeout=2.0))
    assert len(rooms) == 1
    clock.advance(1.5)
    assert outcome.pending
    clock.advance(0.5)
    assert outcome.failed_with() is TimeoutError
    # Nobody waits and nothing was prefilled: the room is forgotten, its expiry cancelled.
    assert len(rooms) == 0
    assert clock.getDelayedCalls() == []


def test_ready_after_timeout_still_serves_latecomers() -> None:
    clock, rooms = make_rooms()
    late = Outcome(rooms.wait(5, timeout=1.0))
    clock.advance(1.0)
    assert late.failed_with() is TimeoutError
    rooms.ready(5, 8)
    assert late.results == []
    assert Outcome(rooms.wait(5, timeout=1.0)).results == [8]


def test_one_waiter_timing_out_leaves_the_others() -> None:
    clock, rooms = make_rooms()
    short = Outcome(rooms.wait(5, timeout=1.0))
    long = Outcome(rooms.wait(5, timeout=10.0))
    clock.advance(1.0)
    assert short.failed_with() is TimeoutError
    assert long.pending
    assert len(rooms) == 1
    rooms.ready(5, 17)
    assert long.results == [17]
    assert short.results == []


def test_cancel_removes_the_waiter() -> None:
    clock, rooms = make_rooms()
    d = rooms.wait(9, timeout=5.0)
    outcome = Outcome(d)
    d.cancel()
    assert outcome.failed_with() is CancelledError
    assert len(rooms) == 0
    assert clock.getDelayedCalls() == []
    # The room is not haunted by the cancelled waiter.
    rooms.ready(9, 4)
    assert outcome.results == []
    assert Outcome(rooms.wait(9, timeout=1.0)).results == [4]


def test_cancel_one_waiter_keeps_the_room_for_the_others() -> None:
    _, rooms = make_rooms()
    cancelled = rooms.wait(9, timeout=5.0)
    gone = Outcome(cancelled)
    staying = Outcome(rooms.wait(9, timeout=5.0))
    cancelled.cancel()
    assert gone.failed_with() is CancelledError
    assert len(rooms) == 1
    rooms.ready(9, 6)
    assert staying.results == [6]
    assert gone.results == []


def test_cancel_after_timeout_is_harmless() -> None:
    clock, rooms = make_rooms()
    d = rooms.wait(1, timeout=1.0)
    outcome = Outcome(d)
    clock.advance(1.0)
    d.cancel()
    assert outcome.failed_with() is TimeoutError
    assert len(rooms) == 0


def test_ready_rooms_expire_after_ttl() -> None:
    clock, rooms = make_rooms(ttl=10.0)
    rooms.ready(1, 5)
    rooms.ready(2, 6)
    assert len(rooms) == 2
    clock.advance(9.5)
    assert len(rooms) == 2
    assert Outcome(rooms.wait(1, timeout=1.0)).results == [5]
    clock.advance(0.5)
    assert len(rooms) == 0
    assert clock.getDelayedCalls() == []
    # An expired room is no longer ready.
    again = Outcome(rooms.wait(1, timeout=1.0))
    assert again.pending
    clock.advance(1.0)
    assert again.failed_with() is TimeoutError
    assert len(rooms) == 0


def test_ready_again_extends_the_ttl() -> None:
    clock, rooms = make_rooms(ttl=10.0)
    rooms.ready(1, 5)
    clock.advance(6.0)
    rooms.ready(1, 5)
    clock.advance(6.0)
    assert len(rooms) == 1
    clock.advance(4.0)
    assert len(rooms) == 0
    assert clock.getDelayedCalls() == []


def test_waiter_longer_than_ttl_fails_when_the_room_expires() -> None:
    clock, rooms = make_rooms(ttl=10.0)
    outcome = Outcome(rooms.wait(4, timeout=100.0))
    clock.advance(9.0)
    assert outcome.pending
    clock.advance(1.0)
    assert outcome.failed_with() is TimeoutError
    assert "bootstrap room 4 expired" in str(outcome.failures[0].value)
    assert len(rooms) == 0
    assert clock.getDelayedCalls() == []


def test_many_rooms_all_go_away() -> None:
    clock, rooms = make_rooms(ttl=5.0)
    outcomes = [Outcome(rooms.wait(room, timeout=2.0)) for room in range(10)]
    for room in range(10, 20):
        rooms.ready(room, room)
    assert len(rooms) == 20
    clock.advance(2.0)
    assert all(o.failed_with() is TimeoutError for o in outcomes)
    assert len(rooms) == 10
    clock.advance(3.0)
    assert len(rooms) == 0
    assert clock.getDelayedCalls() == []


@pytest.mark.parametrize(
    ("role", "prefills", "decodes"),
    [(Role.PREFILL, True, False), (Role.DECODE, False, True), (Role.BOTH, True, True)],
)
def test_role_properties(role: Role, prefills: bool, decodes: bool) -> None:
    assert role.prefills is prefills
    assert role.decodes is decodes


def test_roles_by_name() -> None:
    assert Role("prefill") is Role.PREFILL
    assert Role("decode") is Role.DECODE
    assert Role("both") is Role.BOTH
    with pytest.raises(ValueError):
        Role("mixed")


def test_sglang_default_bootstrap_port() -> None:
    assert SGLANG_DEFAULT_BOOTSTRAP_PORT == 8998
