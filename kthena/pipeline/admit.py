"""
Stage 4, admit: whether the request may go on now. First the route's token and request
limits (429 with C{Retry-After}; L{kthena.ratelimit}), with the input estimate; then the
model's fairness queue (L{kthena.fairness}: wait for a slot, best first; 504 after its
timeout, 503 when it is full and this is the work to shed). A request that only the queue
holds back has already passed its limits: it waits without holding anyone else's tokens
beyond its own estimate, which is refunded if it never reaches a pod.
"""

from __future__ import annotations

from kthena.fairness.fairness import Fairness
from kthena.pipeline.parse import Parsed
from kthena.ratelimit.service import RateLimits
from kthena.record import RequestRecord


class Admission:
    def __init__(self, limits: RateLimits, fairness: Fairness) -> None:
        self.limiter = limits.limiter
        self.tokenizers = limits.tokenizers
        self.fairness = fairness

    async def admit(self, record: RequestRecord, parsed: Parsed) -> None:
        """Return when C{record} may go on; raise L{kthena.errors.ProxyError} if not."""
        assert record.match is not None
        route = record.match.route
        # An HTTPRoute has no limits (one may share a limited ModelRoute's name).
        if route.rate_limit is not None and route.meta.key in self.limiter.routes:
            await self._limits(record, parsed)
        model = parsed.model
        if self.fairness.configured(model):
            user = record.user
            assert user is not None  # the identify stage named the caller
            ticket = self.fairness.admit_now(model, user, record.priority)
            if ticket is None:
                ticket = await self.fairness.admit(model, user, record.priority)
            record.ticket = ticket

    async def _limits(self, record: RequestRecord, parsed: Parsed) -> None:
        count = self.tokenizers.count(parsed.model, parsed.body)
        if not isinstance(count, int):  # the model's tokenizer, in a thread
            count = await count
        record.input_estimate = count
        pending = self.limiter.check(record, count)
        if pending is not None:
            await pending
