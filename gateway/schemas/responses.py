"""OpenAI Responses API request structs (the `response` object is in `response_output`).

The request tolerates unknown fields and keeps "absent" as `UNSET`, like the chat structs.
`input` items and `tools` stay raw per element and are decoded one by one by the translation
(`gateway.responses.items`): an easy input message may omit its `type` tag, so items cannot
be one tagged union, and items or tools the gateway cannot translate (built-in tools,
`item_reference`) must still reach upstreams that serve the Responses API themselves untouched.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import UNSET, Raw, UnsetType

from gateway.schemas.chat import MaxTokens, Metadata, ReasoningEffort
from gateway.schemas.common import Temperature, TopP

__all__ = [
    "MAX_INPUT_ITEMS",
    "AllowedToolType",
    "FunctionToolParam",
    "InputContent",
    "InputFile",
    "InputImage",
    "InputItem",
    "InputText",
    "ItemType",
    "OutputTextInput",
    "ReasoningConfig",
    "ReasoningText",
    "RefusalInput",
    "ResponseCreateRequest",
    "ResponseStreamOptions",
    "TextConfig",
    "TextFormat",
    "TextFormatJSONObject",
    "TextFormatJSONSchema",
    "TextFormatText",
    "ToolChoiceObject",
    "ToolType",
]

# ---- request: input items ----------------------------------------------------------------


class _Part(msgspec.Struct, tag_field="type", omit_defaults=True):
    pass


class InputText(_Part, tag="input_text"):
    text: str


class OutputTextInput(_Part, tag="output_text"):
    """Assistant text sent back as history (its `annotations` and `logprobs` are ignored)."""

    text: str


class InputImage(_Part, tag="input_image"):
    image_url: str | None = None
    file_id: str | None = None
    detail: Literal["auto", "low", "high", "original"] | None = None


class InputFile(_Part, tag="input_file"):
    file_data: str | None = None
    file_id: str | None = None
    filename: str | None = None
    file_url: str | None = None


class RefusalInput(_Part, tag="refusal"):
    refusal: str


class ReasoningText(_Part, tag="reasoning_text"):
    text: str


InputContent = InputText | OutputTextInput | InputImage | InputFile | RefusalInput | ReasoningText


class ItemType(msgspec.Struct):
    """Only an item's `type`; an easy input message (`{"role", "content"}`) has none."""

    type: str = "message"


NonEmpty = Annotated[str, msgspec.Meta(min_length=1)]


class InputItem(ItemType):
    """The fields of every input item kind the gateway translates, in one struct, so that
    each item is decoded once: `message` (`role`, `content`), `function_call` (`call_id`,
    `name`, `arguments`), `function_call_output` (`call_id`, `output`), and `reasoning` and
    `item_reference` (nothing read). Which fields a kind requires is checked after decoding.
    """

    role: Literal["user", "assistant", "system", "developer"] | UnsetType = UNSET
    content: str | list[InputContent] | UnsetType = UNSET
    call_id: NonEmpty | UnsetType = UNSET
    name: NonEmpty | UnsetType = UNSET
    arguments: str | UnsetType = UNSET
    output: str | list[InputContent] | UnsetType = UNSET


# ---- request: tools, formats, the body -------------------------------------------------


class ToolType(msgspec.Struct):
    type: str


class AllowedToolType(msgspec.Struct):
    """An `allowed_tools` entry's type: `function` (the default) or a built-in tool's."""

    type: str = "function"


class FunctionToolParam(msgspec.Struct, omit_defaults=True):
    """A flat function tool (`{"type": "function", "name", "parameters", "strict"}`)."""

    name: Annotated[str, msgspec.Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")]
    description: str | UnsetType | None = UNSET
    parameters: Raw | UnsetType = UNSET  # may be JSON null
    strict: bool | UnsetType | None = UNSET


class ToolChoiceObject(msgspec.Struct, omit_defaults=True):
    """`{"type": "function", "name"}`, `{"type": "allowed_tools", ...}` or a built-in type."""

    type: str
    name: str | UnsetType = UNSET
    mode: Literal["auto", "required"] | UnsetType = UNSET
    tools: list[Raw] | UnsetType = UNSET


class _Format(msgspec.Struct, tag_field="type", omit_defaults=True):
    pass


class TextFormatText(_Format, tag="text"):
    pass


class TextFormatJSONObject(_Format, tag="json_object"):
    pass


class TextFormatJSONSchema(_Format, tag="json_schema"):
    name: Annotated[str, msgspec.Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]
    schema: Raw
    description: str | UnsetType = UNSET
    strict: bool | UnsetType | None = UNSET

    def __post_init__(self) -> None:
        if not bytes(self.schema).lstrip().startswith(b"{"):
            raise ValueError("Expected a JSON object")


TextFormat = TextFormatText | TextFormatJSONObject | TextFormatJSONSchema


class TextConfig(msgspec.Struct):
    format: TextFormat = msgspec.field(default_factory=TextFormatText)
    verbosity: Literal["low", "medium", "high"] | UnsetType | None = UNSET


class ReasoningConfig(msgspec.Struct):
    effort: ReasoningEffort | None = None
    summary: Literal["auto", "concise", "detailed"] | None = None


class ResponseStreamOptions(msgspec.Struct):
    include_obfuscation: bool | UnsetType | None = UNSET


# More input items than this are refused (400 naming `input`): each one is decoded and
# translated on the event loop, and a conversation this long would not fit any context window.
MAX_INPUT_ITEMS = 10_000


class ResponseCreateRequest(msgspec.Struct, omit_defaults=True):
    """`POST /v1/responses` body (`input` optional: a stored prompt may stand in for it).

    `store`, `truncation` and `max_tool_calls` are validated and otherwise ignored when the
    request is translated (nothing is stored, nothing truncated, there are no built-in tools
    whose calls `max_tool_calls` counts); a pass-through upstream gets them as sent.
    """

    model: Annotated[str, msgspec.Meta(min_length=1)] | UnsetType = UNSET
    input: str | Annotated[list[Raw], msgspec.Meta(max_length=MAX_INPUT_ITEMS)] | UnsetType = UNSET
    instructions: str | UnsetType | None = UNSET
    tools: list[Raw] | UnsetType | None = UNSET
    tool_choice: Literal["none", "auto", "required"] | ToolChoiceObject | UnsetType | None = UNSET
    parallel_tool_calls: bool | UnsetType | None = UNSET
    text: TextConfig | UnsetType | None = UNSET
    reasoning: ReasoningConfig | UnsetType | None = UNSET
    max_output_tokens: MaxTokens | UnsetType | None = UNSET
    max_tool_calls: Annotated[int, msgspec.Meta(ge=1)] | UnsetType | None = UNSET
    temperature: Temperature | UnsetType | None = UNSET
    top_p: TopP | UnsetType | None = UNSET
    top_logprobs: Annotated[int, msgspec.Meta(ge=0, le=20)] | UnsetType | None = UNSET
    stream: bool | UnsetType | None = UNSET
    stream_options: ResponseStreamOptions | UnsetType | None = UNSET
    previous_response_id: str | UnsetType | None = UNSET
    store: bool | UnsetType | None = UNSET
    metadata: Metadata | UnsetType | None = UNSET
    user: str | UnsetType | None = UNSET
    safety_identifier: str | UnsetType | None = UNSET
    prompt_cache_key: str | UnsetType | None = UNSET
    service_tier: str | UnsetType | None = UNSET
    truncation: Literal["auto", "disabled"] | UnsetType | None = UNSET
    include: list[str] | UnsetType | None = UNSET
    background: bool | UnsetType | None = UNSET
    conversation: Raw | UnsetType = UNSET
    prompt: Raw | UnsetType = UNSET

    @property
    def is_stream(self) -> bool:
        return self.stream is True
