"""
The access log: one record per request, in the specification's JSON (the default) or
text shape, written when the response has ended (streams included), for every request
the router saw, proxied or refused.

The reactor thread only decides (sampling) and formats; the line goes into a bounded
buffer, and a writer thread of its own takes whatever is buffered and hands it to the
sink (L{IAccessLogSink}: stdout, stderr, a file). A slow or blocked sink never slows the
proxy: when the buffer is full the line is dropped and counted in
C{kthena_router_access_log_dropped_total}.

The records' shapes and timings: L{kthena.observability.records}.
"""

from __future__ import annotations

import os
import random
import select
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence

from prometheus_client import CollectorRegistry, Counter
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorFromThreads, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from kthena.config.observability import AccessLogConfig
from kthena.config.validate import ConfigError
from kthena.errors import ErrorType
from kthena.interfaces import IAccessLogSink
from kthena.observability.records import FORMATTERS
from kthena.pipeline.settle import Observer
from kthena.record import RequestRecord

log = Logger()

DROPPED_METRIC = "kthena_router_access_log_dropped_total"
STOP_TIMEOUT = 10.0
"""How long stopping waits for the writer to flush before giving up on what is left."""
LINGER = 0.05
"""
Once a line is waiting, how long the writer lets more gather before it writes (unless the
buffer is half full, or the log is stopping or reopening): the reactor and the writer
share one GIL, and waking the writer for every line would cost the proxy more than the
line itself.
"""


# -- sinks (writer thread)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _encoded(lines: Sequence[str]) -> bytes:
    return "".join(line + "\n" for line in lines).encode("utf-8")


def line_chunks(lines: Sequence[str], limit: int = select.PIPE_BUF) -> Iterator[bytes]:
    """
    C{lines}, encoded, in writes of at most C{limit} bytes cut between lines (a line longer
    than that is a write of its own): a pipe takes a write of at most C{PIPE_BUF} bytes
    whole, so that lines from processes sharing it (the workers of C{--workers}) never mix.
    """
    chunk: list[bytes] = []
    size = 0
    for line in lines:
        data = (line + "\n").encode("utf-8")
        if chunk and size + len(data) > limit:
            yield b"".join(chunk)
            chunk, size = [], 0
        chunk.append(data)
        size += len(data)
    if chunk:
        yield b"".join(chunk)


@implementer(IAccessLogSink)
class StreamSink:
    """
    Standard output or error, written to the file descriptor itself: under twistd,
    C{sys.stdout} is redirected into the Twisted log, which would wrap every line. Written
    a pipe's atomic write at a time (L{line_chunks}).
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def write(self, lines: Sequence[str]) -> None:
        for data in line_chunks(lines):
            _write_all(self.fd, data)

    def reopen(self) -> None:
        pass

    def close(self) -> None:
        pass


@implementer(IAccessLogSink)
class FileSink:
    """
    A file, appended to (created when missing). L{reopen} opens the path again, so that
    after logrotate renamed the file the next lines go to a new one; when opening fails
    the old file is kept.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd = self._open()

    def _open(self) -> int:
        return os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)

    def write(self, lines: Sequence[str]) -> None:
        if self._fd < 0:
            self._fd = self._open()
        _write_all(self._fd, _encoded(lines))  # O_APPEND: one write lands whole

    def reopen(self) -> None:
        fd = self._open()
        old, self._fd = self._fd, fd
        if old >= 0:
            os.close(old)

    def close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)


def sink_for(output: str, source: str = "<config>") -> IAccessLogSink:
    """
    The sink the C{output} config key names: C{stdout}, C{stderr} or a file path.

    @param source: the config file, for the error message.
    @raise ConfigError: when the file cannot be opened.
    """
    if output == "stdout":
        return StreamSink(1)
    if output == "stderr":
        return StreamSink(2)
    try:
        return FileSink(output)
    except OSError as e:
        raise ConfigError(
            f"{source}: observability.accessLog.output: cannot open {output!r}: {e.strerror}"
        ) from e


# -- the access log


class AccessLog(Service, Observer):
    """
    Formats each request's record on the reactor thread and writes it from a thread of
    its own. L{record} is the hook for L{kthena.proxy.core.RouterCore.request_hooks}.

    Lines recorded before the service starts wait in the buffer; stopping flushes what is
    buffered (waiting at most C{stop_timeout} seconds for a blocked sink) and closes the
    sink; lines recorded after that are not written.

    @ivar written: lines the sink accepted (updated by the writer thread).
    """

    def __init__(
        self,
        config: AccessLogConfig,
        sink: IAccessLogSink,
        registry: CollectorRegistry,
        reactor: IReactorTime,
        rng: random.Random | None = None,
        stop_timeout: float = STOP_TIMEOUT,
        linger: float = LINGER,
    ) -> None:
        """
        @param reactor: keeps time for the stop timeout; the writer thread reports
            through its L{IReactorFromThreads} (every real reactor provides it; with a
            test clock that does not, reports run on the writer thread).
        @param rng: decides which successful requests are sampled (seed it in tests).
        @param linger: see L{LINGER}.
        """
        self.config = config
        self.sink = sink
        self.reactor = reactor
        threads = IReactorFromThreads(reactor, None)
        self._call_from_thread: Callable[..., None] = (
            threads.callFromThread if threads is not None else _call_here
        )
        self.stop_timeout = stop_timeout
        self.linger = linger
        self._format = FORMATTERS[config.format]
        self._sample_rate = config.sample_rate
        self._random = (rng or random.Random()).random
        self._capacity = config.buffer_size
        self._half = max(1, config.buffer_size // 2)
        self._buffer: deque[str] = deque()
        self._cond = threading.Condition(threading.Lock())
        self._stopping = False
        self._reopen = False
        self._thread: threading.Thread | None = None
        self._flushed: Deferred[None] | None = None
        self.written = 0
        self._writing = 0
        dropped = Counter(
            DROPPED_METRIC,
            "Access-log lines lost: the buffer was full (the writer could not keep up) "
            "or the output failed",
            ("reason",),
            registry=registry,
        )
        self._dropped_full = dropped.labels("buffer_full")
        self._dropped_failed = dropped.labels("write_failed")

    # -- the reactor side

    def ended(self, record: RequestRecord) -> None:
        self.record(record)

    def record(self, ctx: RequestRecord) -> None:
        """Log one ended request (sampled when it succeeded); never waits for the sink."""
        if (
            self._sample_rate < 1.0
            and ctx.error_type is ErrorType.SUCCESS
            and ctx.status < 400
            and self._random() >= self._sample_rate
        ):
            return
        line = self._format(ctx)
        with self._cond:
            if self._stopping:
                return
            waiting = len(self._buffer)
            full = waiting >= self._capacity
            if not full:
                self._buffer.append(line)
                if waiting == 0 or waiting + 1 == self._half:
                    self._cond.notify()
        if full:
            self._dropped_full.inc()

    def reopen(self) -> None:
        """
        Have the writer reopen the output before it writes again (log rotation). Call it
        on the reactor thread, not from a signal handler: a handler interrupting
        L{record} would wait for the lock L{record} holds.
        """
        with self._cond:
            self._reopen = True
            self._cond.notify()

    @property
    def pending(self) -> int:
        """Lines waiting for the writer."""
        with self._cond:
            return len(self._buffer)

    def startService(self) -> None:
        super().startService()
        with self._cond:
            self._stopping = False
        self._flushed = Deferred()
        self._thread = threading.Thread(target=self._run, name="kthena-access-log", daemon=True)
        self._thread.start()

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        with self._cond:
            self._stopping = True
            self._cond.notify()
        flushed = self._flushed
        if flushed is None:  # never started
            self.sink.close()
            return None
        flushed.addTimeout(self.stop_timeout, self.reactor)
        flushed.addErrback(self._flush_timed_out)
        return flushed

    def _flush_timed_out(self, failure: Failure) -> None:
        log.warn(
            "access log: the output is still blocked after {timeout}s; "
            "{count} buffered lines are not written",
            timeout=self.stop_timeout,
            count=self.pending + self._writing,
        )

    # -- the writer thread

    def _run(self) -> None:
        failed = 0
        try:
            while True:
                with self._cond:
                    while not (self._buffer or self._reopen or self._stopping):
                        self._cond.wait()
                    if self.linger > 0 and not (self._reopen or self._stopping):
                        self._cond.wait(self.linger)  # stop, reopen, half full: sooner
                    batch, self._buffer = self._buffer, deque()
                    reopen, self._reopen = self._reopen, False
                    last = self._stopping
                if reopen:
                    try:
                        self.sink.reopen()
                    except Exception:
                        self._report(Failure(), "access log: reopening the output failed")
                if batch:
                    failed = self._write(batch, failed)
                if last:  # record() takes nothing once stopping: the buffer is empty
                    break
        finally:
            try:
                self.sink.close()
            except Exception:
                self._report(Failure(), "access log: closing the output failed")
            self._call_from_thread(self._writer_done)

    def _write(self, batch: deque[str], failed: int) -> int:
        """Write one batch; returns the lines lost in the current run of failures."""
        self._writing = len(batch)
        try:
            self.sink.write(batch)
        except Exception:
            self._dropped_failed.inc(len(batch))
            if not failed:
                self._report(Failure(), "access log: writing failed; lines are being lost")
            return failed + len(batch)
        finally:
            self._writing = 0
        self.written += len(batch)
        if failed:
            self._call_from_thread(
                log.info, "access log: writing works again; {count} lines were lost", count=failed
            )
        return 0

    def _report(self, failure: Failure, message: str) -> None:
        self._call_from_thread(log.failure, message, failure)

    def _writer_done(self) -> None:
        flushed = self._flushed
        if flushed is not None and not flushed.called:  # not given up on already
            flushed.callback(None)


def _call_here(f: Callable[..., object], *args: object, **kwargs: object) -> None:
    f(*args, **kwargs)


def access_log_for(
    config: AccessLogConfig,
    registry: CollectorRegistry,
    reactor: IReactorTime,
    source: str = "<config>",
) -> AccessLog | None:
    """
    The access log a router's config asks for, or C{None} when it is disabled.

    @raise ConfigError: when the output file cannot be opened.
    """
    if not config.enabled:
        return None
    return AccessLog(config, sink_for(config.output, source), registry, reactor)
