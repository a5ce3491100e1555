"""
The simulator's tokenizer and chat template: deterministic, dependency-free, and close
enough to a real BPE tokenizer in shape (words and punctuation with their leading space,
special tokens whole) that token counts look like a real model's and tests can predict
them through C{POST /tokenize}.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Sequence

_PIECE = re.compile(r"<\|[a-z_]+\|>|\s*\w+|\s*(?!<\|[a-z_]+\|>)[^\w\s]|\s+")
_VOCAB = 32_000
_FILLER = (" the", " model", " is", " simulated")


def tokenize(text: str) -> list[str]:
    """Split text into pieces whose concatenation is the text again."""
    return _PIECE.findall(text)


def token_ids(pieces: Sequence[str]) -> list[int]:
    """Stable ids for pieces (the same piece has the same id in every process)."""
    return [zlib.crc32(p.encode()) % _VOCAB for p in pieces]


def render_chat(messages: Sequence[dict[str, object]], add_generation_prompt: bool = True) -> str:
    """
    Render messages with the ChatML template (C{<|im_start|>role\\ncontent<|im_end|>\\n}).

    @raise ValueError: when a message has no role or its content is not text.
    """
    parts: list[str] = []
    for number, message in enumerate(messages):
        role = message.get("role")
        if not isinstance(role, str):
            raise ValueError(f"messages[{number}].role must be a string")
        parts.append(f"<|im_start|>{role}\n{message_text(message, number)}<|im_end|>\n")
    if add_generation_prompt:
        parts.append("<|im_start|>assistant\n")
    return "".join(parts)


def message_text(message: dict[str, object], number: int = 0) -> str:
    """
    The text of a message: a string, or the text parts of a content list.

    @raise ValueError: when the content is neither.
    """
    content = message.get("content")
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts: list[str] = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text":
                raise ValueError(f"messages[{number}].content: only text parts are supported")
            text = part.get("text")
            if not isinstance(text, str):
                raise ValueError(f"messages[{number}].content: a text part needs 'text'")
            texts.append(text)
        return "".join(texts)
    raise ValueError(f"messages[{number}].content must be a string or a list of parts")


def echo_pieces(source: str) -> list[str]:
    """
    The pieces the simulated model generates, in order: the source text's words, each
    with a leading space, repeated as often as needed; a filler when there are no words.
    """
    words = [" " + p.strip() for p in tokenize(source) if p.strip() and not p.startswith("<|")]
    return words or list(_FILLER)
