"""
Input-token estimates, made before a request is sent (for limits, and for metrics when the
pod reports no usage).

L{CharsEstimator} is Kthena's: the prompt rendered as ChatML, one token per four
characters, rounded up ("hello world" as one user message is 10 tokens; as a completions
prompt, 3). It counts the characters without building the rendered string.
"""

from __future__ import annotations

from typing import Any

from zope.interface import implementer

from kthena.interfaces import ITokenEstimator

_CHATML_OVERHEAD = len("<|im_start|>") + len("\n") + len("<|im_end|>") + len("\n")


def _text_length(content: object) -> int:
    if isinstance(content, str):
        return len(content)
    if isinstance(content, list):
        return sum(
            len(part["text"])
            for part in content
            if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
    return 0


def _prompt_length(prompt: object) -> int:
    if isinstance(prompt, str):
        return len(prompt)
    if isinstance(prompt, list):
        # A batch of strings, or token ids (one "character" per id would undercount:
        # ids are tokens already, four "characters" each keeps the ratio).
        if all(isinstance(p, str) for p in prompt):
            return sum(len(p) for p in prompt)
        return 4 * len(prompt)
    return 0


@implementer(ITokenEstimator)
class CharsEstimator:
    """ceil(characters / 4) of the ChatML-rendered messages, or of the prompt."""

    def estimate(self, body: dict[str, Any]) -> int:
        messages = body.get("messages")
        if isinstance(messages, list):
            chars = 0
            for message in messages:
                if isinstance(message, dict):
                    role = message.get("role")
                    chars += _CHATML_OVERHEAD + (len(role) if isinstance(role, str) else 0)
                    chars += _text_length(message.get("content"))
        else:
            chars = _prompt_length(body.get("prompt"))
        return -(-chars // 4)
