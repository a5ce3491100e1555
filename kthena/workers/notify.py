"""
Each worker's readiness, as its own systemd notifier tells it.

A worker runs the router's L{kthena.systemd.SystemdNotifier} unchanged; its
C{NOTIFY_SOCKET} names a datagram socket of the parent's, one per worker (the socket
says which worker spoke, with no credentials to check). C{READY=1} makes the worker
ready (after start-up or a reload), C{RELOADING=1} reloading, C{STOPPING=1} stopping;
C{WATCHDOG=1} (and C{READY=1}) tell the parent's watchdog that the worker is alive.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.protocol import DatagramProtocol

from kthena.workers.supervisor import Worker

STATES = {"READY": "ready", "RELOADING": "reloading", "STOPPING": "stopping"}


def fields(message: bytes) -> dict[str, str]:
    """The C{KEY=VALUE} lines of one sd_notify message (others are ignored)."""
    found = {}
    for line in message.decode("utf-8", "replace").splitlines():
        key, sep, value = line.partition("=")
        if sep:
            found[key] = value
    return found


class NotifyProtocol(DatagramProtocol):
    """One worker's notify socket: updates its state, then calls C{changed}."""

    noisy = False

    def __init__(
        self,
        worker: Worker,
        changed: Callable[[Worker], None],
        pinged: Callable[[Worker], None] = lambda worker: None,
    ) -> None:
        self.worker = worker
        self.changed = changed
        self.pinged = pinged

    def datagramReceived(self, datagram: bytes, addr: object = None) -> None:
        told = fields(datagram)
        if self.worker.process is None:
            return
        if told.get("WATCHDOG") == "1" or told.get("READY") == "1":
            self.pinged(self.worker)
        for key, state in STATES.items():
            if told.get(key) == "1":
                self.worker.state = state
                self.changed(self.worker)
