"""
Stage 2, identify: who is calling. Every caller is anonymous until identities (verified
JWT subjects, trusted headers) arrive with the rate-limit and fairness work; the stage is
here so that they plug in without moving another.
"""

from __future__ import annotations

from kthena.interfaces import IExchange
from kthena.record import RequestRecord

ANONYMOUS = "anonymous"


def identify(exchange: IExchange, record: RequestRecord) -> str:
    """The caller's identity, also kept in the record (C{user})."""
    record.user = ANONYMOUS
    return ANONYMOUS
