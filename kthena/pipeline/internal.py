"""
Internal errors: a bug the router hit while handling a request. The request still gets an
OpenAI error object (500, C{error_type="internal"}), its metric count and its access-log
record; the traceback goes to the log once per distinct cause (the exception's type and
where it was raised), and then at most once every L{REPORT_INTERVAL} with how many more
requests hit the same cause, so a client repeating a crashing request cannot flood the
log.
"""

from __future__ import annotations

import traceback

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

log = Logger()

REPORT_INTERVAL = 60.0
MAX_CAUSES = 1024
"""Distinct causes remembered; past that the oldest are forgotten (and reported again)."""


def _cause(failure: Failure) -> tuple[str, str]:
    frames = traceback.extract_tb(failure.getTracebackObject()) if failure.tb else []
    where = f"{frames[-1].filename}:{frames[-1].lineno}" if frames else "?"
    return (failure.type.__name__ if isinstance(failure.type, type) else "?", where)


class InternalErrors:
    """Reports internal errors to the log, rate-limited per cause."""

    def __init__(self, clock: IReactorTime, interval: float = REPORT_INTERVAL) -> None:
        self.clock = clock
        self.interval = interval
        self._causes: dict[tuple[str, str], tuple[float, int]] = {}
        self.count = 0

    def report(self, failure: Failure, request_id: str) -> None:
        """One request hit C{failure}."""
        self.count += 1
        cause = _cause(failure)
        now = self.clock.seconds()
        seen = self._causes.get(cause)
        if seen is None:
            if len(self._causes) >= MAX_CAUSES:
                del self._causes[next(iter(self._causes))]
            self._causes[cause] = (now, 0)
            log.failure(
                "internal error handling request {request_id} ({error}); the same cause is "
                "reported at most every {interval:.0f}s from now on",
                failure,
                request_id=request_id,
                error=failure.getErrorMessage(),
                interval=self.interval,
            )
            return
        reported, more = seen
        if now - reported < self.interval:
            self._causes[cause] = (reported, more + 1)
            return
        self._causes[cause] = (now, 0)
        log.error(
            "internal error {kind} at {where} again: {count} requests since the last report, "
            "the latest {request_id} ({error})",
            kind=cause[0],
            where=cause[1],
            count=more + 1,
            request_id=request_id,
            error=failure.getErrorMessage(),
        )
