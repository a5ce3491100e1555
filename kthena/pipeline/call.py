"""
One request on its way to pods: what the dispatcher and the relay share with the pipeline
that started it (which answers it if the call is cancelled or breaks).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kthena.interfaces import IExchange
from kthena.pipeline.outgoing import Outgoing
from kthena.pipeline.relay import Relay
from kthena.pods import PodEndpoint
from kthena.record import RequestRecord
from kthena.store import RouteMatch


@dataclass(eq=False, slots=True)
class Call:
    """
    One request on its way to pods.

    @ivar client_gone: the client disconnected; nothing more is written to it.
    @ivar cancelled: the call was cancelled (the client left, or a shutdown).
    @ivar relay: the relay of the answer being relayed, once there is one.
    @ivar body: the JSON body as it goes to pods (the KV connectors shape PD legs from it).
    """

    exchange: IExchange
    record: RequestRecord
    match: RouteMatch
    candidates: list[PodEndpoint]
    outgoing: Outgoing
    body: dict[str, Any] = field(default_factory=dict)
    client_gone: bool = False
    cancelled: bool = False
    relay: Relay | None = field(default=None)
