"""
A scrape's render as a sequence of short steps, run on the reactor thread a slice at a
time, so that proxied requests are served between slices.

Why not a worker thread: the render is pure Python and holds the GIL, and the reactor
thread, each time it wakes for I/O, waits for a switch interval (5 ms) to get it back;
a request wakes it several times, so requests overlapping a scrape were tens of ms
slower. Why not in one go on the reactor thread: everything in flight waits for the
whole render.

A step does a bounded amount of work: it collects part of a family (L{PART_SAMPLES}
samples or so) and writes it (L{FamilyWriter}), gzipping as it goes; the admin listener
takes steps for half a millisecond, then lets the reactor poll before the next slice
(L{kthena.observability.admin.sliced}). Collecting is a third of the cost, and a big
histogram's C{collect()} (300 series, ~5,000 samples: ~17 ms) cannot be cut: so the
families of L{kthena.observability.families} are collected in parts
(C{collect_part}: the same output, in order). Other collectors are collected
whole, a collector a step; their big families are written a part at a time.

The body is assembled, then sent: a render that fails is still a 500, and the
C{content-length} is known. The collectors run on the reactor thread.
"""

from __future__ import annotations

import itertools
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from time import thread_time
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder, gzip_accepted
from prometheus_client.metrics_core import Metric
from prometheus_client.openmetrics import exposition as om

from kthena.observability.families import FastFamily, FastHistogram
from kthena.observability.textformat import Encoder, FamilyWriter, plain

PART_SAMPLES = 32
"""About how many samples a step collects and writes (~0.3 ms on a slow VM)."""

GZIP_LEVEL = 6
GZIP_WBITS = 16 + zlib.MAX_WBITS
"""zlib's gzip container."""


@dataclass(frozen=True, slots=True)
class Format:
    """What the scraper's C{Accept} chose, as prometheus_client's handlers choose it."""

    content_type: str
    encoder: Encoder
    openmetrics: bool
    escaping: str

    @classmethod
    def negotiate(cls, accept: str) -> Format:
        encoder, content_type = choose_encoder(accept)
        keywords: dict[str, Any] = getattr(encoder, "keywords", {})
        openmetrics = getattr(encoder, "func", encoder) is om.generate_latest
        return cls(content_type, encoder, openmetrics, keywords.get("escaping", om.UNDERSCORES))


class Render:
    """
    One scrape's body, built by L{steps}; L{body} when they are done.

    @ivar cpu_seconds: the CPU the steps took (for pacing the next render).
    """

    def __init__(
        self,
        registry: CollectorRegistry,
        accept: str,
        accept_encoding: str,
        names: Sequence[str] = (),
        cancelled: Callable[[], bool] = lambda: False,
    ) -> None:
        """
        @param names: the families to render (C{name[]=}); all when empty.
        @param cancelled: true once nobody wants the body: the steps stop.
        """
        self.registry = registry
        self.format = Format.negotiate(accept)
        self.gzipped = gzip_accepted(accept_encoding)
        self.names = names
        self.cancelled = cancelled
        self.cpu_seconds = 0.0
        self.body = b""
        self._chunks: list[bytes] = []
        self._zip = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, GZIP_WBITS)

    def steps(self) -> Iterator[None]:
        """The render, a bounded piece of work a step; none once L{cancelled}."""
        pieces = self._text()
        while not self.cancelled():
            started = thread_time()
            piece = next(pieces, None)
            if piece is None:
                self._finish()
            else:
                self._add(piece)
            self.cpu_seconds += thread_time() - started
            if piece is None:
                return
            yield None

    def _add(self, piece: str) -> None:
        data = piece.encode("utf-8")
        self._chunks.append(self._zip.compress(data) if self.gzipped else data)

    def _finish(self) -> None:
        if self.gzipped:
            self._chunks.append(self._zip.flush())
        self.body = b"".join(self._chunks)
        self._chunks = []

    def _text(self) -> Iterator[str]:
        f = self.format
        writer = FamilyWriter(f.encoder, f.openmetrics, f.escaping)
        for parts in self._families():
            yield from _write_family(writer, parts)
        yield writer.finish()

    def _families(self) -> Iterator[Iterator[Metric]]:
        """Each family as an iterator of its parts (collected as they are taken)."""
        if self.names:  # family selection: rare (not Prometheus'), collected whole
            for metric in self.registry.restricted_registry(self.names).collect():
                yield iter((metric,))
            return
        registry = self.registry
        with registry._lock:  # what CollectorRegistry.collect() does, a collector at a time
            collectors = list(registry._collector_to_names)
            target = registry._target_info_metric() if registry._target_info else None
        if target is not None:
            yield iter((target,))
        for collector in collectors:
            if isinstance(collector, FastFamily | FastHistogram):
                yield _parts(collector)
            else:
                for metric in collector.collect():
                    yield iter((metric,))


def _write_family(writer: FamilyWriter, parts: Iterator[Metric]) -> Iterator[str]:
    """One family's text, a piece of at most about L{PART_SAMPLES} samples at a time."""
    first = next(parts)
    if not plain(first.samples):  # never a family collected in parts (they are plain)
        yield writer.whole(first)
        return
    yield writer.start(first)
    for part in itertools.chain((first,), parts):
        samples = part.samples
        for start in range(0, len(samples), PART_SAMPLES):
            yield writer.samples(part, samples[start : start + PART_SAMPLES])
    yield writer.end(first)


def _parts(collector: FastFamily | FastHistogram) -> Iterator[Metric]:
    """
    C{collector}'s family in parts: one series first, then as many series as make about
    L{PART_SAMPLES} samples. The family has the series it held at the start (one added
    since waits for the next scrape, one removed is left out), each read when its part
    is collected.
    """
    series = collector.series()
    first = collector.collect_part(series[:1])
    yield first
    size = max(1, PART_SAMPLES // max(1, len(first.samples)))
    for start in range(1, len(series), size):
        yield collector.collect_part(series[start : start + size])
