"""
Stage 4, admit: whether the request may go on now. The route's token and request limits
(429 with C{Retry-After}; L{kthena.ratelimit}) are checked here, with the input estimate;
the fairness queue (wait, 504 on timeout) goes here too.
"""

from __future__ import annotations

from kthena.pipeline.parse import Parsed
from kthena.ratelimit.service import RateLimits
from kthena.record import RequestRecord


class Admission:
    def __init__(self, limits: RateLimits) -> None:
        self.limiter = limits.limiter
        self.tokenizers = limits.tokenizers

    async def admit(self, record: RequestRecord, parsed: Parsed) -> None:
        """Return when C{record} may go on; raise L{kthena.errors.ProxyError} if not."""
        assert record.match is not None
        if record.match.route.meta.key not in self.limiter.routes:
            return
        count = self.tokenizers.count(parsed.model, parsed.body)
        if not isinstance(count, int):  # the model's tokenizer, in a thread
            count = await count
        record.input_estimate = count
        pending = self.limiter.check(record, count)
        if pending is not None:
            await pending
