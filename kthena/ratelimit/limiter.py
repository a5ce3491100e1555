"""
The token and request limits of the ModelRoutes, checked at admission and settled with
what the response really used.

A route's C{rateLimit} becomes a L{RouteLimits}: its buckets (input tokens, output tokens,
requests; and the same for each caller under C{perUser}) in one backend (the router's, or
the Redis named by C{global.redis}). A check asks, all or nothing: the input estimate
(taken), one output token (must be there; the real count is charged at the end) and one
request (taken). The settle charges the output tokens the response used (the bucket may
go into debt) and the difference between the pod's C{prompt_tokens} and the estimate; a
request that never reached a pod gets its estimate back.

Limits follow the config at once: a reload builds every route's limits anew (a bucket
keeps its level while its key stays; a changed limit applies from the next request; a
removed limit stops refusing), unlike Kthena, which keeps the old limiter running.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from twisted.internet.defer import CancelledError, Deferred
from twisted.python.failure import Failure

from kthena.config.limits import RateLimitSettings
from kthena.config.resources import Limits, ModelRoute, RateLimit
from kthena.errors import ErrorType, ProxyError
from kthena.interfaces import IBucketBackend
from kthena.pipeline.settle import Observer
from kthena.ratelimit.buckets import BucketSpec, Demand, LocalBuckets, Refusal, bucket_key
from kthena.ratelimit.outages import Outages
from kthena.record import RequestRecord

KINDS = ("input", "output", "requests")
LIMIT_TYPES = {"input": "input_tokens", "output": "output_tokens", "requests": "requests"}
"""A bucket kind -> the C{limit_type} label of C{kthena_router_rate_limit_exceeded_total}."""

_WHAT = {"input": "input-token", "output": "output-token", "requests": "request"}
_FIXED = {"input": None, "output": (0, 1), "requests": (1, 1)}
"""(take, need) of a bucket kind's demand when it is the same for every request."""


@dataclass(frozen=True, slots=True)
class Bucket:
    """
    @ivar fixed: what every request asks of it, when that does not depend on the request
        (output: one token available; requests: one taken); C{None} for input.
    """

    kind: str
    spec: BucketSpec
    per_user: bool
    fixed: Demand | None


def _buckets(model: str, limits: Limits, user: str | None) -> list[Bucket]:
    amounts = (
        limits.input_tokens_per_unit,
        limits.output_tokens_per_unit,
        limits.requests_per_unit,
    )
    seconds = limits.unit_seconds
    buckets = []
    for kind, n in zip(KINDS, amounts, strict=True):
        if n is not None:
            spec = BucketSpec(bucket_key(model, kind, user), n, n / seconds)
            fixed = _FIXED[kind]
            demand = None if fixed is None else Demand(spec, *fixed)
            buckets.append(Bucket(kind, spec, user is not None, demand))
    return buckets


@dataclass(frozen=True, slots=True)
class RouteLimits:
    """
    One route's limits, in one backend.

    @ivar model: the name in its bucket keys (Kthena's: the route's C{modelName}).
    """

    route: str
    model: str
    limit: RateLimit
    backend: IBucketBackend
    _shared: list[Bucket] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # the route's own buckets are the same for every request: made once
        object.__setattr__(self, "_shared", _buckets(self.model, self.limit, None))

    def buckets(self, user: str | None) -> list[Bucket]:
        """The route's buckets, then the caller's (when the route limits each caller)."""
        per_user = self.limit.per_user
        if per_user is None or user is None:
            return self._shared
        return self._shared + _buckets(self.model, per_user, user)


@dataclass(slots=True)
class Charge:
    """What a request took at admission, settled when it ends."""

    limits: RouteLimits
    buckets: list[Bucket]
    estimate: int

    def demands(self) -> list[Demand]:
        estimate = self.estimate
        return [b.fixed or Demand(b.spec, estimate, estimate) for b in self.buckets]

    def used(self, record: RequestRecord) -> list[tuple[BucketSpec, float]]:
        """
        The settle: output as the pod counted it (a stream cut before its usage: one
        token per delta relayed, at least what it generated), input as the pod counted
        it (or the estimate back when no pod took the prompt).
        """
        if record.prompt_tokens is not None:
            used_input = record.prompt_tokens
        else:
            used_input = self.estimate if record.first_byte is not None else 0
        if record.completion_tokens is not None:
            used_output = record.completion_tokens
        else:
            used_output = record.streamed_deltas
        charges = []
        for bucket in self.buckets:
            if bucket.kind == "input" and used_input != self.estimate:
                charges.append((bucket.spec, float(used_input - self.estimate)))
            elif bucket.kind == "output" and used_output:
                charges.append((bucket.spec, float(used_output)))
        return charges


def refused(charge: Charge, refusal: Refusal, record: RequestRecord) -> ProxyError:
    """The 429 for a refusal: which limit, and when to retry (C{Retry-After})."""
    bucket = charge.buckets[refusal.index]
    record.limit_type = LIMIT_TYPES[bucket.kind]
    whose = "per-user " if bucket.per_user else ""
    limit = (
        f"the {whose}{_WHAT[bucket.kind]} limit of route {charge.limits.route} "
        f"({bucket.spec.capacity:g} per {charge.limits.limit.unit})"
    )
    if math.isinf(refusal.retry_after):
        message = f"{limit} is below the {charge.estimate} input tokens this request needs"
        headers: tuple[tuple[bytes, bytes], ...] = ()
    else:
        wait = max(1, math.ceil(refusal.retry_after))
        message = f"{limit} is exceeded; it allows this request in {wait}s"
        headers = ((b"retry-after", b"%d" % wait),)
    return ProxyError(
        429, ErrorType.RATE_LIMIT, message, code="rate_limit_exceeded", headers=headers
    )


class RateLimiter(Observer):
    """
    Every route's limits: checks at admission (L{check}), settles when requests end
    (L{ended}: an observer of every request).

    @param backend_for: the shared backend for a C{global.redis} address and password.
    """

    def __init__(
        self,
        local: LocalBuckets,
        settings: RateLimitSettings,
        backend_for: Callable[[str, str | None], IBucketBackend],
        outages: Outages,
    ) -> None:
        self.local = local
        self.settings = settings
        self.backend_for = backend_for
        self.outages = outages
        self.routes: dict[str, RouteLimits] = {}

    def update(self, routes: Iterable[ModelRoute], settings: RateLimitSettings) -> None:
        """A new config generation: its routes' limits replace the old at once."""
        self.settings = settings
        kept: dict[str, RouteLimits] = {}
        for route in routes:
            limit = route.rate_limit
            if limit is None:
                continue
            backend: IBucketBackend = self.local
            if limit.redis_address is not None:
                backend = self.backend_for(limit.redis_address, limit.redis_password)
            model = route.model_name or route.meta.key
            kept[route.meta.key] = RouteLimits(route.meta.key, model, limit, backend)
        self.routes = kept

    def check(self, record: RequestRecord, estimate: int) -> Deferred[None] | None:
        """
        Admit C{record} (routed) under its route's limits.

        @return: C{None} when it passed at once; else a Deferred that fires when the
            backend said so.
        @raise ProxyError: 429 when a limit is exceeded (the Deferred fails the same way).
        """
        assert record.match is not None
        limits = self.routes.get(record.match.route.meta.key)
        if limits is None:
            return None
        charge = Charge(limits, limits.buckets(record.user), estimate)
        backend = limits.backend
        if isinstance(backend, LocalBuckets):
            refusal = backend.check_now(charge.demands())
            if refusal is not None:
                raise refused(charge, refusal, record)
            record.limited = charge
            return None
        d: Deferred[Refusal | None] = backend.check(charge.demands())
        return d.addCallbacks(
            self._checked,
            self._unchecked,
            callbackArgs=(charge, record),
            errbackArgs=(charge, record),
        )

    def _checked(self, refusal: Refusal | None, charge: Charge, record: RequestRecord) -> None:
        self.outages.recovered(charge.limits.backend)
        if refusal is not None:
            raise refused(charge, refusal, record)
        record.limited = charge

    def _unchecked(self, failure: Failure, charge: Charge, record: RequestRecord) -> Failure | None:
        if failure.check(CancelledError):  # the request went away while it waited
            return failure
        self.outages.failed(charge.limits.backend, "check", failure)
        if not self.settings.fail_open:
            raise ProxyError(
                503,
                ErrorType.RATE_LIMIT,
                f"the rate-limit backend of route {charge.limits.route} cannot answer",
            )
        return None

    def ended(self, record: RequestRecord) -> None:
        """Charge what a request used (it ended, however it ended)."""
        charge = record.limited
        if not isinstance(charge, Charge):
            return
        record.limited = None
        charges = charge.used(record)
        if not charges:
            return
        backend = charge.limits.backend
        if isinstance(backend, LocalBuckets):
            backend.settle_now(charges)
            return
        backend.settle(charges).addCallbacks(
            lambda _: self.outages.recovered(backend),
            lambda f: self.outages.failed(backend, "settle", f),
        )
