"""
A worker's own log, in the parent's.

A worker logs Twisted's JSON events (C{twist --log-file + --log-format json}) to its
standard error, a pipe the parent reads; each event goes on in the parent's log as it
was (its time, namespace, level and text) with C{log_system} saying which worker and
where in it (C{[worker 1 kthena.listening#info]} in text logs). So the workers' lines land
wherever the parent's go (a twistd log file, the journal), whatever became of the
standard streams. A line that is not such an event (a traceback before the worker's
logging began) is logged as an error of that worker. Standard output stays the
parent's: a stdout access log writes there directly.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.logger import LogEvent, LogLevel, eventFromJSON, globalLogPublisher

MAX_LINE = 1024 * 1024
"""A line longer than this (a runaway without newlines) is logged in pieces."""


class WorkerLog:
    """Turns what worker C{index} writes on its standard error into the parent's events."""

    def __init__(
        self, index: int, publish: Callable[[LogEvent], None] = globalLogPublisher
    ) -> None:
        self.index = index
        self.publish = publish
        self._partial = b""

    def received(self, data: bytes) -> None:
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        if len(self._partial) > MAX_LINE:
            lines.append(self._partial)
            self._partial = b""
        for line in lines:
            self._line(line)

    def ended(self) -> None:
        if self._partial:
            self._line(self._partial)
            self._partial = b""

    def _line(self, raw: bytes) -> None:
        text = raw.decode("utf-8", "replace").strip("\x1e\r ")
        if not text:
            return
        try:
            event = eventFromJSON(text)
        except ValueError:
            event = None
        if not isinstance(event, dict) or "log_time" not in event:
            event = {
                "log_format": "{line}",
                "line": text,
                "log_level": LogLevel.error,
                "log_namespace": "stderr",
            }
        level = event.get("log_level")
        where = f"{event.get('log_namespace', '?')}#{getattr(level, 'name', level)}"
        event["log_system"] = f"worker {self.index} {where}"
        self.publish(event)
