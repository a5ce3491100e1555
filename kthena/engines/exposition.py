"""
A lean reader of the Prometheus text exposition, for scraping many pods every second.

prometheus_client's parser builds a full object model of every family; a router needs a
dozen series out of hundreds, so this reader looks only at lines whose metric name it was
asked for, and sums or keeps them by label set. It accepts the text format 0.0.4 and the
OpenMetrics text format (comments, C{_created} lines and exemplars are skipped).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterator
from dataclasses import dataclass

_ESCAPES = {"\\\\": "\\", '\\"': '"', "\\n": "\n"}


@dataclass(frozen=True, slots=True)
class Sample:
    name: str
    labels: dict[str, str]
    value: float


def _labels(text: str, start: int) -> tuple[dict[str, str], int]:
    """
    Parse C{a="x",b="y"}} from C{start} (just after the opening brace); values may hold
    escaped quotes, commas and braces.

    @return: the labels and the index just after the closing brace.
    """
    labels: dict[str, str] = {}
    i, n = start, len(text)
    while i < n:
        while i < n and text[i] in " ,":
            i += 1
        if i < n and text[i] == "}":
            return labels, i + 1
        eq = text.find("=", i)
        if eq < 0 or eq + 1 >= n or text[eq + 1] != '"':
            raise ValueError(f"malformed labels: {text!r}")
        name = text[i:eq].strip()
        j = eq + 2
        chars: list[str] = []
        while j < n and text[j] != '"':
            if text[j] == "\\" and j + 1 < n:
                pair = text[j : j + 2]
                chars.append(_ESCAPES.get(pair, pair[1]))
                j += 2
            else:
                chars.append(text[j])
                j += 1
        if j >= n:
            raise ValueError(f"unterminated label value: {text!r}")
        labels[name] = "".join(chars)
        i = j + 1
    raise ValueError(f"unclosed labels: {text!r}")


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
    for line in text.splitlines():
        if not line or line[0] == "#":
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
