"""
The prompt of a request body, read one way for every use: checked against the shapes the
OpenAI API allows (the parse stage answers 400 otherwise), rendered as the engine sees it
for the prefix-cache plugin, and measured for the input-token estimate.

Chat messages render as ChatML, as Kthena does: C{<|im_start|>{role}\\n{content}<|im_end|>\\n}
per message, text parts only. A completions C{prompt} is a string, a batch of strings, or
token ids (one list, or a batch of lists); token ids render as nothing (there is no text
to hash) and count four characters each for the estimate (they are tokens already).
"""

from __future__ import annotations

from typing import Any

CHATML_OVERHEAD = len("<|im_start|>") + len("\n") + len("<|im_end|>") + len("\n")
CHARS_PER_TOKEN_ID = 4


class PromptError(ValueError):
    """The body's prompt has a shape the OpenAI API does not allow; C{str()} says which."""


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_content(content: object, where: str) -> None:
    if content is None or isinstance(content, str):
        return
    if not isinstance(content, list):
        raise PromptError(f"{where} must be a string, null or a list of content parts")
    for j, part in enumerate(content):
        if not isinstance(part, dict):
            raise PromptError(f"{where}[{j}] must be an object")
        kind = part.get("type")
        if not isinstance(kind, str):
            raise PromptError(f"{where}[{j}].type must be a string")
        if kind == "text" and not isinstance(part.get("text"), str):
            raise PromptError(f"{where}[{j}].text must be a string")


REQUIRED = {"/v1/chat/completions": "messages", "/v1/completions": "prompt"}
"""The prompt field each OpenAI path cannot do without (other paths have their own)."""


def check(body: dict[str, Any], path: str = "") -> None:
    """
    @param path: the request's path: chat completions need C{messages}, completions a
        C{prompt} (the OpenAI API answers 400 without them, and so does the router,
        before any pod).
    @raise PromptError: the prompt is missing, or of a shape no engine accepts.
    """
    required = REQUIRED.get(path)
    if required is not None and required not in body:
        raise PromptError(f"`{required}` is required")
    if "messages" in body:
        messages = body["messages"]
        if not isinstance(messages, list):
            raise PromptError("messages must be a list")
        for i, message in enumerate(messages):
            if not isinstance(message, dict):
                raise PromptError(f"messages[{i}] must be an object")
            if not isinstance(message.get("role"), str):
                raise PromptError(f"messages[{i}].role must be a string")
            _check_content(message.get("content"), f"messages[{i}].content")
        return
    if "prompt" not in body:
        return
    prompt = body["prompt"]
    if isinstance(prompt, str):
        return
    if isinstance(prompt, list) and (
        all(isinstance(p, str) for p in prompt)
        or all(_is_int(p) for p in prompt)
        or all(isinstance(p, list) and all(_is_int(t) for t in p) for p in prompt)
    ):
        return
    raise PromptError(
        "prompt must be a string, a list of strings, a list of token ids or a list of lists "
        "of token ids"
    )


def _text(content: object) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            part["text"]
            for part in content
            if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
    return ""


def _token_ids(prompt: list[Any]) -> int:
    return sum(len(p) if isinstance(p, list) else 1 for p in prompt)


def render(body: dict[str, Any]) -> str:
    """The prompt as the engine sees it (chat as ChatML); C{""} when it is token ids."""
    messages = body.get("messages")
    if isinstance(messages, list):
        return "".join(
            f"<|im_start|>{_text(m.get('role'))}\n{_text(m.get('content'))}<|im_end|>\n"
            for m in messages
            if isinstance(m, dict)
        )
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and all(isinstance(p, str) for p in prompt):
        return "".join(prompt)
    return ""


def chars(body: dict[str, Any]) -> int:
    """
    The length of L{render}'s text, counted without building it; token ids count
    L{CHARS_PER_TOKEN_ID} each.
    """
    messages = body.get("messages")
    if isinstance(messages, list):
        return sum(
            CHATML_OVERHEAD + len(_text(m.get("role"))) + len(_text(m.get("content")))
            for m in messages
            if isinstance(m, dict)
        )
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return len(prompt)
    if isinstance(prompt, list):
        if all(isinstance(p, str) for p in prompt):
            return sum(len(p) for p in prompt)
        return CHARS_PER_TOKEN_ID * _token_ids(prompt)
    return 0
