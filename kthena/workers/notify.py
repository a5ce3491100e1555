"""
Each worker's readiness, as its own systemd notifier tells it.

A worker runs the router's L{kthena.systemd.SystemdNotifier} unchanged; its
C{NOTIFY_SOCKET} names a datagram socket of the parent's, one per worker (the socket
says which worker spoke, with no credentials to check). C{READY=1} makes the worker
ready (after start-up or a reload), C{RELOADING=1} reloading, C{STOPPING=1} stopping.
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

    def __init__(self, worker: Worker, changed: Callable[[Worker], None]) -> None:
        self.worker = worker
        self.changed = changed

    def datagramReceived(self, datagram: bytes, addr: object = None) -> None:
        told = fields(datagram)
        for key, state in STATES.items():
            if told.get(key) == "1" and self.worker.process is not None:
                self.worker.state = state
                self.changed(self.worker)
