"""
The Prometheus text (0.0.4 and 1.0.0) and OpenMetrics exposition formats, written a few
dozen samples at a time and byte for byte as prometheus_client's C{generate_latest}
functions write them.

Why not theirs: they take about 20 us a line on a slow VM (a scrape of the router's
~7,000 series is ~150 ms of CPU) and write a whole registry in one call, so that the
render could neither be cut into slices nor kept short. This writer caches each name's
escaped form (a scrape has a few dozen names and thousands of samples) and is about five
times faster. It formats samples without exemplars or native histograms; a family that
has either is written by prometheus_client's own encoder, whole. Name escaping, label
escaping, value formatting (C{floatToGoString}) and the text format's moving of
C{_created} / C{_gsum} / C{_gcount} samples into gauges after their family are
prometheus_client's rules; tests/unit/test_textformat.py holds this writer to its output.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

from prometheus_client.metrics_core import Metric
from prometheus_client.openmetrics import exposition as om
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString
from prometheus_client.validation import _is_valid_legacy_metric_name

Encoder = Callable[..., bytes]
"""prometheus_client's renderer of a whole registry, as C{choose_encoder} picks it."""

TEXT_TYPES = {
    "info": "gauge",
    "stateset": "gauge",
    "gaugehistogram": "histogram",
    "unknown": "untyped",
}
"""The text format's name for an OpenMetrics type (the others keep theirs)."""
TEXT_NAME_SUFFIXES = {"counter": "_total", "info": "_info"}
"""What the text format appends to a family's name on its HELP and TYPE lines."""
HELD_BACK = ("_created", "_gsum", "_gcount")
"""Sample suffixes the text format moves into a gauge of their own after the family."""
EOF = "# EOF\n"


def plain(samples: Iterable[Sample]) -> bool:
    """No exemplars, native histograms or missing values: what L{FamilyWriter} writes."""
    return not any(s.exemplar or s.native_histogram or s.value is None for s in samples)


def _label_value(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


class _Escaped(dict[str, str]):
    """Strings as written, each escaped on first use (a scrape repeats them thousands of
    times: model names, paths, bucket bounds)."""

    def __init__(self, escape: Callable[[str], str]) -> None:
        super().__init__()
        self.escape = escape

    def __missing__(self, raw: str) -> str:
        escaped = self[raw] = self.escape(raw)
        return escaped


class _Single:
    """A registry of one family, for prometheus_client's encoders."""

    def __init__(self, metric: Metric) -> None:
        self.metric = metric

    def collect(self) -> list[Metric]:
        return [self.metric]


class FamilyWriter:
    """
    Writes one scrape's families: L{start} a family, L{samples} as many times as it has
    slices, L{end}; L{whole} for a family that is not L{plain}; L{finish} last.

    @ivar openmetrics: OpenMetrics, or the Prometheus text format.
    @ivar escaping: the scheme for names (C{underscores}, C{allow-utf-8}, ...).
    """

    def __init__(self, encoder: Encoder, openmetrics: bool, escaping: str) -> None:
        """@param encoder: prometheus_client's for this format (for L{whole} families)."""
        self.encoder = encoder
        self.openmetrics = openmetrics
        self.escaping = escaping
        self._label_names = _Escaped(lambda name: om.escape_label_name(name, escaping))
        self._label_values = _Escaped(_label_value)
        self._heads: dict[str, tuple[str, bool]] = {}
        self._held: dict[str, list[str]] = {}

    def start(self, metric: Metric) -> str:
        """The family's HELP and TYPE (and OpenMetrics' UNIT) lines."""
        self._held = {}
        doc = metric.documentation
        if self.openmetrics:
            name = om.escape_metric_name(metric.name, self.escaping)
            head = f"# HELP {name} {_label_value(doc)}\n# TYPE {name} {metric.type}\n"
            return head + (f"# UNIT {name} {metric.unit}\n" if metric.unit else "")
        name = metric.name + TEXT_NAME_SUFFIXES.get(metric.type, "")
        return self._text_header(name, doc, TEXT_TYPES.get(metric.type, metric.type))

    def _text_header(self, name: str, doc: str, kind: str) -> str:
        name = om.escape_metric_name(name, self.escaping)
        doc = doc.replace("\\", r"\\").replace("\n", r"\n")
        return f"# HELP {name} {doc}\n# TYPE {name} {kind}\n"

    def samples(self, metric: Metric, samples: Sequence[Sample]) -> str:
        """Lines of some of C{metric}'s samples (L{plain} ones), in their order."""
        lines = []
        for s in samples:
            line = self._line(s)
            suffix = self._held_suffix(metric.name, s.name)
            if suffix is None:
                lines.append(line)
            else:
                self._held.setdefault(suffix, []).append(line)
        return "".join(lines)

    def _held_suffix(self, family: str, sample: str) -> str | None:
        if self.openmetrics or not sample.startswith(family):
            return None
        suffix = sample[len(family) :]
        return suffix if suffix in HELD_BACK else None

    def end(self, metric: Metric) -> str:
        """The text format's gauges of held-back samples (nothing in OpenMetrics)."""
        out = []
        for suffix, lines in sorted(self._held.items()):
            out.append(self._text_header(metric.name + suffix, metric.documentation, "gauge"))
            out.extend(lines)
        self._held = {}
        return "".join(out)

    def whole(self, metric: Metric) -> str:
        """A family that is not L{plain}, as prometheus_client writes it."""
        text = self.encoder(_Single(metric)).decode("utf-8")
        return text.removesuffix(EOF) if self.openmetrics else text

    def finish(self) -> str:
        return EOF if self.openmetrics else ""

    def _line(self, s: Sample) -> str:
        head = self._heads.get(s.name)
        if head is None:
            head = self._heads[s.name] = self._head(s.name)
        name, braced = head
        labels = s.labels
        if labels:
            names = self._label_names
            values = self._label_values
            inner = ",".join([f'{names[k]}="{values[v]}"' for k, v in sorted(labels.items())])
            name = f"{{{name},{inner}}}" if braced else f"{name}{{{inner}}}"
        elif braced:
            name = f"{{{name}}}"
        ts = s.timestamp
        if ts is None:
            return f"{name} {floatToGoString(s.value)}\n"
        stamp = f"{ts}" if self.openmetrics else f"{int(float(ts) * 1000):d}"
        return f"{name} {floatToGoString(s.value)} {stamp}\n"

    def _head(self, name: str) -> tuple[str, bool]:
        """A sample name as written, and whether it goes inside the braces (UTF-8 names)."""
        braced = self.escaping == om.ALLOWUTF8 and not _is_valid_legacy_metric_name(name)
        if self.openmetrics and not braced:
            return om._escape(name, self.escaping, om._is_legacy_labelname_rune), False
        return om.escape_metric_name(name, self.escaping), braced
