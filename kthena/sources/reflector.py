"""
One kind's objects (in one namespace, or all), kept current from the Kubernetes API as
client-go's reflector keeps them: list, then watch from the list's C{resourceVersion}
with bookmarks; a watch the server ends is resumed from the last version seen; C{410
Gone} (the version is too old for the server's history) lists again; any other failure
waits a backoff with jitter, then resumes. The objects last known stay while the API is
unreachable: an outage changes nothing the router routes by.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger

from kthena.failures import describe
from kthena.sources.kubeclient import KubeClient, KubeError

log = Logger()

LIST_TIMEOUT = 60.0
MIN_WATCH = 1.0
"""A watch that ended sooner than this after it began (normally, or with a 410) waits a
backoff before the next, as client-go does for "very short" watches."""
WATCH_SECONDS = (300, 600)
"""The server ends each watch after a random time in this range (client-go's spread), so
that the watches of many routers do not all end at once."""


@dataclass(frozen=True, slots=True)
class Kind:
    """A kind the router reads: C{apiVersion}, C{kind} and the plural of its URL."""

    api: str
    kind: str
    plural: str

    def path(self, namespace: str | None) -> str:
        base = "/api/v1" if self.api == "v1" else f"/apis/{self.api}"
        if namespace is None:
            return f"{base}/{self.plural}"
        return f"{base}/namespaces/{namespace}/{self.plural}"


@dataclass(frozen=True, slots=True)
class Backoff:
    """Waits between failed attempts: doubling from C{first} to C{most}, x0.5-1.5 jitter."""

    first: float = 0.5
    most: float = 30.0

    def after(self, failures: int, draw: Callable[[], float]) -> float:
        delay: float = min(self.most, self.first * 2.0 ** max(0, failures - 1))
        return delay * (0.5 + draw())


class Reflector:
    """
    @ivar objects: the kind's objects by C{namespace/name}, as the API gave them (with
        C{apiVersion} and C{kind} set: list items come without them).
    @ivar synced: a list completed at least once.
    @ivar last_sync: clock time of the last list, watch accepted or watch event
        (bookmarks included): when the router last heard from the API about the kind.
    @ivar errors: failed lists and watches, ever (a C{410} is not one: it asks for a
        list).
    @ivar failing: the last attempt failed; C{last_error} says how.
    """

    def __init__(
        self,
        client: KubeClient,
        clock: IReactorTime,
        kind: Kind,
        namespace: str | None,
        changed: Callable[[], None],
        *,
        idle_timeout: float = 90.0,
        page: int = 500,
        backoff: Backoff = Backoff(),
        rng: random.Random | None = None,
    ) -> None:
        self.client = client
        self.clock = clock
        self.kind = kind
        self.namespace = namespace
        self.changed = changed
        self.idle_timeout = idle_timeout
        self.page = page
        self.backoff = backoff
        self._random = rng or random.Random()
        self.objects: dict[str, dict[str, Any]] = {}
        self.synced = False
        self.last_sync: float | None = None
        self.errors = 0
        self.failing = False
        self.last_error: str | None = None
        self._version: str | None = None
        self._running: Deferred[None] | None = None
        self._stopped = False
        self._failures = 0
        """Failed attempts since the API last answered: the backoff's exponent."""

    @property
    def where(self) -> str:
        """The kind and namespace, for logs and debug views."""
        return f"{self.kind.kind} in {self.namespace or 'every namespace'}"

    def start(self) -> None:
        self._stopped = False
        self._running = Deferred.fromCoroutine(self._run())
        self._running.addErrback(lambda f: f.trap(CancelledError))

    def stop(self) -> None:
        """
        End the loop. What the cancel reaches may fail otherwise than with
        L{CancelledError} (a request cut fails as a response never received, a connection
        attempt as a cancelled connect): the flag, not the error, ends the loop.
        """
        self._stopped = True
        running, self._running = self._running, None
        if running is not None:
            running.cancel()

    def stopped(self) -> bool:
        """Whether L{stop} was called (a call: read afresh after every await)."""
        return self._stopped

    async def _run(self) -> None:
        while not self.stopped():
            began = self.clock.seconds()
            try:
                if self._version is None:
                    await self._list()
                await self._watch()
            except CancelledError:
                raise
            except KubeError as error:
                if error.code != 410 or self._stopped:
                    self._failed(error)
                else:  # too old for the server's history: list again
                    log.info("kubernetes: {where}: {error}; listing again", where=self.where,
                             error=str(error))  # fmt: skip
                    self._version = None
            except Exception as error:
                self._failed(error)
            if self.stopped():
                return
            if self._failures or self.clock.seconds() - began < MIN_WATCH:
                # A failure, or a watch (or a list and its watch) over at once: a server
                # or proxy ending every watch must not be asked again in a tight loop.
                wait = self.backoff.after(max(1, self._failures), self._random.random)
                await deferLater(self.clock, wait)

    def _failed(self, error: Exception) -> None:
        if self._stopped:  # what the stop cut: not a failure of the API
            return
        self.errors += 1
        self._failures += 1
        self.last_error = describe(error)
        if not self.failing:  # once an outage: every retry would repeat it
            log.warn("kubernetes: reading {where} failed: {error}; keeping what is known and "
                     "retrying", where=self.where, error=self.last_error)  # fmt: skip
        self.failing = True

    def _recovered(self) -> None:
        self._failures = 0
        if self.failing:
            log.info("kubernetes: reading {where} works again", where=self.where)
        self.failing = False

    async def _list(self) -> None:
        objects: dict[str, dict[str, Any]] = {}
        params = {"limit": str(self.page)}
        while True:
            answer = await self.client.get(self.kind.path(self.namespace), params, LIST_TIMEOUT)
            for item in answer.get("items") or ():
                if isinstance(item, dict):
                    objects[self._key(item)] = self._complete(item)
            metadata = answer.get("metadata") or {}
            more = metadata.get("continue")
            if not more:
                break
            params = {"limit": str(self.page), "continue": str(more)}
        self._version = str(metadata.get("resourceVersion") or "0")
        self.objects = objects
        self.synced = True
        self._seen()
        self.changed()

    async def _watch(self) -> None:
        assert self._version is not None
        low, high = WATCH_SECONDS
        params = {
            "resourceVersion": self._version,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(self._random.randint(low, high)),
        }
        await self.client.watch(
            self.kind.path(self.namespace), params, self._event, self.idle_timeout, self._seen
        )

    def _event(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        item = event.get("object")
        if not isinstance(item, dict):
            raise KubeError(200, "Malformed", "a watch event without an object")
        if kind == "ERROR":  # a Status: 410 when the version is too old
            code = item.get("code")
            raise KubeError(
                code if isinstance(code, int) else 500,
                str(item.get("reason") or ""),
                str(item.get("message") or ""),
            )
        version = (item.get("metadata") or {}).get("resourceVersion")
        if version is not None:
            self._version = str(version)
        self._seen()
        if kind in ("ADDED", "MODIFIED"):
            self.objects[self._key(item)] = self._complete(item)
        elif kind == "DELETED":
            self.objects.pop(self._key(item), None)
        else:  # BOOKMARK: only the version moves
            return
        self.changed()

    def _seen(self) -> None:
        self.last_sync = self.clock.seconds()
        self._recovered()

    def _complete(self, item: dict[str, Any]) -> dict[str, Any]:
        item.setdefault("apiVersion", self.kind.api)
        item.setdefault("kind", self.kind.kind)
        return item

    @staticmethod
    def _key(item: dict[str, Any]) -> str:
        metadata = item.get("metadata") or {}
        return f"{metadata.get('namespace') or 'default'}/{metadata.get('name')}"
