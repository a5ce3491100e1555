"""Reading a Prometheus registry in tests."""

from __future__ import annotations

from prometheus_client import CollectorRegistry


def sample_sum(registry: CollectorRegistry, name: str, **labels: str) -> float:
    """The samples named C{name} (with C{labels} among theirs), summed over their label sets."""
    total = 0.0
    for family in registry.collect():
        for sample in family.samples:
            if sample.name == name and labels.items() <= sample.labels.items():
                total += sample.value
    return total
