"""
Stage 2, identify: who is calling, and at what priority (L{kthena.identity}): a verified
JWT, a header set by an authenticating gateway, or anonymous. A token naming a key not
yet known waits for the key set to be read again (the stage then answers later); a
missing, expired or invalid token where one is needed is a 401.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred

from kthena.config.router import RouterConfig
from kthena.identity.identity import Identifier, Identity
from kthena.interfaces import IExchange
from kthena.record import RequestRecord


class Identification:
    def __init__(self, identifier: Identifier, config: RouterConfig) -> None:
        self.identifier = identifier
        self.reconfigure(config)

    def reconfigure(self, config: RouterConfig) -> None:
        self.identifier.reconfigure(config)
        identity = config.identity
        self.configured = identity.jwt is not None or identity.header is not None

    def identify(self, exchange: IExchange, record: RequestRecord) -> Deferred[None] | None:
        """
        Keep the caller in C{record} (C{user}, C{priority}); a Deferred while the keys
        are read. @raise kthena.errors.ProxyError: 401 (a Deferred fails the same way).
        """
        record.identified = self.configured
        who = self.identifier.identify(exchange)
        if isinstance(who, Deferred):
            return who.addCallback(_keep, record)
        _keep(who, record)
        return None


def _keep(who: Identity, record: RequestRecord) -> None:
    record.user = who.user
    record.priority = who.priority
