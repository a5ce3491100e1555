"""The C{fairness} config section: defaults, the full shape, and errors that name the field."""

from __future__ import annotations

from typing import Any

import pytest

from kthena.config.fairness import (
    DEFAULT_PRIORITIES,
    FairnessConfig,
    ModelFairness,
    parse_fairness,
)
from kthena.config.validate import ConfigError, Where

WHERE = Where("router.yaml").at("fairness")


def parse(value: Any) -> FairnessConfig:
    return parse_fairness(value, WHERE)


def test_absent_is_no_fairness() -> None:
    empty: tuple[object, ...] = (None, {})
    for value in empty:
        config = parse(value)
        assert config == FairnessConfig()
        assert config.models == ()
    d = FairnessConfig()
    assert (d.window, d.input_weight, d.output_weight, d.top_users) == (300.0, 1.0, 2.0, 10)
    assert d.priorities == DEFAULT_PRIORITIES == ("critical", "standard", "sheddable")


def test_the_full_shape() -> None:
    config = parse(
        {
            "window": "10m",
            "inputWeight": 1,
            "outputWeight": 3.5,
            "topUsers": 5,
            "models": [
                {
                    "model": "qwen2.5-0.5b",
                    "maxConcurrency": 8,
                    "qps": 20,
                    "timeout": "30s",
                    "maxLength": 100,
                },
                {"model": "other", "qps": 0.5},
            ],
        }
    )
    assert config.window == 600.0
    assert (config.input_weight, config.output_weight, config.top_users) == (1.0, 3.5, 5)
    assert config.priorities == DEFAULT_PRIORITIES
    assert config.models == (
        ModelFairness("qwen2.5-0.5b", max_concurrency=8, qps=20.0, timeout=30.0, max_length=100),
        ModelFairness("other", qps=0.5, timeout=60.0, max_length=1000),
    )


def test_the_classes_are_the_identity_sections() -> None:
    """One closed set of classes for the router: fairness takes identity's, not its own."""
    config = parse_fairness({}, WHERE, ("gold", "silver", "sheddable"), "silver")
    assert (config.priorities, config.default_priority) == (
        ("gold", "silver", "sheddable"),
        "silver",
    )
    assert FairnessConfig().default_priority == "standard"
    with pytest.raises(ConfigError, match=r"fairness\.priorities: unknown field"):
        parse({"priorities": ["a"]})


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("x", "router.yaml: fairness: must be a mapping, not a string"),
        ({"windw": "5m"}, "router.yaml: fairness.windw: unknown field; known fields: "),
        ({"window": "0s"}, "router.yaml: fairness.window: must be more than 0s"),
        ({"window": "5 minutes"}, "router.yaml: fairness.window: is not a duration"),
        ({"inputWeight": -1}, "router.yaml: fairness.inputWeight: must be at least 0"),
        ({"outputWeight": "2"}, "router.yaml: fairness.outputWeight: must be a number"),
        ({"topUsers": -1}, "router.yaml: fairness.topUsers: must be at least 0"),
        ({"topUsers": 2.5}, "router.yaml: fairness.topUsers: must be a whole number"),
        ({"models": {"model": "m"}}, "router.yaml: fairness.models: must be a list"),
        ({"models": ["m"]}, "router.yaml: fairness.models[0]: must be a mapping"),
        ({"models": [{"qps": 1}]}, "router.yaml: fairness.models[0].model: is required"),
        (
            {"models": [{"model": "m"}]},
            "router.yaml: fairness.models[0]: needs maxConcurrency, qps or both",
        ),
        (
            {"models": [{"model": "m", "qps": 1, "maxConcurency": 2}]},
            "router.yaml: fairness.models[0].maxConcurency: unknown field",
        ),
        (
            {"models": [{"model": "m", "maxConcurrency": 0}]},
            "router.yaml: fairness.models[0].maxConcurrency: must be at least 1",
        ),
        (
            {"models": [{"model": "m", "qps": 0}]},
            "router.yaml: fairness.models[0].qps: must be more than 0",
        ),
        (
            {"models": [{"model": "m", "qps": True}]},
            "router.yaml: fairness.models[0].qps: must be a number",
        ),
        (
            {"models": [{"model": "m", "qps": 1, "timeout": "0s"}]},
            "router.yaml: fairness.models[0].timeout: must be more than 0s",
        ),
        (
            {"models": [{"model": "m", "qps": 1, "maxLength": -1}]},
            "router.yaml: fairness.models[0].maxLength: must be at least 0",
        ),
        (
            {"models": [{"model": "", "qps": 1}]},
            "router.yaml: fairness.models[0].model: must not be empty",
        ),
        (
            {"models": [{"model": "m", "qps": 1}, {"model": "m", "maxConcurrency": 1}]},
            "router.yaml: fairness.models[1].model: 'm' is already configured at models[0]",
        ),
    ],
)
def test_errors_name_the_field(value: Any, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse(value)
    assert str(e.value).startswith(message), str(e.value)


def test_zero_length_means_nothing_waits() -> None:
    config = parse({"models": [{"model": "m", "maxConcurrency": 1, "maxLength": 0}]})
    assert config.models[0].max_length == 0
