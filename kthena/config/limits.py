"""
Rate-limit settings: a ModelRoute's C{rateLimit} (Kthena's input and output tokens per
unit and C{global.redis}, our requests per unit and per-user limits) and the router's
C{rateLimits} section (how a Redis backend that cannot answer is treated).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kthena.config.resources import RATE_UNITS, Limits, RateLimit
from kthena.config.validate import (
    Where,
    boolean,
    choice,
    integer,
    mapping,
    positive_duration,
    sequence,
    string,
)


@dataclass(frozen=True, slots=True)
class RateLimitSettings:
    """
    @ivar fail_open: when Redis cannot answer, requests pass (a loud log once per outage
        and a count); when false they get 503.
    @ivar redis_timeout: the longest a check or a settle waits for Redis.
    """

    fail_open: bool = True
    redis_timeout: float = 0.05


def parse_tokenizers(value: object, where: Where, base: Path) -> tuple[tuple[str, str], ...]:
    """
    C{tokenizers}: C{[{model, file}]}, a local C{tokenizer.json} for a model's input-token
    counts (relative paths from the config's folder).
    """
    found: dict[str, str] = {}
    for i, item in enumerate(sequence(value, where)):
        i_where = where.at(i)
        spec = mapping(item, i_where, ("model", "file"), required=("model", "file"))
        model = string(spec["model"], i_where.at("model"))
        if model in found:
            i_where.at("model").fail(f"{model!r} already has a tokenizer")
        path = os.path.join(base, string(spec["file"], i_where.at("file")))
        if not os.path.isfile(path):
            i_where.at("file").fail(f"no such file: {path}")
        found[model] = path
    return tuple(found.items())


def parse_rate_limits(value: object, where: Where) -> RateLimitSettings:
    spec = mapping(value, where, ("failOpen", "redisTimeout"))
    d = RateLimitSettings()
    timeout = positive_duration(spec.get("redisTimeout", d.redis_timeout), where.at("redisTimeout"))
    return RateLimitSettings(
        fail_open=boolean(spec.get("failOpen", d.fail_open), where.at("failOpen")),
        redis_timeout=timeout,
    )


_LIMIT_KEYS = ("inputTokensPerUnit", "outputTokensPerUnit", "requestsPerUnit", "unit")


def _limits(spec: Mapping[str, Any], where: Where, unit: str, required: bool) -> Limits:
    def per_unit(key: str) -> int | None:
        raw = spec.get(key)
        return None if raw is None else integer(raw, where.at(key), minimum=1)

    limits = Limits(
        input_tokens_per_unit=per_unit("inputTokensPerUnit"),
        output_tokens_per_unit=per_unit("outputTokensPerUnit"),
        requests_per_unit=per_unit("requestsPerUnit"),
        unit=choice(spec.get("unit", unit), where.at("unit"), tuple(RATE_UNITS)),
    )
    named = (limits.input_tokens_per_unit, limits.output_tokens_per_unit, limits.requests_per_unit)
    if required and named == (None, None, None):
        where.fail("names no limit (inputTokensPerUnit, outputTokensPerUnit, requestsPerUnit)")
    return limits


def parse_rate_limit(value: object, where: Where) -> RateLimit | None:
    """A ModelRoute's C{spec.rateLimit} (Kthena's fields, our C{requestsPerUnit} and
    C{perUser})."""
    if value is None:
        return None
    spec = mapping(value, where, (*_LIMIT_KEYS, "global", "perUser"))
    g_where = where.at("global")
    r_where = g_where.at("redis")
    global_ = mapping(
        spec.get("global"), g_where, ("redis",), required=("redis",) * ("global" in spec)
    )
    redis = mapping(
        global_.get("redis"),
        r_where,
        ("address", "password"),
        required=("address",) * bool(global_),
    )
    route = _limits(spec, where, "second", required="perUser" not in spec)
    per_user = None
    if "perUser" in spec:
        u_where = where.at("perUser")
        per_user = _limits(
            mapping(spec["perUser"], u_where, _LIMIT_KEYS), u_where, route.unit, True
        )
    address, password = redis.get("address"), redis.get("password")
    return RateLimit(
        input_tokens_per_unit=route.input_tokens_per_unit,
        output_tokens_per_unit=route.output_tokens_per_unit,
        requests_per_unit=route.requests_per_unit,
        unit=route.unit,
        redis_address=None if address is None else string(address, r_where.at("address")),
        redis_password=None if password is None else string(password, r_where.at("password")),
        per_user=per_user,
    )
