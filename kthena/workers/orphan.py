"""
A worker outlives its parent only briefly: if the parent dies without stopping it (SIGKILL,
a crash), nobody would restart, signal or stop the worker, and it would keep taking
connections on the shared socket. Every L{CHECK_INTERVAL} the worker looks at its parent
process id; once it changed (the worker was handed to init), it stops as on SIGTERM,
draining what it serves.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from twisted.application.service import Service
from twisted.internet.interfaces import IReactorCore, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

log = Logger()

CHECK_INTERVAL = 1.0


class OrphanWatch(Service):
    """Stops the reactor once the parent that started this worker is gone."""

    name = "orphan watch"

    def __init__(self, reactor: IReactorTime, getppid: Callable[[], int] = os.getppid) -> None:
        self.reactor = reactor
        self.getppid = getppid
        self.parent_pid = getppid()
        self._loop: LoopingCall | None = None

    def startService(self) -> None:
        super().startService()
        self._loop = LoopingCall(self._check)
        self._loop.clock = self.reactor
        self._loop.start(CHECK_INTERVAL, now=False)

    def _check(self) -> None:
        if self.getppid() != self.parent_pid:
            log.error("the parent (pid {pid}) is gone: stopping", pid=self.parent_pid)
            assert self._loop is not None
            self._loop.stop()
            self._loop = None
            IReactorCore(self.reactor).stop()

    def stopService(self) -> None:
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
