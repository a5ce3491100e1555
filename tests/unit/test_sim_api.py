"""
The simulator's HTTP layer (L{kthena.sim.api.SimAPI}) driven in memory: an in-memory
HTTP connection, a L{Clock} for the engine, a fake SGLang room fetcher.
"""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from twisted.web.client import ResponseDone, ResponseFailed, ResponseNeverReceived

from kthena.sim.engine import EngineConfig
from kthena.sim.faults import Faults
from kthena.sim.pd import SGLANG_DEFAULT_BOOTSTRAP_PORT, Role
from tests.unit.simfixtures import ENGINE_ID, HOST, MODEL, PORT, Reply, SimHarness, parse_metrics

PROMPT = "The quick brown fox jumps over the lazy dog"
WORDS = [" The", " quick", " brown", " fox", " jumps", " over", " the", " lazy", " dog"]
MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Say hello to the world"},
]
LONG_PROMPT = " ".join(f"w{i}" for i in range(40))  # 40 tokens


def chunks_of(reply: Reply) -> list[Any]:
    """The JSON chunks of an SSE reply, checking it ends with exactly one [DONE]."""
    events = reply.events()
    assert events[-1] == "[DONE]"
    assert events.count("[DONE]") == 1
    return [json.loads(e) for e in events[:-1]]


def assert_vllm_error(reply: Reply, status: int, param: str | None = None) -> dict[str, Any]:
    assert reply.code == status, reply.body
    assert reply.header("content-type") == "application/json"
    body = reply.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == status
    assert isinstance(error["message"], str)
    assert error["message"]
    assert isinstance(error["type"], str)
    if param is not None:
        assert error["param"] == param
    return dict(error)


def assert_sglang_error(reply: Reply, status: int) -> dict[str, Any]:
    assert reply.code == status, reply.body
    body = reply.json()
    assert body["object"] == "error"
    assert set(body) == {"object", "message", "type", "param", "code"}
    assert body["code"] == status
    assert body["message"]
    return dict(body)


# -- generation, non-streaming


def test_completions_body_and_usage() -> None:
    h = SimHarness()
    prompt_tokens = h.prompt_count(PROMPT)
    assert prompt_tokens == 9
    reply = h.post("/v1/completions", {"model": MODEL, "prompt": PROMPT, "max_tokens": 5})
    assert reply.headers is None  # nothing is sent before the last token
    assert h.engine.num_running == 1
    h.run()
    assert reply.code == 200
    assert reply.header("content-type") == "application/json"
    body = reply.json()
    assert body["id"].startswith("cmpl-")
    assert len(body["id"]) > len("cmpl-")
    assert body["object"] == "text_completion"
    assert body["model"] == MODEL
    assert isinstance(body["created"], int)
    [choice] = body["choices"]
    assert choice["index"] == 0
    assert choice["text"] == "".join(WORDS[:5])
    assert choice["finish_reason"] == "length"
    assert body["usage"]["prompt_tokens"] == prompt_tokens
    assert body["usage"]["completion_tokens"] == 5
    assert body["usage"]["total_tokens"] == prompt_tokens + 5
    assert "kv_transfer_params" not in body
    assert h.engine.num_running == 0


def test_completions_stop_at_natural_length() -> None:
    h = SimHarness(output_tokens=7)
    reply = h.post("/v1/completions", {"model": MODEL, "prompt": [PROMPT], "max_tokens": 100})
    h.run()
    body = reply.json()
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"]["completion_tokens"] == 7
    assert body["choices"][0]["text"] == "".join(WORDS[:7])


def test_completions_ignore_eos_runs_to_max_tokens() -> None:
    h = SimHarness(output_tokens=3)
    reply = h.post(
        "/v1/completions",
        {"model": MODEL, "prompt": PROMPT, "max_tokens": 12, "ignore_eos": True},
    )
    h.run()
    body = reply.json()
    assert body["usage"]["completion_tokens"] == 12
    assert body["choices"][0]["finish_reason"] == "length"
    # The echo wraps around the prompt's words.
    assert body["choices"][0]["text"] == "".join(WORDS + WORDS[:3])


def test_completions_token_id_prompt() -> None:
    h = SimHarness(output_tokens=4)
    reply = h.post("/v1/completions", {"model": MODEL, "prompt": [1, 2, 3, 4, 5, 6]})
    h.run()
    body = reply.json()
    assert body["usage"]["prompt_tokens"] == 6
    assert body["usage"]["completion_tokens"] == 4


def test_chat_body_and_usage() -> None:
    h = SimHarness()
    prompt_tokens = h.chat_count(MESSAGES)
    reply = h.post("/v1/chat/completions", {"model": MODEL, "messages": MESSAGES, "max_tokens": 3})
    h.run()
    assert reply.code == 200
    body = reply.json()
    assert body["id"].startswith("chatcmpl-")
    assert body["object"] == "chat.completion"
    assert body["model"] == MODEL
    [choice] = body["choices"]
    assert choice["message"]["role"] == "assistant"
    # The simulated model echoes the last message's words.
    assert choice["message"]["content"] == " Say hello to"
    assert choice["finish_reason"] == "length"
    assert body["usage"] == {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": 3,
        "total_tokens": prompt_tokens + 3,
        "prompt_tokens_details": None,
    }


def test_chat_max_completion_tokens_wins_over_max_tokens() -> None:
    h = SimHarness()
    reply = h.post(
        "/v1/chat/completions",
        {"model": MODEL, "messages": MESSAGES, "max_tokens": 10, "max_completion_tokens": 2},
    )
    h.run()
    assert reply.json()["usage"]["completion_tokens"] == 2


def test_chat_without_limit_stops_naturally() -> None:
    h = SimHarness(output_tokens=16)
    reply = h.post("/v1/chat/completions", {"model": MODEL, "messages": MESSAGES})
    h.run()
    body = reply.json()
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"]["completion_tokens"] == 16


def test_non_streaming_timing_follows_the_clock() -> None:
    config = EngineConfig(prefill_per_token=0.01, itl=0.5)
    h = SimHarness(engine_config=config)
    reply = h.post("/v1/completions", {"model": MODEL, "prompt": PROMPT, "max_tokens": 3})
    # first token at 9 * 0.01 s, then two more at 0.5 s each
    h.advance(0.09 + 0.5 + 0.49)
    assert not reply.done
    assert h.engine.num_running == 1
    h.advance(0.011)
    assert reply.complete
    assert reply.json()["usage"]["completion_tokens"] == 3


# -- streaming


def test_completions_stream_without_usage() -> None:
    h = SimHarness()
    reply = h.post(
        "/v1/completions",
        {"model": MODEL, "prompt": PROMPT, "max_tokens": 4, "stream": True},
    )
    assert reply.code == 200  # headers go out before the first token
    assert reply.header("content-type") == "text/event-stream; charset=utf-8"
    assert reply.events() == []
    h.run()
    assert reply.complete
    chunks = chunks_of(reply)
    assert len(chunks) == 4  # one event per token, no usage chunk
    ids = {c["id"] for c in chunks}
    assert len(ids) == 1
    assert ids.pop().startswith("cmpl-")
    for i, chunk in enumerate(chunks):
        assert chunk["object"] == "text_completion"
        assert chunk["model"] == MODEL
        assert "usage" not in chunk
        [choice] = chunk["choices"]
        assert choice["text"] == WORDS[i]
        assert choice["finish_reason"] == ("length" if i == 3 else None)


def test_chat_stream_without_usage() -> None:
    h = SimHarness(output_tokens=3)
    reply = h.post("/v1/chat/completions", {"model": MODEL, "messages": MESSAGES, "stream": True})
    h.run()
    chunks = chunks_of(reply)
    assert len(chunks) == 1 + 3  # role chunk, then one per token
    role = chunks[0]
    assert role["object"] == "chat.completion.chunk"
    assert role["id"].startswith("chatcmpl-")
    assert role["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert role["choices"][0]["finish_reason"] is None
    contents = [c["choices"][0]["delta"]["content"] for c in chunks[1:]]
    assert contents == [" Say", " hello", " to"]
    reasons = [c["choices"][0]["finish_reason"] for c in chunks[1:]]
    assert reasons == [None, None, "stop"]
    assert all("usage" not in c for c in chunks)


@pytest.mark.parametrize("chat", [True, False])
def test_stream_with_include_usage(chat: bool) -> None:
    h = SimHarness()
    if chat:
        path = "/v1/chat/completions"
        request: dict[str, Any] = {"model": MODEL, "messages": MESSAGES}
        prompt_tokens = h.chat_count(MESSAGES)
    else:
        path = "/v1/completions"
        request = {"model": MODEL, "prompt": PROMPT}
        prompt_tokens = h.prompt_count(PROMPT)
    request |= {"max_tokens": 5, "stream": True, "stream_options": {"include_usage": True}}
    reply = h.post(path, request)
    h.run()
    chunks = chunks_of(reply)
    tokens = chunks[1:-1] if chat else chunks[:-1]
    assert len(tokens) == 5
    usage = chunks[-1]
    assert usage["choices"] == []
    assert usage["usage"] == {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": 5,
        "total_tokens": prompt_tokens + 5,
        "prompt_tokens_details": None,
    }
    assert usage["id"] == chunks[0]["id"]
    for chunk in chunks[:-1]:
        assert "usage" in chunk
        assert chunk["usage"] is None
    assert tokens[-1]["choices"][0]["finish_reason"] == "length"
    assert all(t["choices"][0]["finish_reason"] is None for t in tokens[:-1])


def test_stream_events_come_one_per_token_on_the_clock() -> None:
    config = EngineConfig(prefill_per_token=0.01, itl=0.25)
    h = SimHarness(engine_config=config)
    reply = h.post(
        "/v1/chat/completions",
        {"model": MODEL, "messages": MESSAGES, "max_tokens": 3, "stream": True},
    )
    ttft = h.chat_count(MESSAGES) * 0.01
    h.advance(ttft - 0.001)
    assert reply.events() == []
    h.advance(0.001)
    assert len(reply.events()) == 2  # role chunk and first token
    h.advance(0.25)
    assert len(reply.events()) == 3
    h.advance(0.25)
    assert reply.events()[-1] == "[DONE]"
    assert len(reply.events()) == 5
    assert reply.complete


def test_stream_options_must_be_an_object() -> None:
    h = SimHarness()
    reply = h.post(
        "/v1/completions",
        {"model": MODEL, "prompt": PROMPT, "stream": True, "stream_options": "yes"},
    )
    assert_vllm_error(reply, 400, "stream_options")


def test_include_usage_without_stream_is_ignored() -> None:
    h = SimHarness()
    reply = h.post(
        "/v1/completions",
        {
            "model": MODEL,
            "prompt": PROMPT,
            "max_tokens": 2,
            "stream_options": {"include_usage": True},
        },
    )
    h.run()
    assert reply.json()["usage"]["completion_tokens"] == 2


# -- request ids


@pytest.mark.parametrize(
    ("path", "request_body", "prefix"),
    [
        ("/v1/chat/completions", {"messages": MESSAGES}, "chatcmpl-"),
        ("/v1/completions", {"prompt": PROMPT}, "cmpl-"),
    ],
)
@pytest.mark.parametrize("stream", [False, True])
def test_x_request_id_is_used_in_the_id(
    path: str, request_body: dict[str, Any], prefix: str, stream: bool
) -> None:
    h = SimHarness(output_tokens=2)
    reply = h.post(
        path,
        {"model": MODEL, "stream": stream, **request_body},
        headers={"x-request-id": "req-0042"},
    )
    h.run()
    if stream:
        ids = {c["id"] for c in chunks_of(reply)}
        assert ids == {prefix + "req-0042"}
    else:
        assert reply.json()["id"] == prefix + "req-0042"


def test_ids_without_header_are_distinct() -> None:
    h = SimHarness(output_tokens=1)
    first = h.post("/v1/completions", {"model": MODEL, "prompt": PROMPT})
    second = h.post("/v1/completions", {"model": MODEL, "prompt": PROMPT})
    h.run()
    assert first.json()["id"] != second.json()["id"]


# -- errors


BAD_REQUESTS: list[tuple[str, bytes, int, str | None]] = [
    ("/v1/chat/completions", b"{not json", 400, None),
    ("/v1/completions", b"", 400, None),
    ("/v1/completions", b"[1, 2]", 400, None),
    ("/v1/chat/completions", json.dumps({"model": 7, "messages": MESSAGES}).encode(), 400, "model"),
    ("/v1/completions", json.dumps({"prompt": PROMPT}).encode(), 400, "model"),
    (
        "/v1/completions",
        json.dumps({"model": MODEL, "prompt": PROMPT, "max_tokens": 0}).encode(),
        400,
        "max_tokens",
    ),
    (
        "/v1/completions",
        json.dumps({"model": MODEL, "prompt": PROMPT, "max_tokens": "5"}).encode(),
        400,
        "max_tokens",
    ),
    (
        "/v1/completions",
        json.dumps({"model": MODEL, "prompt": PROMPT, "max_tokens": True}).encode(),
        400,
        "max_tokens",
    ),
    (
        "/v1/chat/completions",
        json.dumps({"model": MODEL, "messages": MESSAGES, "max_tokens": -1}).encode(),
        400,
        "max_tokens",
    ),
    (
        "/v1/chat/completions",
        json.dumps({"model": MODEL, "messages": []}).encode(),
        400,
        "messages",
    ),
    ("/v1/chat/completions", json.dumps({"model": MODEL}).encode(), 400, "messages"),
    (
        "/v1/chat/completions",
        json.dumps({"model": MODEL, "messages": ["hi"]}).encode(),
        400,
        "messages",
    ),
    (
        "/v1/chat/completions",
        json.dumps({"model": MODEL, "messages": [{"content": "no role"}]}).encode(),
        400,
        "messages",
    ),
    (
        "/v1/chat/completions",
        json.dumps({"model": MODEL, "messages": MESSAGES, "n": 2}).encode(),
        400,
        "n",
    ),
    ("/v1/completions", json.dumps({"model": MODEL, "prompt": 5}).encode(), 400, "prompt"),
    (
        "/v1/completions",
        json.dumps({"model": MODEL, "prompt": PROMPT, "stream": "yes"}).encode(),
        400,
        "stream",
    ),
    (
        "/v1/chat/completions",
        json.dumps({"model": "no-such-model", "messages": MESSAGES}).encode(),
        404,
        "model",
    ),
    (
        "/v1/completions",
        json.dumps({"model": "no-such-model", "prompt": PROMPT}).encode(),
        404,
        "model",
    ),
]


@pytest.mark.parametrize(("path", "body", "status", "param"), BAD_REQUESTS)
def test_bad_requests_vllm(path: str, body: bytes, status: int, param: str | None) -> None:
    h = SimHarness()
    reply = h.request("POST", path, body)
    error = assert_vllm_error(reply, status, param)
    assert error["type"] == {400: "BadRequestError", 404: "NotFoundError"}[status]
    assert h.engine.num_running == h.engine.num_waiting == 0


@pytest.mark.parametrize(("path", "body", "status", "param"), BAD_REQUESTS)
def test_bad_requests_sglang(path: str, body: bytes, status: int, param: str | None) -> None:
    h = SimHarness(engine="sglang")
    reply = h.request("POST", path, body)
    error = assert_sglang_error(reply, status)
    if param is not None:
        assert error["param"] == param
    assert "error" not in error


def test_unknown_model_message_names_it() -> None:
    h = SimHarness()
    reply = h.post("/v1/completions", {"model": "llama-9000", "prompt": PROMPT})
    error = assert_vllm_error(reply, 404, "model")
    assert "llama-9000" in error["message"]


def test_context_too_long() -> None:
    h = SimHarness(engine_config=EngineConfig(max_model_len=32), output_tokens=100)
    reply = h.post("/v1/completions", {"model": MODEL, "prompt": LONG_PROMPT})
    error = assert_vllm_error(reply, 400)
    assert "maximum context length is 32" in error["message"]
    # The prompt fits, the prompt plus max_tokens does not.
    reply = h.post("/v1/completions", {"model": MODEL, "prompt": PROMPT, "max_tokens": 24})
    error = assert_vllm_error(reply, 400)
    assert "33 tokens" in error["message"]
    # Exactly filling the context is fine.
    reply = h.post("/v1/completions", {"model": MODEL, "prompt": PROMPT, "max_tokens": 23})
    h.run()
    assert reply.json()["usage"]["total_tokens"] == 32
    # Without max_tokens, the natural length is capped by the context.
    reply = h.post("/v1/completions", {"model": MODEL, "prompt": PROMPT})
    h.run()
    assert reply.json()["usage"]["completion_tokens"] == 23
    assert reply.json()["choices"][0]["finish_reason"] == "stop"


def test_context_too_long_sglang_shape() -> None:
    h = SimHarness(engine="sglang", engine_config=EngineConfig(max_model_len=16))
    reply = h.post("/v1/completions", {"model": MODEL, "prompt": LONG_PROMPT})
    assert_sglang_error(reply, 400)


@pytest.mark.parametrize("engine", ["vllm", "sglang"])
def test_unknown_path_is_404(engine: str) -> None:
    h = SimHarness(engine=engine)
    reply = h.get("/v2/nothing")
    check = assert_vllm_error if engine == "vllm" else assert_sglang_error
    error = check(reply, 404)
    assert "/v2/nothing" in error["message"]
    reply = h.post("/v1/chat/completions/extra", {"model": MODEL})
    assert reply.code == 404


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("GET", "/v1/chat/completions", {"POST"}),
        ("PUT", "/v1/completions", {"POST"}),
        ("POST", "/v1/models", {"GET"}),
        ("POST", "/health", {"GET"}),
        ("GET", "/tokenize", {"POST"}),
        ("DELETE", "/metrics", {"GET"}),
        ("PATCH", "/sim/faults", {"GET", "PUT", "POST", "DELETE"}),
        ("POST", "/sim/bootstrap/3", {"GET"}),
    ],
)
def test_wrong_method_is_405_with_allow(method: str, path: str, allow: set[str]) -> None:
    h = SimHarness()
    reply = h.request(method, path, b"{}" if method in ("POST", "PUT", "PATCH") else None)
    error = assert_vllm_error(reply, 405)
    assert error["type"] == "MethodNotAllowedError"
    header = reply.header("allow")
    assert header is not None
    assert {m.strip() for m in header.split(",")} == allow


# -- models and LoRA adapters


def test_models_lists_base_and_adapters() -> None:
    h = SimHarness(loras={"sql": "/adapters/sql", "chat": "/adapters/chat"})
    reply = h.get("/v1/models")
    assert reply.code == 200
    body = reply.json()
    assert body["object"] == "list"
    by_id = {m["id"]: m for m in body["data"]}
    assert set(by_id) == {MODEL, "sql", "chat"}
    assert body["data"][0]["id"] == MODEL
    base = by_id[MODEL]
    assert base["object"] == "model"
    assert base["parent"] is None
    assert base["root"] == MODEL
    assert base["max_model_len"] == h.engine.config.max_model_len
    assert base["owned_by"] == "vllm"
    assert by_id["sql"]["parent"] == MODEL
    assert by_id["sql"]["root"] == "/adapters/sql"
    assert by_id["chat"]["parent"] == MODEL


def test_models_owned_by_sglang() -> None:
    h = SimHarness(engine="sglang")
    [model] = h.get("/v1/models").json()["data"]
    assert model["owned_by"] == "sglang"


def test_load_and_unload_lora() -> None:
    h = SimHarness(output_tokens=2)
    reply = h.post("/v1/completions", {"model": "sql-lora", "prompt": PROMPT})
    assert_vllm_error(reply, 404, "model")

    reply = h.post("/v1/load_lora_adapter", {"lora_name": "sql-lora", "lora_path": "/a/sql"})
    assert reply.code == 200
    assert reply.header("content-type") == "text/plain; charset=utf-8"
    assert reply.text() == "Success: LoRA adapter 'sql-lora' added successfully."
    assert h.engine.loras == {"sql-lora": "/a/sql"}
    ids = {m["id"]: m["parent"] for m in h.get("/v1/models").json()["data"]}
    assert ids == {MODEL: None, "sql-lora": MODEL}

    reply = h.post("/v1/load_lora_adapter", {"lora_name": "sql-lora", "lora_path": "/a/sql"})
    assert_vllm_error(reply, 400, "lora_name")

    # The adapter is now a model this server serves.
    reply = h.post("/v1/completions", {"model": "sql-lora", "prompt": PROMPT})
    assert h.engine.running_loras() == ["sql-lora"]
    h.run()
    assert reply.json()["model"] == "sql-lora"
    reply = h.post(
        "/v1/chat/completions", {"model": "sql-lora", "messages": MESSAGES, "stream": True}
    )
    h.run()
    assert {c["model"] for c in chunks_of(reply)} == {"sql-lora"}

    reply = h.post("/v1/unload_lora_adapter", {"lora_name": "sql-lora"})
    assert reply.code == 200
    assert reply.text() == "Success: LoRA adapter 'sql-lora' removed successfully."
    assert h.engine.loras == {}
    reply = h.post("/v1/completions", {"model": "sql-lora", "prompt": PROMPT})
    assert_vllm_error(reply, 404, "model")

    reply = h.post("/v1/unload_lora_adapter", {"lora_name": "sql-lora"})
    error = assert_vllm_error(reply, 404, "lora_name")
    assert "sql-lora" in error["message"]


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/load_lora_adapter", {"lora_path": "/a"}),
        ("/v1/load_lora_adapter", {"lora_name": "x"}),
        ("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": ""}),
        ("/v1/load_lora_adapter", {"lora_name": 1, "lora_path": "/a"}),
        ("/v1/unload_lora_adapter", {}),
        ("/v1/unload_lora_adapter", ["x"]),
    ],
)
def test_lora_bad_requests(path: str, body: object) -> None:
    h = SimHarness()
    assert_vllm_error(h.post(path, body), 400)
    assert h.engine.loras == {}


def test_lora_slots_are_limited() -> None:
    h = SimHarness(engine_config=EngineConfig(max_loras=1), loras={"a": "/a"})
    reply = h.post("/v1/load_lora_adapter", {"lora_name": "b", "lora_path": "/b"})
    error = assert_vllm_error(reply, 400)
    assert "max_loras" in error["message"]
    assert h.engine.loras == {"a": "/a"}


# -- tokenize, health, metrics


def test_tokenize_prompt() -> None:
    h = SimHarness()
    reply = h.post("/tokenize", {"model": MODEL, "prompt": PROMPT})
    assert reply.code == 200
    body = reply.json()
    assert body["count"] == 9
    assert len(body["tokens"]) == 9
    assert all(isinstance(t, int) for t in body["tokens"])
    assert body["max_model_len"] == h.engine.config.max_model_len
    # Deterministic: the same text gives the same ids.
    assert h.post("/tokenize", {"model": MODEL, "prompt": PROMPT}).json() == body


def test_tokenize_messages_matches_chat_usage() -> None:
    h = SimHarness(output_tokens=1)
    body = h.post("/tokenize", {"model": MODEL, "messages": MESSAGES}).json()
    assert body["count"] == len(body["tokens"])
    reply = h.post("/v1/chat/completions", {"model": MODEL, "messages": MESSAGES})
    h.run()
    # As in vLLM, /tokenize adds the generation prompt by default, as chat does.
    assert reply.json()["usage"]["prompt_tokens"] == body["count"]
    bare = h.post(
        "/tokenize", {"model": MODEL, "messages": MESSAGES, "add_generation_prompt": False}
    ).json()
    assert 0 < bare["count"] < body["count"]
    assert body["tokens"][: bare["count"]] == bare["tokens"]


@pytest.mark.parametrize(
    "body",
    [{"model": MODEL}, {"prompt": 5}, {"messages": "hi"}, {"messages": [{"content": "x"}]}, [1]],
)
def test_tokenize_bad_requests(body: object) -> None:
    h = SimHarness()
    assert_vllm_error(h.post("/tokenize", body), 400)


def test_health() -> None:
    h = SimHarness()
    reply = h.get("/health")
    assert reply.code == 200
    assert reply.complete
    assert reply.body == b""


@pytest.mark.parametrize("engine", ["vllm", "sglang"])
def test_metrics_endpoint(engine: str) -> None:
    h = SimHarness(engine=engine)
    reply = h.post("/v1/completions", {"model": MODEL, "prompt": PROMPT, "max_tokens": 50})
    h.advance(0.1)
    scrape = h.get("/metrics")
    assert scrape.code == 200
    assert scrape.header("content-type") == "text/plain; version=0.0.4; charset=utf-8"
    families = parse_metrics(scrape.body)
    running = "vllm:num_requests_running" if engine == "vllm" else "sglang:num_running_reqs"
    [sample] = families[running].samples
    assert sample.value == 1
    h.run()
    assert reply.complete
    [sample] = parse_metrics(h.get("/metrics").body)[running].samples
    assert sample.value == 0


def test_the_last_requests_received_are_kept_for_sim_requests() -> None:
    h = SimHarness()
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    h.post("/v1/chat/completions", body)
    h.post("/v1/completions", {"model": MODEL, "prompt": "a b", "max_tokens": 1})
    h.advance(5)
    seen = h.get("/sim/requests").json()["requests"]
    assert [r["path"] for r in seen] == ["/v1/chat/completions", "/v1/completions"]
    assert seen[0]["body"] == body  # as sent
    for i in range(70):
        h.post("/v1/completions", {"model": MODEL, "prompt": str(i), "max_tokens": 1})
    h.advance(5)
    seen = h.get("/sim/requests").json()["requests"]
    assert len(seen) == 64 and seen[-1]["body"]["prompt"] == "69"  # the last 64
    assert h.request("DELETE", "/sim/requests").json() == {"requests": []}
    assert h.get("/sim/requests").json() == {"requests": []}


# -- fault injection


def test_faults_get_put_delete() -> None:
    h = SimHarness()
    defaults = h.get("/sim/faults").json()
    assert defaults == {
        "error_rate": 0.0,
        "error_status": 500,
        "abort_rate": 0.0,
        "drop_after_tokens": None,
        "slowdown": 1.0,
        "metrics_down": False,
    }
    reply = h.request("PUT", "/sim/faults", json.dumps({"error_status": 429}).encode())
    assert reply.code == 200
    assert reply.json() == defaults | {"error_status": 429}
    assert h.get("/sim/faults").json()["error_status"] == 429
    reply = h.post("/sim/faults", {"slowdown": 2})
    assert reply.json() == defaults | {"error_status": 429, "slowdown": 2.0}
    reply = h.request("DELETE", "/sim/faults")
    assert reply.code == 200
    assert reply.json() == defaults
    assert h.faults.error_status == 500


@pytest.mark.parametrize(
    "change",
    [
        {"error_rate": 2},
        {"error_rate": -0.1},
        {"error_rate": "half"},
        {"abort_rate": True},
        {"error_status": 200},
        {"error_status": 600},
        {"drop_after_tokens": -1},
        {"drop_after_tokens": 1.5},
        {"slowdown": 0},
        {"bogus": 1},
        {"error_status": 503, "slowdown": -1},
        [1],
    ],
)
def test_faults_validation(change: object) -> None:
    h = SimHarness()
    before = h.get("/sim/faults").json()
    reply = h.request("PUT", "/sim/faults", json.dumps(change).encode())
    assert_vllm_error(reply, 400)
    # All or nothing: a bad update changes nothing.
    assert h.get("/sim/faults").json() == before
    assert h.engine.config.slowdown == 1.0


def test_faults_invalid_json() -> None:
    h = SimHarness(engine="sglang")
    assert_sglang_error(h.request("PUT", "/sim/faults", b"{"), 400)


@pytest.mark.parametrize("chat", [True, False])
def test_error_rate_one_answers_error_status(chat: bool) -> None:
    h = SimHarness()
    h.request("PUT", "/sim/faults", json.dumps({"error_rate": 1, "error_status": 503}).encode())
    path = "/v1/chat/completions" if chat else "/v1/completions"
    request = {"model": MODEL, "messages": MESSAGES} if chat else {"model": MODEL, "prompt": PROMPT}
    for stream in (False, True):
        reply = h.post(path, {**request, "stream": stream})
        error = assert_vllm_error(reply, 503)
        assert error["type"] == "ServiceUnavailableError"
    assert h.engine.num_running == h.engine.num_waiting == 0
    # Validation still comes first.
    assert_vllm_error(h.post(path, {"model": "other"}), 404)
    h.request("DELETE", "/sim/faults")
    reply = h.post(path, request)
    h.run()
    assert reply.code == 200


def test_error_fault_in_sglang_shape() -> None:
    h = SimHarness(engine="sglang", faults=Faults(error_rate=1.0, error_status=500))
    reply = h.post("/v1/completions", {"model": MODEL, "prompt": PROMPT})
    body = assert_sglang_error(reply, 500)
    assert body["type"] == "InternalServerError"


def test_slowdown_applies_to_the_engine() -> None:
    config = EngineConfig(prefill_per_token=0.01, itl=0.1)
    h = SimHarness(engine_config=config)
    reply = h.request("PUT", "/sim/faults", json.dumps({"slowdown": 3}).encode())
    assert reply.code == 200
    assert h.engine.config.slowdown == 3.0
    stream = h.post(
        "/v1/completions", {"model": MODEL, "prompt": PROMPT, "max_tokens": 2, "stream": True}
    )
    h.advance(9 * 0.01 * 3 - 0.001)
    assert stream.events() == []
    h.advance(0.001)
    assert len(stream.events()) == 1
    h.advance(0.1 * 3 - 0.001)
    assert len(stream.events()) == 1
    h.advance(0.001)
    assert stream.events()[-1] == "[DONE]"
    h.request("DELETE", "/sim/faults")
    assert h.engine.config.slowdown == 1.0


def test_slowdown_from_initial_faults() -> None:
    h = SimHarness(faults=Faults(slowdown=4.0))
    assert h.engine.config.slowdown == 4.0


def test_abort_rate_one_drops_the_connection() -> None:
    h = SimHarness(faults=Faults(abort_rate=1.0))
    reply = h.post("/v1/completions", {"model": MODEL, "prompt": PROMPT})
    h.flush()
    assert reply.failure is not None
    assert reply.failure.check(ResponseNeverReceived)
    assert h.engine.num_running == h.engine.num_waiting == 0


def test_drop_after_tokens_cuts_the_stream() -> None:
    h = SimHarness(faults=Faults(drop_after_tokens=2))
    reply = h.post(
        "/v1/completions", {"model": MODEL, "prompt": PROMPT, "max_tokens": 8, "stream": True}
    )
    h.run()
    assert reply.done
    assert not reply.complete
    assert reply.reason is not None
    assert reply.reason.check(ResponseFailed)
    assert len(reply.events()) == 2
    assert "[DONE]" not in reply.events()
    assert h.engine.num_running == 0


def test_drop_after_tokens_non_streaming_sends_nothing() -> None:
    h = SimHarness(faults=Faults(drop_after_tokens=1))
    reply = h.post("/v1/completions", {"model": MODEL, "prompt": PROMPT, "max_tokens": 8})
    h.run()
    assert reply.failure is not None
    assert reply.failure.check(ResponseNeverReceived)
    assert h.engine.num_running == 0


# -- vLLM NIXL prefill/decode


def test_nixl_prefill_returns_transfer_params() -> None:
    h = SimHarness(role=Role.PREFILL)
    prompt_tokens = h.prompt_count(LONG_PROMPT)
    kv = {"do_remote_decode": True, "do_remote_prefill": False}
    first = h.post(
        "/v1/completions",
        {"model": MODEL, "prompt": LONG_PROMPT, "max_tokens": 1, "kv_transfer_params": kv},
    )
    h.run()
    body = first.json()
    params = body["kv_transfer_params"]
    blocks = math.ceil(prompt_tokens / h.engine.config.block_size)
    assert blocks == 3
    assert params["do_remote_prefill"] is True
    assert params["do_remote_decode"] is False
    assert len(params["remote_block_ids"]) == blocks
    assert params["remote_engine_id"] == ENGINE_ID
    assert params["remote_host"] == HOST
    assert params["remote_port"] == PORT
    assert body["usage"]["completion_tokens"] == 1
    # Another request gets blocks of its own.
    second = h.post(
        "/v1/chat/completions",
        {"model": MODEL, "messages": MESSAGES, "max_tokens": 1, "kv_transfer_params": kv},
    )
    h.run()
    other = second.json()["kv_transfer_params"]["remote_block_ids"]
    assert len(other) == math.ceil(h.chat_count(MESSAGES) / 16)
    assert not set(other) & set(params["remote_block_ids"])


def test_nixl_prefill_on_role_both() -> None:
    h = SimHarness()
    reply = h.post(
        "/v1/completions",
        {
            "model": MODEL,
            "prompt": PROMPT,
            "max_tokens": 1,
            "kv_transfer_params": {"do_remote_decode": True},
        },
    )
    h.run()
    assert len(reply.json()["kv_transfer_params"]["remote_block_ids"]) == 1


def _first_token_time(h: SimHarness, request: dict[str, Any]) -> float:
    """Stream C{request} at the current time; return the TTFT the client sees."""
    start = h.clock.seconds()
    reply = h.post("/v1/completions", {**request, "stream": True})
    assert reply.code == 200, reply.body
    while not reply.events():
        calls = h.clock.getDelayedCalls()
        assert calls
        h.step_to(min(c.getTime() for c in calls))
    ttft = h.clock.seconds() - start
    h.run()
    assert reply.complete
    return ttft


def test_nixl_decode_skips_the_prefill() -> None:
    config = EngineConfig(prefill_per_token=0.01, prefix_cache_blocks=0)
    h = SimHarness(role=Role.DECODE, engine_config=config)
    request = {"model": MODEL, "prompt": LONG_PROMPT, "max_tokens": 2}
    assert _first_token_time(h, request) == pytest.approx(40 * 0.01)
    remote = {
        "do_remote_prefill": True,
        "do_remote_decode": False,
        "remote_block_ids": [0, 1, 2],
        "remote_engine_id": "prefill-0",
        "remote_host": "10.0.0.1",
        "remote_port": 8000,
    }
    assert _first_token_time(h, {**request, "kv_transfer_params": remote}) == 0
    # Blocks for part of the prompt: the rest is prefilled here.
    partial = remote | {"remote_block_ids": [7]}
    assert _first_token_time(h, {**request, "kv_transfer_params": partial}) == pytest.approx(
        (40 - 16) * 0.01
    )
    assert h.engine.num_running == 0


def test_nixl_round_trip_between_two_simulators() -> None:
    config = EngineConfig(prefill_per_token=0.01)
    prefill = SimHarness(role=Role.PREFILL, engine_config=config)
    decode = SimHarness(role=Role.DECODE, engine_config=EngineConfig(prefill_per_token=0.01))
    request = {"model": MODEL, "prompt": LONG_PROMPT}
    leg = prefill.post(
        "/v1/completions",
        {**request, "max_tokens": 1, "kv_transfer_params": {"do_remote_decode": True}},
    )
    prefill.run()
    kv = leg.json()["kv_transfer_params"]
    assert _first_token_time(decode, {**request, "kv_transfer_params": kv}) == 0


@pytest.mark.parametrize(
    ("role", "kv", "message"),
    [
        (Role.DECODE, {"do_remote_decode": True}, "not a KV producer"),
        (Role.PREFILL, {"do_remote_prefill": True, "remote_block_ids": [1]}, "not a KV consumer"),
        (Role.BOTH, {"do_remote_prefill": True, "remote_block_ids": 3}, "remote_block_ids"),
        (Role.DECODE, {"do_remote_prefill": True}, "remote_block_ids"),
        (Role.BOTH, "remote", "kv_transfer_params"),
    ],
)
def test_nixl_role_checks(role: Role, kv: object, message: str) -> None:
    h = SimHarness(role=role)
    reply = h.post("/v1/completions", {"model": MODEL, "prompt": PROMPT, "kv_transfer_params": kv})
    error = assert_vllm_error(reply, 400)
    assert message in error["message"]
    assert h.engine.num_running == 0


def test_plain_requests_work_on_any_role() -> None:
    for role in Role:
        h = SimHarness(role=role, output_tokens=1)
        reply = h.post("/v1/completions", {"model": MODEL, "prompt": PROMPT})
        h.run()
        assert reply.code == 200


# -- SGLang bootstrap


def test_sglang_decode_waits_for_the_room() -> None:
    config = EngineConfig(prefill_per_token=0.01)
    h = SimHarness(engine="sglang", role=Role.DECODE, engine_config=config, bootstrap_timeout=7)
    reply = h.post(
        "/v1/completions",
        {
            "model": MODEL,
            "prompt": LONG_PROMPT,
            "max_tokens": 2,
            "bootstrap_room": 1234,
            "bootstrap_host": "10.0.0.9",
            "bootstrap_port": 9000,
        },
    )
    [call] = h.fetcher.calls
    assert (call.host, call.port, call.room, call.timeout) == ("10.0.0.9", 9000, 1234, 7)
    h.advance(5)
    assert h.engine.num_running == h.engine.num_waiting == 0
    assert not reply.done
    start = h.clock.seconds()
    call.result.callback(40)
    assert h.engine.num_running == 1
    h.advance(0)
    # The whole prompt came from the prefill server: no prefill here.
    assert len(reply.chunks) == 0
    [next_token] = h.clock.getDelayedCalls()
    assert next_token.getTime() == pytest.approx(start + h.engine.config.itl)
    h.run()
    body = reply.json()
    assert body["usage"]["completion_tokens"] == 2
    assert body["usage"]["prompt_tokens"] == 40


def test_sglang_decode_default_bootstrap_port() -> None:
    h = SimHarness(engine="sglang", role=Role.DECODE, output_tokens=1)
    reply = h.post(
        "/v1/chat/completions",
        {"model": MODEL, "messages": MESSAGES, "bootstrap_room": 5, "bootstrap_host": "h"},
    )
    [call] = h.fetcher.calls
    assert call.port == SGLANG_DEFAULT_BOOTSTRAP_PORT
    call.result.callback(1)
    h.run()
    assert reply.code == 200


def test_sglang_decode_fails_when_the_room_fails() -> None:
    h = SimHarness(engine="sglang", role=Role.DECODE)
    reply = h.post(
        "/v1/completions",
        {"model": MODEL, "prompt": PROMPT, "bootstrap_room": 9, "bootstrap_host": "10.0.0.9"},
    )
    [call] = h.fetcher.calls
    call.result.errback(RuntimeError("prefill server said no"))
    h.flush()
    body = assert_sglang_error(reply, 500)
    assert "room 9" in body["message"]
    assert "prefill server said no" in body["message"]
    assert h.engine.num_running == h.engine.num_waiting == 0


def test_sglang_decode_stream_fails_when_the_room_fails() -> None:
    h = SimHarness(engine="sglang", role=Role.DECODE)
    reply = h.post(
        "/v1/chat/completions",
        {
            "model": MODEL,
            "messages": MESSAGES,
            "stream": True,
            "bootstrap_room": 9,
            "bootstrap_host": "10.0.0.9",
        },
    )
    assert reply.code == 200  # stream headers are out already
    h.fetcher.calls[0].result.errback(RuntimeError("timeout"))
    h.flush()
    assert reply.complete
    [error] = chunks_of(reply)
    assert error["object"] == "error"
    assert error["code"] == 500


def test_sglang_bootstrap_fields_validated() -> None:
    h = SimHarness(engine="sglang", role=Role.DECODE)
    base = {"model": MODEL, "prompt": PROMPT}
    for extra in (
        {"bootstrap_room": -1, "bootstrap_host": "h"},
        {"bootstrap_room": "1", "bootstrap_host": "h"},
        {"bootstrap_room": 1},
        {"bootstrap_room": 1, "bootstrap_host": ""},
        {"bootstrap_room": 1, "bootstrap_host": "h", "bootstrap_port": 0},
        {"bootstrap_room": 1, "bootstrap_host": "h", "bootstrap_port": 70000},
    ):
        assert_sglang_error(h.post("/v1/completions", base | extra), 400)
    assert h.fetcher.calls == []


def test_sglang_prefill_marks_the_room_ready() -> None:
    config = EngineConfig(prefill_per_token=0.01)
    h = SimHarness(engine="sglang", role=Role.PREFILL, engine_config=config)
    reply = h.post(
        "/v1/completions",
        {
            "model": MODEL,
            "prompt": LONG_PROMPT,
            "max_tokens": 1,
            "bootstrap_room": 42,
            "bootstrap_host": HOST,
        },
    )
    assert h.fetcher.calls == []  # the prefill leg fetches nothing
    waiter = h.rooms.wait(42, 10)
    got: list[int] = []
    waiter.addCallback(got.append)
    poll = h.get("/sim/bootstrap/42?timeout=10")
    h.advance(40 * 0.01 - 0.001)
    assert got == []
    assert not poll.done
    h.advance(0.001)
    assert got == [40]
    assert poll.code == 200
    assert poll.json() == {"room": 42, "prompt_tokens": 40}
    h.run()
    assert reply.code == 200
    # Latecomers find the room ready.
    late = h.get("/sim/bootstrap/42")
    assert late.code == 200
    assert late.json()["prompt_tokens"] == 40


def test_bootstrap_room_timeout_is_404() -> None:
    h = SimHarness(engine="sglang", role=Role.PREFILL)
    poll = h.get("/sim/bootstrap/77?timeout=2")
    h.advance(1.999)
    assert poll.code is None
    h.advance(0.001)
    error = assert_sglang_error(poll, 404)
    assert "77" in error["message"]
    assert len(h.rooms) == 0


def test_bootstrap_room_bad_numbers() -> None:
    h = SimHarness()
    assert_vllm_error(h.get("/sim/bootstrap/abc"), 400)
    assert_vllm_error(h.get("/sim/bootstrap/3?timeout=soon"), 400)


def test_bootstrap_poller_leaving_forgets_the_room() -> None:
    h = SimHarness(engine="sglang", role=Role.PREFILL)
    poll = h.request("GET", "/sim/bootstrap/5?timeout=30")
    assert len(h.rooms) == 1
    poll.response.cancel()
    h.flush()
    assert len(h.rooms) == 0


# -- client disconnects


def test_disconnect_mid_stream_aborts_the_sequence() -> None:
    h = SimHarness(engine_config=EngineConfig(itl=0.1))
    reply = h.post(
        "/v1/chat/completions",
        {"model": MODEL, "messages": MESSAGES, "max_tokens": 10, "stream": True},
    )
    h.advance(0.25)
    assert len(reply.events()) >= 3
    assert h.engine.num_running == 1
    reply.abort()
    h.flush()
    assert h.engine.num_running == 0
    assert h.engine.used_blocks == 0
    assert h.clock.getDelayedCalls() == []
    received = len(reply.events())
    h.advance(5)
    assert len(reply.events()) == received


def test_disconnect_before_the_response_aborts_the_sequence() -> None:
    h = SimHarness(engine_config=EngineConfig(itl=0.1))
    reply = h.post("/v1/completions", {"model": MODEL, "prompt": PROMPT, "max_tokens": 10})
    h.advance(0.35)
    assert h.engine.num_running == 1
    reply.response.cancel()
    h.flush()
    assert reply.failure is not None
    assert reply.failure.check(ResponseNeverReceived)
    assert h.engine.num_running == 0
    assert h.clock.getDelayedCalls() == []


def test_disconnect_while_queued_leaves_the_queue() -> None:
    h = SimHarness(engine_config=EngineConfig(max_num_seqs=1, itl=0.1))
    first = h.post("/v1/completions", {"model": MODEL, "prompt": PROMPT, "max_tokens": 5})
    second = h.post("/v1/completions", {"model": MODEL, "prompt": PROMPT, "max_tokens": 5})
    assert (h.engine.num_running, h.engine.num_waiting) == (1, 1)
    second.response.cancel()
    h.flush()
    assert (h.engine.num_running, h.engine.num_waiting) == (1, 0)
    h.run()
    assert first.complete
    assert h.engine.num_running == 0


def test_disconnect_while_awaiting_bootstrap_cancels_the_fetch() -> None:
    h = SimHarness(engine="sglang", role=Role.DECODE)
    reply = h.post(
        "/v1/completions",
        {"model": MODEL, "prompt": PROMPT, "bootstrap_room": 3, "bootstrap_host": "h"},
    )
    [call] = h.fetcher.calls
    reply.response.cancel()
    h.flush()
    assert call.cancelled
    assert h.engine.num_running == h.engine.num_waiting == 0


def test_finished_stream_ends_cleanly() -> None:
    h = SimHarness(output_tokens=2)
    reply = h.post("/v1/completions", {"model": MODEL, "prompt": PROMPT, "stream": True})
    h.run()
    assert reply.reason is not None
    assert reply.reason.check(ResponseDone)


def test_metrics_down_fault_fails_scrapes_only() -> None:
    h = SimHarness()
    assert h.request("PUT", "/sim/faults", b'{"metrics_down": true}').code == 200
    assert h.get("/metrics").code == 503
    assert h.request("PUT", "/sim/faults", b'{"metrics_down": 1}').code == 400
    assert h.request("DELETE", "/sim/faults").code == 200
    assert h.get("/metrics").code == 200
