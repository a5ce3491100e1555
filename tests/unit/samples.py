"""Reading a Prometheus registry in tests."""

from __future__ import annotations

from prometheus_client import CollectorRegistry


def sample_sum(registry: CollectorRegistry, name: str) -> float:
    """The samples named C{name}, summed over their label sets."""
    total = 0.0
    for family in registry.collect():
        for sample in family.samples:
            if sample.name == name:
                total += sample.value
    return total
