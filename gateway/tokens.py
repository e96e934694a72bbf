"""Cheap token estimates for when no upstream count exists (demo, cut streams, admission).

Roughly four characters per token, the usual rule of thumb for English and code; images count
a flat 85 tokens (OpenAI's low-detail price). Estimates are flagged as such in usage rows.
"""

from __future__ import annotations

from gateway.schemas.chat import (
    ChatCompletionRequest,
    ImageContentPart,
    TextContentPart,
)

__all__ = [
    "estimate_input_tokens",
    "estimate_prompt_tokens",
    "estimate_text_tokens",
    "message_text",
]

_PER_MESSAGE = 4
_PER_IMAGE = 85


def estimate_text_tokens(text: str) -> int:
    return (len(text) + 3) // 4


def message_text(content: object) -> str:
    """The text of a message's content, whether a string or a list of parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(p.text for p in content if isinstance(p, TextContentPart))
    return ""


def estimate_prompt_tokens(req: ChatCompletionRequest) -> int:
    total = 3
    for msg in req.messages:
        content = getattr(msg, "content", None)
        total += _PER_MESSAGE + estimate_text_tokens(message_text(content))
        if isinstance(content, list):
            total += _PER_IMAGE * sum(isinstance(p, ImageContentPart) for p in content)
        for call in getattr(msg, "tool_calls", None) or ():
            total += estimate_text_tokens(call.function.name + call.function.arguments)
    return total


def estimate_input_tokens(value: str | list[str | int | list[int]]) -> int:
    """An embeddings `input` or a completions `prompt`: text estimated, token ids counted."""
    if isinstance(value, str):
        return estimate_text_tokens(value)
    total = 0
    for item in value:
        if isinstance(item, str):
            total += estimate_text_tokens(item)
        elif isinstance(item, list):
            total += len(item)
        else:
            total += 1
    return total
