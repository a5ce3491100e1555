"""
What the router knows about one request as it goes: the record that metrics, the access
log, rate limits and fairness are fed from when the request ends.
"""

from __future__ import annotations

from dataclasses import dataclass

from kthena.proxy.errors import ErrorType
from kthena.store import PodEndpoint, RouteMatch


@dataclass(eq=False, slots=True)
class ProxyContext:
    """
    One request's record. Times are reactor seconds.

    @ivar model: the model the client asked for (C{None} until the body is parsed).
    @ivar attempts: upstream requests sent (more than one after retries).
    @ivar prompt_tokens: from the pod's C{usage}, when it reported one.
    """

    request_id: str
    method: str
    path: str
    started: float
    model: str | None = None
    stream: bool = False
    match: RouteMatch | None = None
    pod: PodEndpoint | None = None
    attempts: int = 0
    status: int = 0
    error_type: ErrorType = ErrorType.SUCCESS
    error_message: str | None = None
    upstream_started: float | None = None
    first_byte: float | None = None
    finished: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None

    def fail(self, status: int, error_type: ErrorType, message: str) -> None:
        self.status = status
        self.error_type = error_type
        self.error_message = message
