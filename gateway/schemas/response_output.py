"""OpenAI Responses API output structs: the `response` object, its items, and stream events.

These are written, not read (only `ResponseUsage` is also read, from pass-through upstreams):
tags come first, keys the SDK or the spec require are always present (`annotations: []`,
`logprobs: []`, nullable settings as `null`), and `Response` echoes the request's settings as
OpenAI does.
"""

from __future__ import annotations

from typing import Literal

import msgspec
from msgspec import UNSET, Raw, UnsetType

from gateway.schemas.common import CompletionTokensDetails, Count, PromptTokensDetails, Usage
from gateway.schemas.responses import ReasoningConfig, TextConfig, ToolChoiceObject

__all__ = [
    "ArgumentsDeltaEvent",
    "ArgumentsDoneEvent",
    "CompletedEvent",
    "CreatedEvent",
    "ErrorEvent",
    "FunctionToolOut",
    "InProgressEvent",
    "IncompleteDetails",
    "IncompleteEvent",
    "InputTokensDetails",
    "ItemAddedEvent",
    "ItemDoneEvent",
    "OutputFunctionCall",
    "OutputItem",
    "OutputMessage",
    "OutputPart",
    "OutputReasoning",
    "OutputRefusal",
    "OutputText",
    "OutputTokensDetails",
    "PartAddedEvent",
    "PartDoneEvent",
    "ReasoningDeltaEvent",
    "ReasoningDoneEvent",
    "ReasoningTextContent",
    "RefusalDeltaEvent",
    "RefusalDoneEvent",
    "Response",
    "ResponseError",
    "ResponseUsage",
    "StreamEvent",
    "TextDeltaEvent",
    "TextDoneEvent",
]


# ---- the response object -----------------------------------------------------------------


class _Content(msgspec.Struct, tag_field="type"):
    pass


class OutputText(_Content, tag="output_text"):
    text: str
    annotations: list[Raw] = []
    logprobs: list[Raw] = []


class OutputRefusal(_Content, tag="refusal"):
    refusal: str


class ReasoningTextContent(_Content, tag="reasoning_text"):
    text: str


class _Item(msgspec.Struct, tag_field="type"):
    pass


class OutputMessage(_Item, tag="message"):
    id: str
    status: Literal["in_progress", "completed", "incomplete"]
    content: list[OutputText | OutputRefusal]
    role: Literal["assistant"] = "assistant"


class OutputFunctionCall(_Item, tag="function_call"):
    id: str
    call_id: str
    name: str
    arguments: str
    status: Literal["in_progress", "completed", "incomplete"]


class OutputReasoning(_Item, tag="reasoning"):
    """Thinking text from providers that return it (Anthropic, Gemini, DeepSeek-style)."""

    id: str
    content: list[ReasoningTextContent]
    status: Literal["in_progress", "completed", "incomplete"]
    summary: list[Raw] = []


OutputItem = OutputMessage | OutputFunctionCall | OutputReasoning


class InputTokensDetails(msgspec.Struct):
    cached_tokens: Count = 0
    cache_write_tokens: Count = 0


class OutputTokensDetails(msgspec.Struct):
    reasoning_tokens: Count = 0


class ResponseUsage(msgspec.Struct):
    """Responses `usage`; converts to and from the chat `Usage` the accounting reads."""

    input_tokens: Count = 0
    output_tokens: Count = 0
    total_tokens: Count = 0
    input_tokens_details: InputTokensDetails | None = None
    output_tokens_details: OutputTokensDetails | None = None

    @classmethod
    def from_usage(cls, usage: Usage) -> ResponseUsage:
        prompt = usage.prompt_tokens_details
        completion = usage.completion_tokens_details
        cached = prompt.cached_tokens if isinstance(prompt, PromptTokensDetails) else 0
        reasoning = (
            completion.reasoning_tokens if isinstance(completion, CompletionTokensDetails) else 0
        )
        return cls(
            input_tokens=usage.prompt_tokens,
            output_tokens=usage.completion_tokens,
            total_tokens=usage.total_tokens,
            input_tokens_details=InputTokensDetails(cached_tokens=cached or 0),
            output_tokens_details=OutputTokensDetails(reasoning_tokens=reasoning or 0),
        )

    def to_usage(self) -> Usage:
        cached = self.input_tokens_details.cached_tokens if self.input_tokens_details else 0
        out = self.output_tokens_details
        return Usage(
            prompt_tokens=self.input_tokens,
            completion_tokens=self.output_tokens,
            total_tokens=self.total_tokens or self.input_tokens + self.output_tokens,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=cached),
            completion_tokens_details=CompletionTokensDetails(
                reasoning_tokens=out.reasoning_tokens if out else 0
            ),
        )


class IncompleteDetails(msgspec.Struct):
    reason: Literal["max_output_tokens", "content_filter"]


class ResponseError(msgspec.Struct):
    code: str
    message: str


class FunctionToolOut(msgspec.Struct, tag_field="type", tag="function"):
    """A function tool as echoed in a response (`parameters` and `strict` always present)."""

    name: str
    description: str | None
    parameters: Raw | None
    strict: bool | None


class Response(msgspec.Struct, kw_only=True):
    """The `response` object; the request's settings are echoed as OpenAI does."""

    id: str
    object: Literal["response"] = "response"
    created_at: int
    status: Literal["completed", "incomplete", "in_progress", "failed"]
    background: bool = False
    completed_at: int | None = None
    error: ResponseError | None = None
    incomplete_details: IncompleteDetails | None = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    model: str
    output: list[OutputItem] = []
    parallel_tool_calls: bool = True
    previous_response_id: None = None
    reasoning: ReasoningConfig = msgspec.field(default_factory=ReasoningConfig)
    store: bool = False
    temperature: float | None = None
    text: TextConfig = msgspec.field(default_factory=TextConfig)
    tool_choice: Literal["none", "auto", "required"] | ToolChoiceObject = "auto"
    tools: list[FunctionToolOut] = []
    top_p: float | None = None
    truncation: Literal["auto", "disabled"] = "disabled"
    usage: ResponseUsage | UnsetType = UNSET
    user: str | UnsetType = UNSET
    metadata: dict[str, str] = {}


OutputPart = OutputText | OutputRefusal | ReasoningTextContent


# ---- stream events ---------------------------------------------------------------------------


class StreamEvent(msgspec.Struct, tag_field="type", kw_only=True):
    sequence_number: int = 0


class CreatedEvent(StreamEvent, tag="response.created"):
    response: Response


class InProgressEvent(StreamEvent, tag="response.in_progress"):
    response: Response


class CompletedEvent(StreamEvent, tag="response.completed"):
    response: Response


class IncompleteEvent(StreamEvent, tag="response.incomplete"):
    response: Response


class ItemAddedEvent(StreamEvent, tag="response.output_item.added"):
    output_index: int
    item: OutputItem


class ItemDoneEvent(StreamEvent, tag="response.output_item.done"):
    output_index: int
    item: OutputItem


class _InItem(StreamEvent, kw_only=True):
    item_id: str
    output_index: int


class PartAddedEvent(_InItem, tag="response.content_part.added"):
    content_index: int
    part: OutputPart


class PartDoneEvent(_InItem, tag="response.content_part.done"):
    content_index: int
    part: OutputPart


class TextDeltaEvent(_InItem, tag="response.output_text.delta"):
    content_index: int
    delta: str
    logprobs: list[msgspec.Raw] = []


class TextDoneEvent(_InItem, tag="response.output_text.done"):
    content_index: int
    text: str
    logprobs: list[msgspec.Raw] = []


class RefusalDeltaEvent(_InItem, tag="response.refusal.delta"):
    content_index: int
    delta: str


class RefusalDoneEvent(_InItem, tag="response.refusal.done"):
    content_index: int
    refusal: str


class ReasoningDeltaEvent(_InItem, tag="response.reasoning_text.delta"):
    content_index: int
    delta: str


class ReasoningDoneEvent(_InItem, tag="response.reasoning_text.done"):
    content_index: int
    text: str


class ArgumentsDeltaEvent(_InItem, tag="response.function_call_arguments.delta"):
    delta: str


class ArgumentsDoneEvent(_InItem, tag="response.function_call_arguments.done"):
    name: str
    arguments: str


class ErrorEvent(StreamEvent, tag="error"):
    code: str | None
    message: str
    param: str | None
