"""A whole chat completion as an Anthropic `message`, and what both directions share.

Thinking text (`reasoning_content`) becomes a `thinking` block (with an empty signature: it was
not made by Anthropic), the text a `text` block, each tool call a `tool_use` block whose `input`
is its arguments as a JSON object. `finish_reason` maps to `stop_reason` (`stop` → `end_turn`,
`length` → `max_tokens`, `tool_calls` → `tool_use`, `content_filter` → `refusal`); usage is
split the Anthropic way (`input_tokens` without the cached ones).
"""

from __future__ import annotations

import binascii
import os

import msgspec

from gateway.messages.schema import BlockOut, MessageOut, TextOut, ThinkingOut, ToolUseOut, UsageOut
from gateway.providers._translate import completion_usage, read_completion
from gateway.schemas.codec import encode
from gateway.schemas.common import PromptTokensDetails, Usage

__all__ = ["from_completion", "message_id", "stop_reason", "tool_input", "usage_out"]

_STOP_REASONS = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
    "content_filter": "refusal",
}
_EMPTY_OBJECT = msgspec.Raw(b"{}")


def message_id(upstream_id: str) -> str:
    """A `msg_` id, built on the upstream's own id when it gives one."""
    tail = upstream_id.removeprefix("chatcmpl-") or binascii.hexlify(os.urandom(12)).decode()
    return f"msg_{tail}"


def stop_reason(finish_reason: str | None) -> str:
    return _STOP_REASONS.get(finish_reason or "stop", "end_turn")


def tool_input(arguments: str) -> msgspec.Raw:
    """A tool call's arguments as the JSON object Anthropic's `input` is (`{}` when they are
    not one: a model's broken JSON must not break the whole answer)."""
    try:
        value = msgspec.json.decode(arguments)
    except (msgspec.DecodeError, RecursionError):
        return _EMPTY_OBJECT
    return msgspec.Raw(arguments.encode()) if isinstance(value, dict) else _EMPTY_OBJECT


def usage_out(usage: Usage | None, estimate: int, cache_write: int = 0) -> UsageOut:
    """Chat usage in Anthropic's terms (the prompt estimate when the upstream said nothing)."""
    if usage is None:
        return UsageOut(
            input_tokens=estimate,
            output_tokens=0,
            cache_creation_input_tokens=0,
            cache_read_input_tokens=0,
        )
    details = usage.prompt_tokens_details
    cached = (details.cached_tokens or 0) if isinstance(details, PromptTokensDetails) else 0
    return UsageOut(
        input_tokens=max(0, usage.prompt_tokens - cached - cache_write),
        output_tokens=usage.completion_tokens,
        cache_creation_input_tokens=cache_write,
        cache_read_input_tokens=cached,
    )


def from_completion(body: bytes, estimate: int) -> bytes:
    """A `chat.completion` (encoded) as an encoded Anthropic `message` (its usage, if it has
    none that can be believed: `estimate` for the input, nothing for the output).

    Raises:
        UpstreamError: the completion cannot be read, or has no choice.
    """
    completion = read_completion(body)
    content: list[BlockOut] = []
    choice = completion.choices[0]
    msg, finish = choice.message, choice.finish_reason
    if msg.reasoning_content:
        content.append(ThinkingOut(thinking=msg.reasoning_content))
    text = (msg.content or "") + (msg.refusal or "")
    if text:
        content.append(TextOut(text=text))
    for call in msg.tool_calls or ():
        content.append(
            ToolUseOut(
                id=call.id, name=call.function.name, input=tool_input(call.function.arguments)
            )
        )
    usage = completion_usage(completion)
    message = MessageOut(
        id=message_id(completion.id),
        model=completion.model,
        content=content,
        usage=usage_out(usage, estimate),
        stop_reason=stop_reason(finish),
    )
    return encode(message)
