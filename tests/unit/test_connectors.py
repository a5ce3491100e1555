"""
The KV connectors' legs: what each one sends the prefill pod and the decode pod, the
interface each provides, and that the client's body is never changed in place.
"""

from __future__ import annotations

import copy
import random
from typing import Any

import pytest
from zope.interface.verify import verifyObject

from kthena.config.resources import KV_CONNECTORS
from kthena.interfaces import IKVConnector, IKVTransfer
from kthena.pd.connectors import BootstrapConnector, connectors, one_token

CHAT: dict[str, Any] = {
    "model": "m",
    "messages": [{"role": "user", "content": "hi"}],
    "stream": True,
    "stream_options": {"include_usage": True},
    "max_tokens": 64,
    "temperature": 0.2,
}
PREFILL_HOST = "10.0.0.7"
VLLM_REPLY = {
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "x"}}],
    "kv_transfer_params": {
        "do_remote_prefill": True,
        "do_remote_decode": False,
        "remote_block_ids": [3, 4],
        "remote_engine_id": "e1",
        "remote_host": PREFILL_HOST,
        "remote_port": 5600,
    },
}


@pytest.mark.parametrize("name", KV_CONNECTORS)
def test_every_configured_type_has_a_connector_providing_the_interfaces(name: str) -> None:
    connector = connectors()[name]
    assert verifyObject(IKVConnector, connector)
    assert connector.name == name
    assert verifyObject(IKVTransfer, connector.transfer(CHAT, PREFILL_HOST))
    assert set(connectors()) == set(KV_CONNECTORS)


def test_the_prefill_leg_is_one_token_not_streamed() -> None:
    assert one_token(CHAT) == {
        "model": "m",
        "messages": CHAT["messages"],
        "max_tokens": 1,
        "temperature": 0.2,
    }
    assert one_token({"model": "m", "prompt": "p"})["max_tokens"] == 1
    newer = one_token({"model": "m", "max_completion_tokens": 50})
    assert newer == {"model": "m", "max_completion_tokens": 1}
    both = one_token({"model": "m", "max_completion_tokens": 50, "max_tokens": 50})
    assert (both["max_completion_tokens"], both["max_tokens"]) == (1, 1)


@pytest.mark.parametrize("name", ["http", "lmcache"])
def test_engine_connectors_send_the_clients_request_to_decode(name: str) -> None:
    transfer = connectors()[name].transfer(CHAT, PREFILL_HOST)
    assert transfer.concurrent is False
    assert transfer.prefill_body() == one_token(CHAT)
    assert transfer.decode_body(None) == CHAT  # an answer that was not JSON: not needed


@pytest.mark.parametrize("name", ["nixl", "mooncake"])
def test_vllm_connectors_round_trip_the_kv_transfer_params(name: str) -> None:
    transfer = connectors()[name].transfer(CHAT, PREFILL_HOST)
    assert transfer.concurrent is False
    prefill = transfer.prefill_body()
    assert prefill["kv_transfer_params"] == {"do_remote_decode": True, "do_remote_prefill": False}
    assert prefill["max_tokens"] == 1 and "stream" not in prefill
    decode = transfer.decode_body(VLLM_REPLY)
    assert decode == {**CHAT, "kv_transfer_params": VLLM_REPLY["kv_transfer_params"]}
    with pytest.raises(ValueError, match="no kv_transfer_params"):
        transfer.decode_body({"choices": []})
    for not_an_object in (None, [VLLM_REPLY]):
        with pytest.raises(ValueError, match="not a JSON object"):
            transfer.decode_body(not_an_object)


def test_sglang_puts_one_room_and_the_prefill_host_on_both_legs_at_once() -> None:
    connector = BootstrapConnector(random.Random(7))
    first = connector.transfer(CHAT, PREFILL_HOST)
    assert first.concurrent is True
    prefill, decode = first.prefill_body(), first.decode_body(None)
    room = prefill["bootstrap_room"]
    assert isinstance(room, int) and 0 <= room < 2**63
    assert decode == {**CHAT, "bootstrap_host": PREFILL_HOST, "bootstrap_room": room}
    assert prefill == {**one_token(CHAT), "bootstrap_host": PREFILL_HOST, "bootstrap_room": room}
    assert connector.transfer(CHAT, PREFILL_HOST).prefill_body()["bootstrap_room"] != room


@pytest.mark.parametrize("name", KV_CONNECTORS)
def test_the_clients_body_is_never_changed(name: str) -> None:
    before = copy.deepcopy(CHAT)
    transfer = connectors()[name].transfer(CHAT, PREFILL_HOST)
    transfer.prefill_body()["max_tokens"] = 99
    transfer.decode_body(VLLM_REPLY)["kv_transfer_params"] = {}
    assert before == CHAT
