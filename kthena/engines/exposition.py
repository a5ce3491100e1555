"""
A lean reader of the Prometheus text exposition, for scraping many pods every second.

prometheus_client's parser builds a full object model of every family; a router needs a
dozen series out of hundreds, so this reader looks only at lines whose metric name it was
asked for, and sums or keeps them by label set. It accepts the text format 0.0.4 and the
OpenMetrics text format (comments, C{_created} lines and exemplars are skipped).
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Iterator
from dataclasses import dataclass

_ESCAPES = {"\\\\": "\\", '\\"': '"', "\\n": "\n"}


@dataclass(frozen=True, slots=True)
class Sample:
    name: str
    labels: dict[str, str]
    value: float


_PAIR = re.compile(r'[ ,]*(?:(\})|([^=]*)="([^"\\]*(?:\\.[^"\\]*)*)")', re.DOTALL)
"""Either the closing brace, or one C{name="value"} (escapes kept), after separators."""
_ESCAPE = re.compile(r"\\(.)", re.DOTALL)


def _unescape(value: str) -> str:
    return _ESCAPE.sub(lambda m: _ESCAPES.get(m[0], m[1]), value)


def _labels(text: str, start: int) -> tuple[dict[str, str], int]:
    """
    Parse C{a="x",b="y"}} from C{start} (just after the opening brace); values may hold
    escaped quotes, commas and braces. One regular-expression match a label (in C: a
    scrape of a 17 kB page has ~150 labels to read).

    @return: the labels and the index just after the closing brace.
    """
    labels: dict[str, str] = {}
    match = _PAIR.match
    i = start
    while True:
        m = match(text, i)
        if m is None:
            raise ValueError(f"malformed labels: {text!r}")
        if m[1] is not None:
            return labels, m.end()
        value = m[3]
        labels[m[2].strip()] = _unescape(value) if "\\" in value else value
        i = m.end()


def _value(text: str) -> float:
    token = text.split(None, 1)[0] if text else ""
    if token in ("+Inf", "Inf"):
        return math.inf
    if token == "-Inf":
        return -math.inf
    return float(token)


def samples(text: str, names: Collection[str]) -> Iterator[Sample]:
    """
    The samples of C{text} whose metric name is in C{names}.

    @raise ValueError: on a malformed line among the wanted ones.
    """
    prefixes = tuple(names)
    for line in text.splitlines():
        # Most lines are other metrics (histogram buckets, comments): one C call each.
        if not line.startswith(prefixes):
            continue
        brace = line.find("{")
        space = line.find(" ")
        if brace != -1 and (space == -1 or brace < space):
            name = line[:brace]
            if name not in names:
                continue
            labels, end = _labels(line, brace + 1)
            rest = line[end:].strip()
        else:
            name = line[:space] if space != -1 else line
            if name not in names:
                continue
            labels = {}
            rest = line[space + 1 :].strip() if space != -1 else ""
        yield Sample(name, labels, _value(rest.split(" # ", 1)[0]))


def totals(text: str, names: Collection[str]) -> dict[str, float]:
    """The sum of each wanted metric over all its label sets."""
    result: dict[str, float] = {}
    for sample in samples(text, names):
        result[sample.name] = result.get(sample.name, 0.0) + sample.value
    return result
