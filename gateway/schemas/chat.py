"""OpenAI Chat Completions wire structs: the request we accept and the objects we send back.

Request structs tolerate unknown fields (new SDKs add them; pass-through upstreams get them from
the raw body), use `UNSET` so "absent" survives forwarding, and constrain values the way the
OpenAI API does so a bad body is a 400 naming the field before any upstream is called.
Messages are a tagged union on `role`, content parts and tools on `type`.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import UNSET, Raw, UnsetType

from gateway.schemas.common import Penalty, Temperature, TopP, Usage

__all__ = [
    "MAX_OUTPUT_TOKENS",
    "AssistantMessage",
    "ChatCompletion",
    "ChatCompletionChunk",
    "ChatCompletionRequest",
    "ChatMessage",
    "Choice",
    "ChunkChoice",
    "ChunkView",
    "CompletionView",
    "ContentPart",
    "Delta",
    "DeltaFunction",
    "DeltaToolCall",
    "DeveloperMessage",
    "FileContentPart",
    "FunctionCall",
    "FunctionDefinition",
    "FunctionMessage",
    "FunctionTool",
    "ImageContentPart",
    "ImageOutput",
    "ImageURL",
    "InputAudioPart",
    "JSONObjectFormat",
    "JSONSchemaFormat",
    "Message",
    "NamedFunction",
    "RefusalContentPart",
    "ResponseFormat",
    "StreamOptions",
    "SystemMessage",
    "TextContentPart",
    "TextFormat",
    "ToolCall",
    "ToolChoice",
    "ToolMessage",
    "UserMessage",
    "wants_usage",
]


class _Part(msgspec.Struct, tag_field="type", omit_defaults=True):
    pass


class TextContentPart(_Part, tag="text"):
    text: str


class ImageURL(msgspec.Struct, omit_defaults=True):
    url: Annotated[str, msgspec.Meta(min_length=1)]
    detail: Literal["auto", "low", "high"] | UnsetType = UNSET


class ImageContentPart(_Part, tag="image_url"):
    image_url: ImageURL


class InputAudio(msgspec.Struct):
    data: str
    format: str


class InputAudioPart(_Part, tag="input_audio"):
    input_audio: InputAudio


class FileContentPart(_Part, tag="file"):
    file: Raw


class RefusalContentPart(_Part, tag="refusal"):
    refusal: str


ContentPart = (
    TextContentPart | ImageContentPart | InputAudioPart | FileContentPart | RefusalContentPart
)
TextOnlyContent = str | list[TextContentPart]


class FunctionCall(msgspec.Struct):
    name: str
    arguments: str


class ToolCall(msgspec.Struct):
    id: str
    function: FunctionCall
    type: Literal["function"] = "function"


class _Message(msgspec.Struct, tag_field="role", omit_defaults=True):
    pass


class SystemMessage(_Message, tag="system"):
    content: TextOnlyContent
    name: str | UnsetType = UNSET


class DeveloperMessage(_Message, tag="developer"):
    content: TextOnlyContent
    name: str | UnsetType = UNSET


class UserMessage(_Message, tag="user"):
    content: str | list[ContentPart]
    name: str | UnsetType = UNSET


_NULL = Raw(b"null")


def _unset_nulls(obj: msgspec.Struct, names: tuple[str, ...]) -> None:
    """Raw fields sent as JSON `null` become UNSET: OpenAI takes `null` for "not sent", and
    code that reads a raw field would otherwise see a value. (Typed fields decode `null` to
    None, which their readers treat as absent.)"""
    for name in names:
        value = getattr(obj, name)
        if value is not UNSET and len(value) == 4 and value == _NULL:
            setattr(obj, name, UNSET)


class AssistantMessage(_Message, tag="assistant"):
    # null is legal (and what SDKs send) when the turn is only tool calls.
    content: str | list[TextContentPart | RefusalContentPart] | None = None
    name: str | UnsetType = UNSET
    refusal: str | UnsetType | None = UNSET
    tool_calls: list[ToolCall] | UnsetType | None = UNSET
    function_call: Raw | UnsetType = UNSET
    audio: Raw | UnsetType = UNSET

    def __post_init__(self) -> None:
        _unset_nulls(self, ("function_call", "audio"))


class ToolMessage(_Message, tag="tool"):
    content: TextOnlyContent
    tool_call_id: str


class FunctionMessage(_Message, tag="function"):
    """The deprecated `function` role, kept so old clients still pass validation."""

    content: str | None
    name: str


Message = (
    SystemMessage
    | DeveloperMessage
    | UserMessage
    | AssistantMessage
    | ToolMessage
    | FunctionMessage
)


def _require_object(value: Raw | UnsetType) -> None:
    """Raw pass-through fields that must hold a JSON object (checked without decoding it)."""
    if value is not UNSET and not bytes(value).lstrip().startswith(b"{"):
        raise ValueError("Expected a JSON object")


class FunctionDefinition(msgspec.Struct, omit_defaults=True):
    name: Annotated[str, msgspec.Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")]
    description: str | UnsetType = UNSET
    parameters: Raw | UnsetType = UNSET
    strict: bool | UnsetType | None = UNSET

    def __post_init__(self) -> None:
        _require_object(self.parameters)


class _Tool(msgspec.Struct, tag_field="type", omit_defaults=True):
    pass


class FunctionTool(_Tool, tag="function"):
    function: FunctionDefinition


class CustomTool(_Tool, tag="custom"):
    custom: Raw


class NamedFunction(msgspec.Struct):
    name: str


class ToolChoiceFunction(_Tool, tag="function"):
    function: NamedFunction


class ToolChoiceCustom(_Tool, tag="custom"):
    custom: NamedFunction


class ToolChoiceAllowedTools(_Tool, tag="allowed_tools"):
    allowed_tools: Raw


ToolChoice = (
    Literal["none", "auto", "required"]
    | ToolChoiceFunction
    | ToolChoiceCustom
    | ToolChoiceAllowedTools
)


class _Format(msgspec.Struct, tag_field="type", omit_defaults=True):
    pass


class TextFormat(_Format, tag="text"):
    pass


class JSONObjectFormat(_Format, tag="json_object"):
    pass


class JSONSchemaSpec(msgspec.Struct, omit_defaults=True):
    name: Annotated[str, msgspec.Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]
    description: str | UnsetType = UNSET
    schema: Raw | UnsetType = UNSET
    strict: bool | UnsetType | None = UNSET

    def __post_init__(self) -> None:
        _require_object(self.schema)


class JSONSchemaFormat(_Format, tag="json_schema"):
    json_schema: JSONSchemaSpec


ResponseFormat = TextFormat | JSONObjectFormat | JSONSchemaFormat


class StreamOptions(msgspec.Struct, omit_defaults=True):
    include_usage: bool | UnsetType | None = UNSET
    include_obfuscation: bool | UnsetType | None = UNSET


def wants_usage(options: StreamOptions | UnsetType | None) -> bool:
    """True when the client asked for the final usage chunk of a stream."""
    return isinstance(options, StreamOptions) and options.include_usage is True


Metadata = Annotated[
    dict[Annotated[str, msgspec.Meta(max_length=64)], Annotated[str, msgspec.Meta(max_length=512)]],
    msgspec.Meta(max_length=16),
]
# The largest output limit a request may set: Gemini's `maxOutputTokens` is an int32 and no model
# writes more. Larger ones are refused (400) before admission holds them: the Redis-shared
# limits' scripts count holds in int64 and Lua numbers, where they would stop being exact.
MAX_OUTPUT_TOKENS = 2**31 - 1
MaxTokens = Annotated[int, msgspec.Meta(ge=1, le=MAX_OUTPUT_TOKENS)]
ReasoningEffort = Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"]


class ChatCompletionRequest(msgspec.Struct, omit_defaults=True):
    """`POST /v1/chat/completions` body. `model` may be absent only on `/api/v1/chat`."""

    messages: Annotated[list[Message], msgspec.Meta(min_length=1)]
    model: Annotated[str, msgspec.Meta(min_length=1)] | UnsetType = UNSET
    stream: bool | UnsetType | None = UNSET
    stream_options: StreamOptions | UnsetType | None = UNSET
    max_tokens: MaxTokens | UnsetType | None = UNSET
    max_completion_tokens: MaxTokens | UnsetType | None = UNSET
    temperature: Temperature | UnsetType | None = UNSET
    top_p: TopP | UnsetType | None = UNSET
    # Not an OpenAI field: Anthropic, Gemini and vLLM take it (vLLM: -1 or 0 mean no limit).
    top_k: int | float | UnsetType | None = UNSET
    n: Annotated[int, msgspec.Meta(ge=1, le=128)] | UnsetType | None = UNSET
    stop: str | Annotated[list[str], msgspec.Meta(max_length=4)] | UnsetType | None = UNSET
    seed: int | UnsetType | None = UNSET
    presence_penalty: Penalty | UnsetType | None = UNSET
    frequency_penalty: Penalty | UnsetType | None = UNSET
    logit_bias: dict[str, Annotated[int, msgspec.Meta(ge=-100, le=100)]] | UnsetType | None = UNSET
    logprobs: bool | UnsetType | None = UNSET
    top_logprobs: Annotated[int, msgspec.Meta(ge=0, le=20)] | UnsetType | None = UNSET
    tools: list[FunctionTool | CustomTool] | UnsetType | None = UNSET
    tool_choice: ToolChoice | UnsetType | None = UNSET
    parallel_tool_calls: bool | UnsetType | None = UNSET
    response_format: ResponseFormat | UnsetType | None = UNSET
    user: str | UnsetType | None = UNSET
    safety_identifier: str | UnsetType | None = UNSET
    prompt_cache_key: str | UnsetType | None = UNSET
    metadata: Metadata | UnsetType | None = UNSET
    store: bool | UnsetType | None = UNSET
    reasoning_effort: ReasoningEffort | UnsetType | None = UNSET
    # Not an OpenAI field: Anthropic-style {"type": "enabled", "budget_tokens": N}.
    thinking: Raw | UnsetType = UNSET
    modalities: list[str] | UnsetType | None = UNSET
    audio: Raw | UnsetType = UNSET
    prediction: Raw | UnsetType = UNSET
    service_tier: str | UnsetType | None = UNSET
    verbosity: Literal["low", "medium", "high"] | UnsetType | None = UNSET
    web_search_options: Raw | UnsetType = UNSET
    functions: Raw | UnsetType = UNSET
    function_call: Raw | UnsetType = UNSET

    def __post_init__(self) -> None:
        # Nearly every request sends none of these: six tests, not a loop of getattr calls.
        if (
            self.thinking is not UNSET
            or self.audio is not UNSET
            or self.prediction is not UNSET
            or self.web_search_options is not UNSET
            or self.functions is not UNSET
            or self.function_call is not UNSET
        ):
            _unset_nulls(self, _RAW_FIELDS)

    @property
    def is_stream(self) -> bool:
        return self.stream is True

    @property
    def streamed_choices(self) -> int:
        """The choices a stream of this request answers with (indexes 0 to this - 1)."""
        return self.n if isinstance(self.n, int) else 1

    @property
    def wants_usage(self) -> bool:
        return wants_usage(self.stream_options)

    @property
    def token_limit(self) -> int | None:
        value = self.max_completion_tokens
        if isinstance(value, int):
            return value
        value = self.max_tokens
        return value if isinstance(value, int) else None

    @property
    def largest_token_limit(self) -> int | None:
        """The larger of `max_tokens` and `max_completion_tokens` when both are set: both go
        to an OpenAI-compatible upstream as sent, and which one wins is its choice, so
        admission holds the larger."""
        old, new = self.max_tokens, self.max_completion_tokens
        if isinstance(old, int):
            return max(old, new) if isinstance(new, int) else old
        return new if isinstance(new, int) else None


_RAW_FIELDS = (
    "thinking",
    "audio",
    "prediction",
    "web_search_options",
    "functions",
    "function_call",
)

# ---- responses -------------------------------------------------------------------------------


class ImageOutput(msgspec.Struct):
    """A generated image in a chat message (gateway extension, for image-output models)."""

    image_url: ImageURL
    type: Literal["image_url"] = "image_url"


class ChatMessage(msgspec.Struct):
    # content and refusal are encoded even when null: the SDK and spec expect the keys;
    # UNSET fields are left out of the JSON.
    content: str | None = None
    refusal: str | None = None
    role: Literal["assistant"] = "assistant"
    tool_calls: list[ToolCall] | UnsetType = UNSET
    # Extensions for translated providers (as DeepSeek, OpenRouter and LiteLLM send them):
    # thinking text, and images from image-output models.
    reasoning_content: str | UnsetType = UNSET
    images: list[ImageOutput] | UnsetType = UNSET


class Choice(msgspec.Struct):
    index: int
    message: ChatMessage
    finish_reason: str | None
    logprobs: Raw | None = None


class ChatCompletion(msgspec.Struct):
    id: str
    created: int
    model: str
    choices: list[Choice]
    object: Literal["chat.completion"] = "chat.completion"
    usage: Usage | UnsetType = UNSET
    system_fingerprint: str | UnsetType | None = UNSET
    service_tier: str | UnsetType | None = UNSET


class CompletionView(msgspec.Struct):
    """What the translators to other APIs (Responses, Messages) read of a whole chat
    completion: its `usage` is read apart (`_translate.completion_usage`), so a count no one
    can believe costs the answer its usage, not the client its answer."""

    id: str
    created: int
    model: str
    choices: list[Choice]
    object: Literal["chat.completion"] = "chat.completion"
    usage: Raw | UnsetType = UNSET


class DeltaFunction(msgspec.Struct):
    name: str | UnsetType = UNSET
    arguments: str | UnsetType = UNSET


class DeltaToolCall(msgspec.Struct):
    """One tool-call fragment; `id`, `type` and `name` appear only in a call's first fragment."""

    index: int
    id: str | UnsetType = UNSET
    type: Literal["function"] | UnsetType = UNSET
    function: DeltaFunction | UnsetType = UNSET


class Delta(msgspec.Struct):
    role: Literal["assistant"] | UnsetType = UNSET
    content: str | UnsetType | None = UNSET
    refusal: str | UnsetType | None = UNSET
    tool_calls: list[DeltaToolCall] | UnsetType = UNSET
    reasoning_content: str | UnsetType = UNSET
    images: list[ImageOutput] | UnsetType = UNSET


class ChunkChoice(msgspec.Struct):
    index: int
    delta: Delta
    finish_reason: str | None = None
    logprobs: Raw | None = None


class ChatCompletionChunk(msgspec.Struct):
    id: str
    created: int
    model: str
    choices: list[ChunkChoice]
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    usage: Usage | UnsetType | None = UNSET
    system_fingerprint: str | UnsetType | None = UNSET


class ChunkView(msgspec.Struct):
    """What the translators to other APIs (Responses, Messages) read of a chat chunk: not its
    `usage`, which the provider's relay accounted already (one it cannot believe is an
    estimated usage row, not a broken stream: the translator's own usage comes from the
    call)."""

    id: str
    created: int
    model: str
    choices: list[ChunkChoice]
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
