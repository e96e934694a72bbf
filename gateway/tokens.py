"""Token estimates before any upstream counts: for admission, the demo, and cut streams.

`prompt_size()` counts everything an upstream bills as input: the text of every message (and
names, tool calls and their ids), tool and function definitions, `response_format` schemas,
predicted outputs, images (`gateway.media`), files and audio. Each part has a likely cost (text
at four characters a token, the usual rule for English and code) and the most it can cost (a
token is at least one byte of UTF-8 for the providers' byte-level tokenizers). Admission holds
the most and refuses by the likely (see `gateway.budgets`). Estimates are flagged as such in
usage rows.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgspec

from gateway.media import Estimate, audio_tokens, file_tokens, image_tokens
from gateway.schemas.chat import (
    ChatCompletionRequest,
    FileContentPart,
    ImageContentPart,
    InputAudioPart,
    RefusalContentPart,
    TextContentPart,
)
from gateway.schemas.codec import encode

__all__ = [
    "Estimate",
    "ImageCost",
    "estimate_input_tokens",
    "estimate_prompt_tokens",
    "estimate_text_tokens",
    "message_text",
    "prompt_size",
]

_PER_MESSAGE = 4
_BASE = 3

# (url, detail) -> what one image costs on the upstream at hand.
ImageCost = Callable[[str, str | None], Estimate]


def estimate_text_tokens(text: str) -> int:
    return (len(text) + 3) // 4


def _text(text: str) -> Estimate:
    likely = estimate_text_tokens(text)
    return Estimate(likely, max(likely, len(text.encode("utf-8", "surrogatepass"))))


def _raw(value: Any) -> Estimate:
    """A pass-through or nested value by the size of its JSON."""
    data = bytes(value) if isinstance(value, msgspec.Raw) else encode(value)
    return Estimate((len(data) + 3) // 4, len(data))


def message_text(content: object) -> str:
    """The text of a message's content, whether a string or a list of parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(p.text for p in content if isinstance(p, TextContentPart))
    return ""


def _default_image_cost(url: str, detail: str | None) -> Estimate:
    return image_tokens("openai", "", url, detail)


def _part(part: object, image_cost: ImageCost) -> Estimate:
    if isinstance(part, TextContentPart):
        return _text(part.text)
    if isinstance(part, ImageContentPart):
        detail = part.image_url.detail
        return image_cost(part.image_url.url, detail if isinstance(detail, str) else None)
    if isinstance(part, FileContentPart):
        return file_tokens(part.file)
    if isinstance(part, InputAudioPart):
        return audio_tokens(part.input_audio.data, part.input_audio.format)
    if isinstance(part, RefusalContentPart):
        return _text(part.refusal)
    return Estimate(0, 0)


def _message(msg: object, image_cost: ImageCost) -> Estimate:
    total = Estimate(_PER_MESSAGE, _PER_MESSAGE)
    content = getattr(msg, "content", None)
    if isinstance(content, str):
        total += _text(content)
    elif isinstance(content, list):
        for part in content:
            total += _part(part, image_cost)
    for name in ("name", "tool_call_id"):
        value = getattr(msg, name, None)
        if isinstance(value, str):
            total += _text(value)
    for call in getattr(msg, "tool_calls", None) or ():
        total += _text(call.id + call.function.name + call.function.arguments)
    for name in ("function_call", "audio"):
        value = getattr(msg, name, None)
        if isinstance(value, msgspec.Raw):
            total += _raw(value)
    return total


def prompt_size(
    req: ChatCompletionRequest, image_cost: ImageCost = _default_image_cost
) -> Estimate:
    """The input tokens `req` will likely cost upstream, and the most it can cost."""
    total = Estimate(_BASE, _BASE)
    for msg in req.messages:
        total += _message(msg, image_cost)
    for field in ("tools", "functions", "response_format", "tool_choice", "prediction"):
        value = getattr(req, field)
        if value is not msgspec.UNSET and value is not None:
            total += _raw(value)
    return total


def estimate_prompt_tokens(req: ChatCompletionRequest) -> int:
    """The likely input tokens of `req` (for upstreams that report none)."""
    return prompt_size(req).likely


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
