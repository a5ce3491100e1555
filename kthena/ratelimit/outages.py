"""
A rate-limit backend that cannot answer (Redis down, slow or refusing): every failed call
is counted, and the log says so once when the outage begins and once when it ends, with
what was done meanwhile, not once per request.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.logger import Logger
from twisted.python.failure import Failure

from kthena.interfaces import IBucketBackend

log = Logger()


OPERATIONS = ("check", "settle")
"""The calls a backend is asked for: each failure is counted by backend and operation."""


class Outages:
    """
    @param counted: told of failed calls, C{(backend, operation, how many)}: the metric
        C{kthena_router_rate_limit_backend_errors_total}.
    @param fail_open: what failed checks do meanwhile, for the log.
    """

    def __init__(
        self, counted: Callable[[str, str, int], None], fail_open: Callable[[], bool]
    ) -> None:
        self.counted = counted
        self.fail_open = fail_open
        self._down: dict[int, int] = {}  # id(backend) -> failed calls since it went down

    def down(self, backend: IBucketBackend) -> bool:
        return id(backend) in self._down

    def listed(self, backend: IBucketBackend) -> None:
        """A backend in use: its error series exist from now on, at 0 until one fails, so
        a rate over them reads 0 (not nothing) while it answers."""
        for operation in OPERATIONS:
            self.counted(backend.name, operation, 0)

    def failed(self, backend: IBucketBackend, operation: str, failure: Failure) -> None:
        self.counted(backend.name, operation, 1)
        key = id(backend)
        if key in self._down:
            self._down[key] += 1
            return
        self._down[key] = 1
        log.error(
            "rate-limit backend {backend} cannot answer ({error}): checks {policy} until it does",
            backend=getattr(backend, "display", backend.name),
            error=failure.getErrorMessage(),
            policy="pass (failOpen)" if self.fail_open() else "are refused with 503",
        )

    def recovered(self, backend: IBucketBackend) -> None:
        failed = self._down.pop(id(backend), None)
        if failed is not None:
            log.info(
                "rate-limit backend {backend} answers again, after {count} failed calls",
                backend=getattr(backend, "display", backend.name),
                count=failed,
            )

    def forget(self, backend: IBucketBackend) -> None:
        self._down.pop(id(backend), None)
