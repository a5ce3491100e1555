"""
Telling systemd how the router is doing: the sd_notify protocol (sd_notify(3)), spoken
directly (one Unix datagram of C{KEY=VALUE} lines per message to the socket named by
C{$NOTIFY_SOCKET}, which systemd sets for C{Type=notify} services), since neither Twisted
nor the standard library has it and it is a few lines. Outside systemd the variable is
unset and nothing is sent.

L{SystemdNotifier}, the last child of the router's tree, says:

  - C{READY=1} once the router takes traffic: its listeners listen and the first scrape
    round of the pods is done, so that C{systemctl start} returns, and units ordered after
    the router start, only when requests would be routed;
  - C{RELOADING=1} then C{READY=1} around a reload, so that C{systemctl reload} and the
    unit's state follow it;
  - C{STOPPING=1} when the drain starts;
  - C{WATCHDOG=1} every half C{WatchdogSec}, from a timer on the reactor: a reactor that
    is wedged stops the pings, and systemd kills the process and restarts it.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from twisted.application.service import Service
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

log = Logger()

Send = Callable[[str], None]
"""Sends one message (C{KEY=VALUE} lines) to systemd; raises L{OSError} when it cannot."""

SEND_TIMEOUT = 1.0
"""The longest a message may wait for room in systemd's socket. A datagram socket whose
reader is behind blocks the sender; a bounded wait keeps the reactor going, and one second
is far more than systemd ever needs to read."""


def socket_address(value: str) -> bytes:
    """C{$NOTIFY_SOCKET} as C{connect} takes it: a leading C{@} names the abstract namespace."""
    raw = os.fsencode(value)
    return b"\0" + raw[1:] if raw.startswith(b"@") else raw


def datagram_sender(address: bytes) -> Send:
    """Sends each message as a datagram to C{address}, on a socket of its own (as libsystemd
    does: nothing stays open between messages, which come seconds apart at most)."""

    def send(message: str) -> None:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.settimeout(SEND_TIMEOUT)
            s.sendto(message.encode(), address)

    return send


def watchdog_interval(environ: Mapping[str, str], pid: int) -> float | None:
    """
    Seconds between two C{WATCHDOG=1}: half of C{$WATCHDOG_USEC} (as sd_watchdog_enabled(3)
    advises), when systemd set it for this process (C{$WATCHDOG_PID} unset or ours: a
    child started with the parent's environment must not ping for it); C{None} otherwise.
    """
    usec = environ.get("WATCHDOG_USEC", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    owner = environ.get("WATCHDOG_PID")
    if owner and owner != str(pid):
        return None
    return int(usec) / 2 / 1_000_000


def monotonic_usec() -> int:
    """C{CLOCK_MONOTONIC} in microseconds: systemd 253 and later match C{RELOADING=1} to
    the reload they asked for by this (C{MONOTONIC_USEC}); earlier ones ignore it."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


@dataclass(frozen=True, slots=True)
class Systemd:
    """
    What systemd asked of this process.

    @ivar send: sends a message to systemd.
    @ivar watchdog: seconds between two C{WATCHDOG=1}; C{None}: no watchdog.
    """

    send: Send
    watchdog: float | None = None

    @classmethod
    def from_environment(
        cls, environ: Mapping[str, str] = os.environ, pid: int | None = None
    ) -> Systemd | None:
        """This process's systemd; C{None} when it was not started as C{Type=notify}."""
        address = environ.get("NOTIFY_SOCKET")
        if not address:
            return None
        pid = os.getpid() if pid is None else pid
        return cls(datagram_sender(socket_address(address)), watchdog_interval(environ, pid))


class SystemdNotifier(Service):
    """
    The router's state for systemd (see the module docstring). As the tree's last child it
    starts once every other child has (the listeners listen) and stops first, as the drain
    starts. systemd stops watching the watchdog once told C{STOPPING=1}, so the pings stop
    then too, however long the drain takes.

    @ivar ready: C{READY=1} was sent (reloads are told only after it).
    """

    name = "systemd"

    def __init__(
        self,
        clock: IReactorTime,
        systemd: Systemd | None,
        serving: Callable[[], bool],
        status: Callable[[], str],
    ) -> None:
        """
        @param systemd: where to send; C{None}: not under systemd, nothing is sent.
        @param serving: whether the router takes traffic (listening, first scrape done).
        @param status: one line for C{systemctl status} (routes, servers, pods).
        """
        self.clock = clock
        self.systemd = systemd
        self.serving = serving
        self.status = status
        self.ready = False
        self._watchdog: LoopingCall | None = None
        self._failing = False

    def startService(self) -> None:
        super().startService()
        if self.systemd is not None and self.systemd.watchdog is not None:
            self._watchdog = LoopingCall(self._notify, "WATCHDOG=1")
            self._watchdog.clock = self.clock
            self._watchdog.start(self.systemd.watchdog, now=True)
        self.check()

    def check(self) -> None:
        """C{READY=1} the first time the router serves while this runs (the router calls
        this after every scrape round)."""
        if self.running and not self.ready and self.serving():
            self.ready = True
            self._notify(f"READY=1\nSTATUS={self.status()}\nMAINPID={os.getpid()}")

    def reloading(self) -> None:
        """A reload starts (during start-up there is nothing to tell: READY=1 comes later)."""
        if self.ready:
            self._notify(f"RELOADING=1\nSTATUS=reloading\nMONOTONIC_USEC={monotonic_usec()}")

    def reloaded(self) -> None:
        if self.ready:
            self._notify(f"READY=1\nSTATUS={self.status()}")

    def stopService(self) -> None:
        super().stopService()
        if self._watchdog is not None and self._watchdog.running:
            self._watchdog.stop()
        self._watchdog = None
        self._notify("STOPPING=1\nSTATUS=draining")

    def _notify(self, message: str) -> None:
        """Send; a failure is logged (once until a message goes through again), never
        raised: systemd's socket going away must not take the router down."""
        if self.systemd is None:
            return
        try:
            self.systemd.send(message)
        except OSError as e:
            if not self._failing:
                log.warn("cannot notify systemd: {error}", error=str(e))
            self._failing = True
        else:
            self._failing = False
