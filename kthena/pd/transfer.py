"""
How much KV cache a prefill leg handed to its decode leg, for
C{kthena_kv_cache_transfer_bytes_total}: no engine answers with bytes, so they are
derived as I{blocks x block size x bytes per token}.

  - Blocks: the engine's own count when it gives one (vLLM's C{nixl}/C{mooncake} prefill
    answer lists the C{remote_block_ids} the decode leg pulls), else the prompt's tokens
    (the prefill answer's C{usage.prompt_tokens}, the router's estimate without it) in
    blocks of C{kvConnector.blockSize} (vLLM's default, 16), the last one partly filled.
  - Bytes per token: C{kvConnector.bytesPerToken}, the model's KV size of one token (2 x
    layers x KV heads x head size x bytes per element; C{None}: unknown, nothing is
    counted rather than a guess).
"""

from __future__ import annotations

from kthena.config.resources import ModelServer


def kv_blocks(reply: object, block_size: int, estimate: int) -> int:
    """
    The KV blocks a prefill leg produced.

    @param reply: its answer, parsed (C{None} when it was not JSON).
    @param estimate: the router's estimate of the prompt's tokens.
    """
    tokens = estimate
    if isinstance(reply, dict):
        params = reply.get("kv_transfer_params")
        if isinstance(params, dict) and isinstance(params.get("remote_block_ids"), list):
            return len(params["remote_block_ids"])
        usage = reply.get("usage")
        prompt = usage.get("prompt_tokens") if isinstance(usage, dict) else None
        if isinstance(prompt, int) and not isinstance(prompt, bool) and prompt >= 0:
            tokens = prompt
    return -(-max(0, tokens) // block_size)


def kv_bytes(server: ModelServer, blocks: int) -> int | None:
    """C{blocks} of C{server}'s model in bytes (C{None}: its bytes per token are unknown)."""
    per_token = server.kv_bytes_per_token
    return None if per_token is None else blocks * server.kv_block_size * per_token
