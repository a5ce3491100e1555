"""
Config reloads: on SIGHUP and whenever a file the config was read from changes (checked
every C{reloadInterval}). The new config is loaded and validated whole first; an invalid
one is reported with its file and field and the running one kept. A valid one goes to
the router, which hands it to each reconfigurable part of its tree in order.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from typing import Protocol

from twisted.application.service import MultiService
from twisted.internet.interfaces import IReactorFromThreads, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from zope.interface import implementer

from kthena.config.files import file_stamps
from kthena.config.router import RouterConfig
from kthena.config.validate import ConfigError
from kthena.interfaces import IReconfigurable
from kthena.lifecycle import SignalService

log = Logger()


class Reconfigurable(Protocol):
    """What the reloader needs of the router."""

    config: RouterConfig

    def generation(self) -> int: ...

    def reconfigure(self, config: RouterConfig) -> None: ...


@implementer(IReconfigurable)
class ConfigReloader(MultiService):
    """
    @param load: reads and validates the config file (raising L{ConfigError}).
    @param signals: the reactor, to take SIGHUP too (a process of its own); C{None}
        when embedded.
    """

    name = "reloader"

    def __init__(
        self,
        clock: IReactorTime,
        router: Reconfigurable,
        config_path: str | None,
        load: Callable[[str], RouterConfig],
        signals: IReactorFromThreads | None = None,
    ) -> None:
        super().__init__()
        self.clock = clock
        self.router = router
        self.config_path = config_path
        self.load = load
        self.interval = router.config.reload_interval
        self._stamps = file_stamps(router.config.files)
        self._poll: LoopingCall | None = None
        if signals is not None:
            SignalService(signals, signal.SIGHUP, lambda: self.reload("SIGHUP")).setServiceParent(
                self
            )

    def startService(self) -> None:
        super().startService()
        self._start_polling()

    def _start_polling(self) -> None:
        if self.config_path is not None and self.interval > 0:
            self._poll = LoopingCall(self._check_files)
            self._poll.clock = self.clock
            self._poll.start(self.interval, now=False)

    def stopService(self) -> object:
        if self._poll is not None and self._poll.running:
            self._poll.stop()
        return super().stopService()

    def reconfigure(self, config: RouterConfig) -> None:
        if config.reload_interval != self.interval:
            self.interval = config.reload_interval
            if self._poll is not None and self._poll.running:
                self._poll.stop()
            if self.running:
                self._start_polling()

    def _check_files(self) -> None:
        if file_stamps(self.router.config.files) != self._stamps:
            self.reload("a config file changed")

    def reload(self, why: str) -> bool:
        """
        Load the config file again and apply it.

        @return: whether the new config was applied.
        """
        if self.config_path is None:
            log.warn("reload ({why}) ignored: the config was not read from a file", why=why)
            return False
        self._stamps = file_stamps(self.router.config.files)
        try:
            new = self.load(self.config_path)
        except ConfigError as e:
            log.error(
                "reload ({why}) failed; keeping generation {generation}: {error}",
                why=why,
                generation=self.router.generation(),
                error=str(e),
            )
            return False
        self._stamps = file_stamps(new.files)
        self.router.reconfigure(new)
        log.info(
            "reload ({why}) applied: generation {generation}, {routes} routes, "
            "{servers} servers, {pods} pods",
            why=why,
            generation=self.router.generation(),
            routes=len(new.resources.routes),
            servers=len(new.resources.servers),
            pods=len(new.resources.pods),
        )
        return True
