"""
Stage 4, admit: whether the request may go on now. The token and request limits (429)
and the fairness queue (wait, 504 on timeout) go here; until they arrive every request
is admitted at once.
"""

from __future__ import annotations

from kthena.record import RequestRecord


class Admission:
    async def admit(self, record: RequestRecord) -> None:
        """Return when C{record} may go on; raise L{kthena.errors.ProxyError} if not."""
