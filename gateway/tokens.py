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

__all__ = ["estimate_prompt_tokens", "estimate_text_tokens", "message_text"]

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
