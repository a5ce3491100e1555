"""
Metric families for the reactor's hot path, and a summary with real quantiles: what
prometheus_client lacks for a router that changes a dozen series per request.
"""

from __future__ import annotations

import bisect
import itertools
import math
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
    SummaryMetricFamily,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString


class FastFamily(Collector):
    """
    A counter, gauge or untyped family for the reactor's hot path: a dict of label values
    to a number, no lock and no child objects (prometheus_client's take a lock and check
    observability on every change, a few microseconds a request once a dozen are made).

    Only the reactor thread changes values; the exposition (in a worker thread) copies the
    dict in one step, which the GIL makes atomic. The untyped kind keeps a name exactly as
    given: prometheus_client appends C{_total} to every Counter, and the specification
    names C{kthena_pd_group_routing_decisions} without it.
    """

    def __init__(self, kind: str, name: str, documentation: str, labelnames: Sequence[str]):
        assert kind in ("counter", "gauge", "unknown")
        self.kind = kind
        self.name = name
        self.documentation = documentation
        self._labelnames = tuple(labelnames)
        self._values: dict[tuple[str, ...], float] = {}

    def add(self, labelvalues: tuple[str, ...], amount: float = 1.0) -> None:
        values = self._values
        values[labelvalues] = values.get(labelvalues, 0.0) + amount

    def set(self, labelvalues: tuple[str, ...], value: float) -> None:
        self._values[labelvalues] = value

    def value(self, labelvalues: tuple[str, ...]) -> float:
        return self._values.get(labelvalues, 0.0)

    def labels(self, *labelvalues: str, **labelkwargs: str) -> _Bound:
        """prometheus_client's child API, for code outside the hot path."""
        return _Bound(self, _label_tuple(self.name, self._labelnames, labelvalues, labelkwargs))

    def remove(self, *labelvalues: str) -> None:
        self._values.pop(labelvalues, None)

    def prune(self, gone: Callable[[dict[str, str]], bool], keep_nonzero: bool = False) -> None:
        """Remove every series whose labels C{gone} accepts (but not those still counting)."""
        for labelvalues, value in list(self._values.items()):
            labels = dict(zip(self._labelnames, labelvalues, strict=True))
            if gone(labels) and not (keep_nonzero and value):
                del self._values[labelvalues]

    def _empty(self) -> Metric:
        if self.kind == "counter":
            return CounterMetricFamily(self.name, self.documentation, labels=self._labelnames)
        if self.kind == "gauge":
            return GaugeMetricFamily(self.name, self.documentation, labels=self._labelnames)
        return Metric(self.name, self.documentation, "unknown")

    def describe(self) -> Iterator[Metric]:
        """The family without samples (lets the registry select it by name)."""
        yield self._empty()

    def collect(self) -> Iterator[Metric]:
        yield self.collect_part(self.series())

    def series(self) -> list[tuple[str, ...]]:
        """Every series' label values, in order (a scrape collects them in parts)."""
        return list(self._values)

    def collect_part(self, series: Iterable[tuple[str, ...]]) -> Metric:
        """The family with only these series (those removed since are left out)."""
        family = self._empty()
        values = self._values
        for labelvalues in series:
            value = values.get(labelvalues)
            if value is None:
                continue
            if self.kind == "unknown":
                labels = dict(zip(self._labelnames, labelvalues, strict=True))
                family.add_sample(self.name, labels, value)
            else:
                family.add_metric(list(labelvalues), value)  # type: ignore[attr-defined]
        return family


@dataclass(frozen=True, slots=True)
class _Bound:
    family: FastFamily
    values: tuple[str, ...]

    def inc(self, amount: float = 1.0) -> None:
        self.family.add(self.values, amount)

    def dec(self, amount: float = 1.0) -> None:
        self.family.add(self.values, -amount)

    def set(self, value: float) -> None:
        self.family.set(self.values, value)


def _label_tuple(
    name: str, names: tuple[str, ...], values: tuple[str, ...], kwargs: dict[str, str]
) -> tuple[str, ...]:
    if kwargs:
        if values or set(kwargs) != set(names):
            raise ValueError(f"{name} takes labels {names}")
        return tuple(kwargs[n] for n in names)
    if len(values) != len(names):
        raise ValueError(f"{name} takes labels {names}")
    return values


class FastHistogram(Collector):
    """
    A histogram for the reactor's hot path (several observations per request): no lock
    and no child objects, just a bucket index and two list increments per observation.

    Only the reactor thread observes; the exposition (in a worker thread) copies each
    series' list in one step, which the GIL makes atomic, and derives C{_count} from the
    buckets, so a scrape never shows a count its buckets do not add up to.
    """

    def __init__(
        self, name: str, documentation: str, labelnames: Sequence[str], buckets: Sequence[float]
    ) -> None:
        self.name = name
        self.documentation = documentation
        self._labelnames = tuple(labelnames)
        self._bounds = tuple(sorted(float(b) for b in buckets))
        self._series: dict[tuple[str, ...], list[float]] = {}

    def observe(self, labelvalues: tuple[str, ...], value: float) -> None:
        series = self._series.get(labelvalues)
        if series is None:
            # One slot per bound, one for +Inf, and the sum last.
            series = self._series[labelvalues] = [0.0] * (len(self._bounds) + 2)
        series[bisect.bisect_left(self._bounds, value)] += 1
        series[-1] += value

    def labels(self, *labelvalues: str, **labelkwargs: str) -> _BoundHistogram:
        """prometheus_client's child API, for code outside the hot path."""
        return _BoundHistogram(
            self, _label_tuple(self.name, self._labelnames, labelvalues, labelkwargs)
        )

    def remove(self, *labelvalues: str) -> None:
        self._series.pop(labelvalues, None)

    def prune(self, gone: Callable[[dict[str, str]], bool]) -> None:
        """Remove every series whose labels C{gone} accepts."""
        for labelvalues in list(self._series):
            if gone(dict(zip(self._labelnames, labelvalues, strict=True))):
                del self._series[labelvalues]

    def describe(self) -> Iterator[Metric]:
        """The family without samples (lets the registry select it by name)."""
        yield HistogramMetricFamily(self.name, self.documentation, labels=self._labelnames)

    def collect(self) -> Iterator[Metric]:
        yield self.collect_part(self.series())

    def series(self) -> list[tuple[str, ...]]:
        """Every series' label values, in order (a scrape collects them in parts)."""
        return list(self._series)

    def collect_part(self, series: Iterable[tuple[str, ...]]) -> Metric:
        """The family with only these series (those removed since are left out)."""
        family = HistogramMetricFamily(self.name, self.documentation, labels=self._labelnames)
        bounds = [*(floatToGoString(b) for b in self._bounds), "+Inf"]
        held = self._series
        for values in series:
            counts = held.get(values)
            if counts is None:
                continue
            snapshot = list(counts)
            cumulative = list(itertools.accumulate(snapshot[:-1]))
            family.add_metric(
                list(values), buckets=list(zip(bounds, cumulative, strict=True)),
                sum_value=snapshot[-1],
            )  # fmt: skip
        return family


@dataclass(frozen=True, slots=True)
class _BoundHistogram:
    histogram: FastHistogram
    values: tuple[str, ...]

    def observe(self, value: float) -> None:
        self.histogram.observe(self.values, value)


class WindowSummary(Collector):
    """
    A summary with real quantiles over a sliding window (prometheus_client's Summary
    has none): the last C{window} seconds, at most C{max_samples} observations per series.
    """

    QUANTILES = (0.5, 0.9, 0.99)

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        clock: Any,
        window: float = 60.0,
        max_samples: int = 2048,
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self.clock = clock
        self.window = window
        self.max_samples = max_samples
        self._series: dict[tuple[str, ...], tuple[deque[tuple[float, float]], list[float]]] = {}
        self._lock = threading.Lock()

    def observe(self, value: float, *labelvalues: str) -> None:
        now = self.clock.seconds()
        with self._lock:
            series = self._series.get(labelvalues)
            if series is None:
                series = self._series[labelvalues] = (deque(maxlen=self.max_samples), [0.0, 0.0])
            samples, totals = series
            samples.append((now, value))
            totals[0] += value
            totals[1] += 1

    def describe(self) -> Iterator[Metric]:
        """The family without samples (lets the registry select it by name)."""
        yield SummaryMetricFamily(self.name, self.documentation, labels=self.labelnames)

    def collect(self) -> Iterator[Metric]:
        family = SummaryMetricFamily(self.name, self.documentation, labels=self.labelnames)
        horizon = self.clock.seconds() - self.window
        with self._lock:
            snapshot = [(k, list(s), t[0], t[1]) for k, (s, t) in self._series.items()]
        for values, samples, total, count in snapshot:
            recent = sorted(v for at, v in samples if at >= horizon)
            family.add_metric(list(values), count_value=int(count), sum_value=total)
            for q in self.QUANTILES:
                family.add_sample(
                    self.name,
                    {**dict(zip(self.labelnames, values, strict=True)), "quantile": str(q)},
                    _quantile(recent, q),
                )
        yield family


def _quantile(ordered: list[float], q: float) -> float:
    if not ordered:
        return math.nan
    rank = max(0, math.ceil(q * len(ordered)) - 1)
    return ordered[min(rank, len(ordered) - 1)]
