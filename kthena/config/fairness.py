"""
The C{fairness} section of the router config: which models have a fair queue in front of
the scheduler, how fast each lets requests go on, and how users' recent usage is weighed.

    fairness:
      window: 5m            # sliding window of usage history
      inputWeight: 1
      outputWeight: 2
      topUsers: 10          # user_id label: the top N users by recent usage, the rest "other"
      models:
        - model: qwen2.5-0.5b
          maxConcurrency: 8   # admitted and not yet released; and/or
          qps: 20             # admissions per second (a bucket of one second)
          timeout: 60s        # queued longer -> 504
          maxLength: 1000     # queue bound (sheddable work is refused first)

A model not listed (or no section at all) has no queue: its requests go on at once. The
priority classes, highest first, are the C{identity} section's (one closed set for the
whole router: what callers are identified as is what the queues order by).
"""

from __future__ import annotations

from dataclasses import dataclass

from kthena.config.identity import DEFAULT_PRIORITIES, DEFAULT_PRIORITY, SHEDDABLE
from kthena.config.validate import (
    Where,
    integer,
    mapping,
    number,
    positive_duration,
    sequence,
    string,
)

__all__ = ["DEFAULT_PRIORITIES", "SHEDDABLE", "FairnessConfig", "ModelFairness"]


@dataclass(frozen=True, slots=True)
class ModelFairness:
    """
    One model's queue (the model name as the request is routed).

    @ivar max_concurrency: at most this many admitted and not yet released (C{None}: no bound).
    @ivar qps: at most this many admissions a second, from a bucket of C{max(qps, 1)}
        admissions refilled continuously (C{None}: no bound).
    @ivar timeout: a request queued longer fails with 504.
    @ivar max_length: at most this many requests queued (0: nothing waits).
    """

    model: str
    max_concurrency: int | None = None
    qps: float | None = None
    timeout: float = 60.0
    max_length: int = 1000


@dataclass(frozen=True, slots=True)
class FairnessConfig:
    """
    @ivar window: seconds of usage history a user's priority is computed from.
    @ivar priorities: the priority classes, highest precedence first; C{sheddable}, when
        listed, is the last (the C{identity} section's).
    @ivar default_priority: the class of a request whose priority is not given or not
        listed (the C{identity} section's C{defaultPriority}).
    @ivar top_users: how many users (by recent usage, per model) are named in metric
        labels and the debug view; the others are C{"other"}.
    """

    window: float = 300.0
    input_weight: float = 1.0
    output_weight: float = 2.0
    top_users: int = 10
    priorities: tuple[str, ...] = DEFAULT_PRIORITIES
    default_priority: str = DEFAULT_PRIORITY
    models: tuple[ModelFairness, ...] = ()


def _model(value: object, where: Where) -> ModelFairness:
    spec = mapping(
        value, where, ("model", "maxConcurrency", "qps", "timeout", "maxLength"), ("model",)
    )
    d = ModelFairness("")
    max_concurrency = spec.get("maxConcurrency")
    qps = spec.get("qps")
    if max_concurrency is None and qps is None:
        where.fail("needs maxConcurrency, qps or both (what lets queued requests go on)")
    parsed_qps = None
    if qps is not None:
        parsed_qps = number(qps, where.at("qps"))
        if parsed_qps <= 0:
            where.at("qps").fail(f"must be more than 0, not {qps}")
    return ModelFairness(
        model=string(spec["model"], where.at("model")),
        max_concurrency=None
        if max_concurrency is None
        else integer(max_concurrency, where.at("maxConcurrency"), minimum=1),
        qps=parsed_qps,
        timeout=positive_duration(spec.get("timeout", d.timeout), where.at("timeout")),
        max_length=integer(spec.get("maxLength", d.max_length), where.at("maxLength"), minimum=0),
    )


def parse_fairness(
    value: object,
    where: Where,
    priorities: tuple[str, ...] = DEFAULT_PRIORITIES,
    default_priority: str = DEFAULT_PRIORITY,
) -> FairnessConfig:
    """
    The C{fairness} section; absent (C{None}) is no fairness: no model has a queue.

    @param priorities: the priority classes (the C{identity} section's), highest first.
    """
    spec = mapping(
        value,
        where,
        ("window", "inputWeight", "outputWeight", "topUsers", "models"),
    )
    d = FairnessConfig()
    models: list[ModelFairness] = []
    seen: dict[str, int] = {}
    m_where = where.at("models")
    for i, raw in enumerate(sequence(spec.get("models"), m_where)):
        model = _model(raw, m_where.at(i))
        if model.model in seen:
            m_where.at(i).at("model").fail(
                f"{model.model!r} is already configured at models[{seen[model.model]}]"
            )
        seen[model.model] = i
        models.append(model)
    return FairnessConfig(
        window=positive_duration(spec.get("window", d.window), where.at("window")),
        input_weight=number(
            spec.get("inputWeight", d.input_weight), where.at("inputWeight"), minimum=0
        ),
        output_weight=number(
            spec.get("outputWeight", d.output_weight), where.at("outputWeight"), minimum=0
        ),
        top_users=integer(spec.get("topUsers", d.top_users), where.at("topUsers"), minimum=0),
        priorities=priorities,
        default_priority=default_priority,
        models=tuple(models),
    )
