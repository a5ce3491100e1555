"""
The KV connectors of a prefill/decode ModelServer (C{kvConnector.type}), as Kthena and the
engines define them. Each shapes the two legs of one request:

  - C{http}, C{lmcache}: the prefill leg is the request cut to one generated token, not
    streamed (C{max_tokens: 1}, or C{max_completion_tokens: 1} when the client used that
    field); the KV moves by the engines' own means; the decode leg is the client's request.
  - C{nixl}, C{mooncake} (vLLM's C{kv_transfer_params}): the prefill leg also asks to be
    the KV producer (C{do_remote_decode: true, do_remote_prefill: false}); its answer
    carries the C{kv_transfer_params} the decode leg sends to pull the blocks.
  - C{sglang}: both legs carry one random C{bootstrap_room} and C{bootstrap_host} (the
    prefill pod), and run at once: the decode server waits for the room itself.

Bodies are copied, never changed in place: the client's body is the retry's too.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

from zope.interface import implementer

from kthena.interfaces import IKVConnector, IKVTransfer

_STREAMING = ("stream", "stream_options")


def one_token(body: Mapping[str, Any]) -> dict[str, Any]:
    """C{body} as a prefill: one token, not streamed (the limit field the client used)."""
    prefill = {k: v for k, v in body.items() if k not in _STREAMING}
    if "max_completion_tokens" in body:
        prefill["max_completion_tokens"] = 1
        if "max_tokens" in body:
            prefill["max_tokens"] = 1
    else:
        prefill["max_tokens"] = 1
    return prefill


@implementer(IKVTransfer)
class _EnginesMoveIt:
    """C{http} / C{lmcache}: nothing but the one-token prefill is asked of the legs."""

    concurrent = False

    def __init__(self, body: Mapping[str, Any]) -> None:
        self.body = body

    def prefill_body(self) -> dict[str, Any]:
        return one_token(self.body)

    def decode_body(self, prefill_reply: Any) -> dict[str, Any]:
        return dict(self.body)


PRODUCER = {"do_remote_decode": True, "do_remote_prefill": False}
"""What a vLLM prefill leg's C{kv_transfer_params} say: produce the KV for a remote decode."""


@implementer(IKVTransfer)
class _TransferParams(_EnginesMoveIt):
    """C{nixl} / C{mooncake}: vLLM's C{kv_transfer_params} round trip."""

    def prefill_body(self) -> dict[str, Any]:
        prefill = one_token(self.body)
        prefill["kv_transfer_params"] = dict(PRODUCER)
        return prefill

    def decode_body(self, prefill_reply: Any) -> dict[str, Any]:
        if not isinstance(prefill_reply, dict):
            raise ValueError("the prefill answer is not a JSON object")
        params = prefill_reply.get("kv_transfer_params")
        if not isinstance(params, dict):
            raise ValueError("the prefill answer has no kv_transfer_params for the decode leg")
        decode = dict(self.body)
        decode["kv_transfer_params"] = params
        return decode


@implementer(IKVTransfer)
class _Bootstrap:
    """C{sglang}: one bootstrap room on both legs, sent at once."""

    concurrent = True

    def __init__(self, body: Mapping[str, Any], host: str, room: int) -> None:
        self.body = body
        self.room = {"bootstrap_host": host, "bootstrap_room": room}

    def prefill_body(self) -> dict[str, Any]:
        return {**one_token(self.body), **self.room}

    def decode_body(self, prefill_reply: Any) -> dict[str, Any]:
        return {**self.body, **self.room}


@implementer(IKVConnector)
class EnginesConnector:
    """C{http} and C{lmcache}."""

    def __init__(self, name: str) -> None:
        self.name = name

    def transfer(self, body: Any, prefill_host: str) -> IKVTransfer:
        return _EnginesMoveIt(body)


@implementer(IKVConnector)
class TransferParamsConnector:
    """C{nixl} and C{mooncake}."""

    def __init__(self, name: str) -> None:
        self.name = name

    def transfer(self, body: Any, prefill_host: str) -> IKVTransfer:
        return _TransferParams(body)


@implementer(IKVConnector)
class BootstrapConnector:
    """C{sglang}. @param rng: picks each request's room (seed it in tests)."""

    name = "sglang"

    def __init__(self, rng: random.Random | None = None) -> None:
        self._bits = (rng or random.SystemRandom()).getrandbits

    def transfer(self, body: Any, prefill_host: str) -> IKVTransfer:
        return _Bootstrap(body, prefill_host, self._bits(63))


def connectors() -> dict[str, IKVConnector]:
    """One connector per C{kvConnector.type}."""
    return {
        "http": EnginesConnector("http"),
        "lmcache": EnginesConnector("lmcache"),
        "nixl": TransferParamsConnector("nixl"),
        "mooncake": TransferParamsConnector("mooncake"),
        "sglang": BootstrapConnector(),
    }
