"""
Prefill/decode disaggregation as the two engines do it, seen from a router.

vLLM (NIXL connector): the prefill leg carries C{kv_transfer_params.do_remote_decode} and
answers with the C{kv_transfer_params} the decode leg needs; the decode leg carries them and
skips the prefill of the blocks they name.

SGLang (bootstrap): both legs carry the same C{bootstrap_room}; the decode leg waits until
the prefill server at C{bootstrap_host}:C{bootstrap_port} has prefilled that room, up to a
timeout. The prefill side keeps finished rooms in L{BootstrapRooms} and answers
C{GET /sim/bootstrap/<room>} (a long poll) from decode simulators.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field

from twisted.internet.defer import Deferred, TimeoutError, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime

SGLANG_DEFAULT_BOOTSTRAP_PORT = 8998

RoomFetcher = Callable[[str, int, int, float], Deferred[int]]
"""Asks a prefill simulator for a bootstrap room: (host, port, room, timeout) -> tokens."""


class Role(enum.Enum):
    PREFILL = "prefill"
    DECODE = "decode"
    BOTH = "both"

    @property
    def prefills(self) -> bool:
        return self is not Role.DECODE

    @property
    def decodes(self) -> bool:
        return self is not Role.PREFILL


@dataclass(slots=True)
class _Room:
    prompt_tokens: int | None = None
    waiters: list[Deferred[int]] = field(default_factory=list)
    expiry: IDelayedCall | None = None


class BootstrapRooms:
    """
    Rooms this (prefill) simulator has prefilled, kept for C{ttl} seconds for the decode
    leg to claim; waiting decode legs are answered as soon as their room is ready.
    """

    def __init__(self, clock: IReactorTime, ttl: float = 60.0) -> None:
        self.clock = clock
        self.ttl = ttl
        self._rooms: dict[int, _Room] = {}

    def __len__(self) -> int:
        return len(self._rooms)

    def ready(self, room: int, prompt_tokens: int) -> None:
        """The prefill of C{room} is done: wake its waiters and keep it for latecomers."""
        entry = self._rooms.setdefault(room, _Room())
        entry.prompt_tokens = prompt_tokens
        waiters, entry.waiters = entry.waiters, []
        for waiter in waiters:
            waiter.callback(prompt_tokens)
        self._expire_later(room, entry)

    def wait(self, room: int, timeout: float) -> Deferred[int]:
        """
        Fire with the room's prompt token count once it is prefilled.

        @return: a Deferred that fails with L{TimeoutError} after C{timeout} seconds.
        """
        entry = self._rooms.setdefault(room, _Room())
        if entry.prompt_tokens is not None:
            return succeed(entry.prompt_tokens)

        def forget(d: Deferred[int]) -> None:
            if d in entry.waiters:
                entry.waiters.remove(d)
            self._drop_if_idle(room)

        d: Deferred[int] = Deferred(forget)
        entry.waiters.append(d)
        d.addTimeout(timeout, self.clock)
        self._expire_later(room, entry)
        return d

    def _expire_later(self, room: int, entry: _Room) -> None:
        if entry.expiry is not None and entry.expiry.active():
            entry.expiry.reset(self.ttl)
        else:
            entry.expiry = self.clock.callLater(self.ttl, self._expire, room)

    def _expire(self, room: int) -> None:
        entry = self._rooms.pop(room, None)
        if entry is not None:
            for waiter in entry.waiters:
                waiter.errback(TimeoutError(f"bootstrap room {room} expired"))

    def _drop_if_idle(self, room: int) -> None:
        entry = self._rooms.get(room)
        if entry is not None and entry.prompt_tokens is None and not entry.waiters:
            if entry.expiry is not None and entry.expiry.active():
                entry.expiry.cancel()
            del self._rooms[room]
