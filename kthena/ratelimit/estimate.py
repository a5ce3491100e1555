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

from kthena import prompt
from kthena.interfaces import ITokenEstimator


@implementer(ITokenEstimator)
class CharsEstimator:
    """ceil(characters / 4) of the ChatML-rendered messages, or of the prompt."""

    def estimate(self, body: dict[str, Any]) -> int:
        return -(-prompt.chars(body) // 4)
