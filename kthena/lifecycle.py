"""
The pieces of a service tree that owns its lifecycle: children that start in order and
stop in reverse, one after another; a service that turns a signal into a call on the
reactor thread; and a note for settings that only a restart changes.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from types import FrameType
from typing import Any

from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorFromThreads
from twisted.logger import Logger

log = Logger()


class SequentialMultiService(MultiService):
    """
    Children start in the order they were added and stop in reverse order, each stop
    awaited before the next begins: a child may rely on every child before it while it
    runs and while it stops (the proxy listener closes before the drain waits, the drain
    ends before the access log flushes).
    """

    def stopService(self) -> Deferred[None]:
        Service.stopService(self)
        return Deferred.fromCoroutine(self._stop_children())

    async def _stop_children(self) -> None:
        for child in reversed(list(self)):
            try:
                result = child.stopService()
                if isinstance(result, Deferred):
                    await result
            except Exception:
                log.failure("stopping {service} failed", service=_name(child))


def _name(service: IService) -> str:
    return getattr(service, "name", None) or service.__class__.__name__


class SignalService(Service):
    """
    Calls C{callback} on the reactor thread when C{signum} arrives, while running; the
    previous handler comes back on stop. (Neither twistd nor the reactor handles SIGHUP or
    SIGUSR1: by default either kills the process.)
    """

    def __init__(
        self, reactor: IReactorFromThreads, signum: int, callback: Callable[[], object]
    ) -> None:
        self.reactor = reactor
        self.signum = signum
        self.callback = callback
        self._previous: Any = None

    def startService(self) -> None:
        super().startService()
        self._previous = signal.signal(self.signum, self._on_signal)

    def stopService(self) -> None:
        super().stopService()
        signal.signal(self.signum, self._previous or signal.SIG_DFL)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        # A handler may interrupt the reactor thread anywhere (inside a lock it holds):
        # do the work on the reactor's next turn instead.
        self.reactor.callFromThread(self.callback)


def restart_needed(what: str, old: object, new: object) -> bool:
    """Log that C{what} changed and takes effect at the next restart; whether it did."""
    if old == new:
        return False
    log.warn("{what} changed: it takes effect at the next restart", what=what)
    return True
