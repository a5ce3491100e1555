"""
What the router knows about one request as it goes: the record that metrics, the access
log, rate limits and fairness are fed from when the request ends.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kthena.config.gateway import PortListeners
from kthena.errors import ErrorType
from kthena.pods import PodEndpoint
from kthena.store import RouteMatch

if TYPE_CHECKING:
    from kthena.scheduler.framework import Decision


_REQUEST_ID = re.compile(rb"^[\x20-\x7e]{1,128}$")
"""A client's C{x-request-id} kept as given: 1 to 128 printable ASCII characters."""


def request_id(given: bytes | None) -> str:
    """
    The client's C{x-request-id} when it is one we keep (L{_REQUEST_ID}: it goes into
    logs and back to the client as is); a new random one otherwise.
    """
    if given is not None and _REQUEST_ID.match(given):
        return given.decode("ascii")
    return os.urandom(16).hex()


@dataclass(eq=False, slots=True)
class Leg:
    """
    One leg of a prefill/decode request: sent to C{pod} (a pod name) of group C{group}.

    @ivar status: the pod's status code (C{None}: it never answered).
    @ivar kv_blocks: a prefill leg that succeeded: the KV blocks it produced
        (L{kthena.pd.transfer.kv_blocks}).
    """

    group: str
    role: str
    pod: str
    started: float
    ended: float | None = None
    status: int | None = None
    kv_blocks: int | None = None

    @property
    def seconds(self) -> float:
        return max(0.0, (self.ended or self.started) - self.started)


@dataclass(eq=False, slots=True)
class RequestRecord:
    """
    One request's record. Times are reactor seconds (the epoch on a real reactor).

    The phases: C{started} (request complete at the router) -> C{upstream_started} (first
    attempt sent) -> C{upstream_ended} (the last attempt's body ended or failed) ->
    C{finished} (the router ended the response). Requests the router answers itself
    have no upstream phase.

    @ivar path: the request path, without the query.
    @ivar model: the model the client asked for (C{None} until the body is parsed).
    @ivar decision: the scheduler's decision record (scores per candidate and plugin).
    @ivar attempts: upstream requests sent (more than one after retries).
    @ivar upstream_status: the status of the last pod answer (C{None}: none answered).
    @ivar input_estimate: input tokens estimated from the request before sending.
    @ivar prompt_tokens: from the pod's C{usage}, when it reported one.
    @ivar failed_attempts: (pod name, why) of each attempt that failed, in order.
    @ivar user: who called (L{kthena.pipeline.identify}): C{anonymous} until known.
    @ivar priority: the caller's priority class (for the fairness queue).
    @ivar identified: the config names how callers are identified (the access log's
        C{user_id} field is written only then).
    @ivar dispatched: the request went to pods (its observers were told it started).
    @ivar unhealthy_fallback: no pod of the server was healthy: it was scheduled among
        unhealthy ones.
    @ivar streamed_deltas: a stream's C{delta} objects relayed: at least the tokens a
        stream cut before its usage generated.
    @ivar limit_type: the limit that refused the request (C{input_tokens},
        C{output_tokens}, C{requests}), for the C{rate_limit_exceeded} count.
    @ivar limited: what the rate limiter took at admission (a
        L{kthena.ratelimit.limiter.Charge}), until it is settled.
    @ivar legs: a prefill/decode request's legs as sent, in order (C{pod} is the last
        decode leg's pod).
    @ivar pd_plan: a prefill/decode request's pairs (a L{kthena.pd.pairs.PDPlan}).
    @ivar ticket: the fairness queue's ticket (a L{kthena.fairness.ticket.Ticket}), until
        the request ends and hands it back.
    @ivar gateway_port: it came through a port opened for Gateway listeners: theirs
        (C{None}: through the proxy listener).
    """

    request_id: str
    method: str
    path: str
    started: float
    protocol: str = "HTTP/1.1"
    model: str | None = None
    user: str | None = None
    priority: str | None = None
    identified: bool = False
    stream: bool = False
    match: RouteMatch | None = None
    decision: Decision | None = None
    pod: PodEndpoint | None = None
    attempts: int = 0
    upstream_status: int | None = None
    status: int = 0
    error_type: ErrorType = ErrorType.SUCCESS
    error_message: str | None = None
    upstream_started: float | None = None
    first_byte: float | None = None
    upstream_ended: float | None = None
    finished: float | None = None
    input_estimate: int | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    failed_attempts: list[tuple[str, str]] | None = None
    dispatched: bool = False
    unhealthy_fallback: bool = False
    streamed_deltas: int = 0
    limit_type: str | None = None
    limited: object = None
    ticket: object = None
    legs: list[Leg] | None = None
    pd_plan: object = None
    gateway_port: PortListeners | None = None

    def leg(self, role: str) -> Leg | None:
        """The last C{prefill} or C{decode} leg sent (C{None} when none was)."""
        for leg in reversed(self.legs or ()):
            if leg.role == role:
                return leg
        return None

    @property
    def candidates(self) -> list[PodEndpoint]:
        """The pods the scheduler offered, best first (none before scheduling)."""
        return self.decision.candidates if self.decision is not None else []

    @property
    def input_tokens(self) -> int:
        """The pod's count when it reported one, else the router's estimate."""
        if self.prompt_tokens is not None:
            return self.prompt_tokens
        return self.input_estimate or 0

    @property
    def output_tokens(self) -> int:
        return self.completion_tokens or 0

    def fail(self, status: int, error_type: ErrorType, message: str) -> None:
        self.status = status
        self.error_type = error_type
        self.error_message = message
