"""
A generation request as the engines read it: the body of C{/v1/completions} or
C{/v1/chat/completions} checked and turned into what the engine runs (prompt tokens, the
tokens to generate, streaming, vLLM's C{kv_transfer_params}, SGLang's bootstrap room).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kthena.sim.engine import SimEngine
from kthena.sim.identity import ApiError, SimIdentity
from kthena.sim.pd import SGLANG_DEFAULT_BOOTSTRAP_PORT
from kthena.sim.tokenizer import echo_pieces, message_text, render_chat, token_ids, tokenize


@dataclass(slots=True)
class GenerationRequest:
    """A parsed completion request, ready for the engine."""

    chat: bool
    model: str
    lora: str | None
    prompt_ids: list[int]
    echo: list[str]
    tokens: int
    finish_reason: str
    stream: bool
    include_usage: bool
    kv_transfer_params: dict[str, Any] | None
    bootstrap: tuple[str, int, int] | None


def _whole(body: dict[str, Any], key: str, minimum: int) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ApiError(400, f"{key} must be an integer >= {minimum}, got {value!r}", key)
    return value


def flag(body: dict[str, Any], key: str) -> bool:
    value = body.get(key, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise ApiError(400, f"{key} must be a boolean", key)
    return value


def _completions_prompt(body: dict[str, Any]) -> tuple[list[int], str]:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return token_ids(tokenize(prompt)), prompt
    if (
        isinstance(prompt, list)
        and prompt
        and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in prompt)
    ):
        return list(prompt), ""
    raise ApiError(400, "prompt must be a string, one string in a list, or token ids", "prompt")


def _chat_prompt(body: dict[str, Any]) -> tuple[list[int], str]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list", "messages")
    if not all(isinstance(m, dict) for m in messages):
        raise ApiError(400, "every message must be an object", "messages")
    try:
        rendered = render_chat(messages)
        last = message_text(messages[-1], len(messages) - 1)
    except ValueError as e:
        raise ApiError(400, str(e), "messages") from e
    return token_ids(tokenize(rendered)), last


def parse_generation(
    body: object, chat: bool, engine: SimEngine, identity: SimIdentity
) -> GenerationRequest:
    """
    Validate a completion request as the engine would.

    @raise ApiError: 400 for a malformed request, 404 for a model not served here.
    """
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str):
        raise ApiError(400, "model must be a string", "model")
    if model == identity.model:
        lora = None
    elif model in engine.loras:
        lora = model
    else:
        raise ApiError(404, f"The model `{model}` does not exist.", "model")
    if _whole(body, "n", 1) not in (None, 1):
        raise ApiError(400, "kthena-sim supports n=1 only", "n")
    prompt_ids, source = _chat_prompt(body) if chat else _completions_prompt(body)
    limit = _whole(body, "max_completion_tokens", 1) if chat else None
    if limit is None:
        limit = _whole(body, "max_tokens", 1)
    max_len = engine.config.max_model_len
    room = max_len - len(prompt_ids)
    if room < 1 or (limit is not None and limit > room):
        raise ApiError(
            400,
            f"This model's maximum context length is {max_len} tokens. However, you "
            f"requested {len(prompt_ids) + (limit or 0)} tokens ({len(prompt_ids)} in the "
            f"messages, {limit or 0} in the completion). Please reduce the length of the "
            "messages or completion.",
        )
    natural = min(identity.output_tokens, room)
    if limit is not None and (limit < natural or flag(body, "ignore_eos")):
        tokens, finish = limit, "length"
    else:
        tokens, finish = natural, "stop"
    stream = flag(body, "stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise ApiError(400, "stream_options must be an object", "stream_options")
    include_usage = bool(stream and options and flag(options, "include_usage"))
    kv = body.get("kv_transfer_params")
    if kv is not None and not isinstance(kv, dict):
        raise ApiError(400, "kv_transfer_params must be an object", "kv_transfer_params")
    return GenerationRequest(
        chat=chat,
        model=model,
        lora=lora,
        prompt_ids=prompt_ids,
        echo=echo_pieces(source),
        tokens=tokens,
        finish_reason=finish,
        stream=stream,
        include_usage=include_usage,
        kv_transfer_params=kv,
        bootstrap=_bootstrap(body),
    )


def _bootstrap(body: dict[str, Any]) -> tuple[str, int, int] | None:
    room = body.get("bootstrap_room")
    if room is None:
        return None
    host = body.get("bootstrap_host")
    port = body.get("bootstrap_port")
    if port is None:
        port = SGLANG_DEFAULT_BOOTSTRAP_PORT
    if not isinstance(room, int) or isinstance(room, bool) or room < 0:
        raise ApiError(400, "bootstrap_room must be an integer >= 0", "bootstrap_room")
    if not isinstance(host, str) or not host:
        raise ApiError(400, "bootstrap_host must be a non-empty string", "bootstrap_host")
    if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
        raise ApiError(400, "bootstrap_port must be a TCP port", "bootstrap_port")
    return host, port, room
