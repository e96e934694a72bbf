"""Anthropic Messages API structs on the gateway's side: the request clients send, and the
`message` and stream events the gateway writes when it translates a chat answer.

Requests are read leniently, since an Anthropic upstream gets them as they are: unknown fields
are tolerated, and a content block is one struct whatever its `type` (text, image, document,
tool_use, tool_result, thinking, and block types added after this was written), so only the
translation to chat refuses what it cannot express. What Anthropic itself constrains (roles,
`max_tokens`, sampling ranges, `tool_choice` types) is checked here, as a 400 naming the field.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import UNSET, Raw, UnsetType

from gateway.schemas.chat import MaxTokens

__all__ = [
    "AnthropicEvent",
    "MessageOut",
    "MessagesBlock",
    "MessagesRequest",
    "UsageOut",
]

# ---- what clients send ------------------------------------------------------------------------


class MessagesSource(msgspec.Struct):
    """An image or document source: `base64`, `url`, `text`, `content` or `file`."""

    type: str
    media_type: str | UnsetType | None = UNSET
    data: str | UnsetType | None = UNSET
    url: str | UnsetType | None = UNSET
    content: str | list[MessagesBlock] | UnsetType | None = UNSET


class MessagesBlock(msgspec.Struct):
    """Any content block; which fields it has depends on its `type`. `source` and `content`
    differ in shape between block types (a `search_result`'s source is a string), so they are
    kept raw and read by the translation only for the types it knows."""

    type: str
    text: str | UnsetType = UNSET
    source: Raw | UnsetType = UNSET
    id: str | UnsetType = UNSET
    name: str | UnsetType = UNSET
    input: Raw | UnsetType = UNSET
    tool_use_id: str | UnsetType = UNSET
    content: Raw | UnsetType = UNSET
    is_error: bool | UnsetType | None = UNSET
    title: str | UnsetType | None = UNSET


Content = str | list[MessagesBlock]

# What an image or document `source`, and a `tool_result`'s or document's `content`, hold.
SOURCE: msgspec.json.Decoder[MessagesSource] = msgspec.json.Decoder(MessagesSource)
BLOCKS: msgspec.json.Decoder[Content] = msgspec.json.Decoder(Content)


class MessagesMessage(msgspec.Struct):
    role: Literal["user", "assistant"]
    content: Content


class MessagesTool(msgspec.Struct):
    """A client tool (no `type`, or `custom`), or a server tool (`web_search_20250305`...)."""

    name: str | UnsetType = UNSET
    type: str | UnsetType | None = UNSET
    description: str | UnsetType | None = UNSET
    input_schema: Raw | UnsetType = UNSET
    max_uses: object = UNSET  # (a server tool's calls at most: billed a call each)

    @property
    def is_client_tool(self) -> bool:
        return self.type in (UNSET, None, "custom")


class MessagesToolChoice(msgspec.Struct):
    type: Literal["auto", "any", "tool", "none"]
    name: str | UnsetType = UNSET
    disable_parallel_tool_use: bool | UnsetType | None = UNSET


class MessagesThinking(msgspec.Struct):
    type: str  # enabled, disabled, adaptive
    budget_tokens: Annotated[int, msgspec.Meta(ge=0)] | UnsetType = UNSET


class MessagesMetadata(msgspec.Struct):
    user_id: str | UnsetType | None = UNSET


class MessagesFormat(msgspec.Struct):
    type: str
    schema: Raw | UnsetType = UNSET


class MessagesOutputConfig(msgspec.Struct):
    format: MessagesFormat | UnsetType | None = UNSET
    effort: str | UnsetType | None = UNSET


Unit = Annotated[float, msgspec.Meta(ge=0, le=1)]


class MessagesRequest(msgspec.Struct):
    """`POST /v1/messages` (and `/v1/messages/count_tokens`, which takes no `max_tokens`)."""

    model: Annotated[str, msgspec.Meta(min_length=1)]
    messages: list[MessagesMessage]  # (at least one, unless a thread continues: `handlers`)
    max_tokens: MaxTokens | UnsetType = UNSET
    system: Content | UnsetType | None = UNSET
    stop_sequences: list[str] | UnsetType | None = UNSET
    temperature: Unit | UnsetType | None = UNSET
    top_p: Unit | UnsetType | None = UNSET
    top_k: Annotated[int, msgspec.Meta(ge=0)] | UnsetType | None = UNSET
    tools: list[MessagesTool] | UnsetType | None = UNSET
    tool_choice: MessagesToolChoice | UnsetType | None = UNSET
    speed: str | UnsetType | None = UNSET  # (Anthropic's fast mode: billed at its own rates)
    fallbacks: Raw | UnsetType = UNSET  # (models tried after it: `handlers.messages`)
    thinking: MessagesThinking | UnsetType | None = UNSET
    metadata: MessagesMetadata | UnsetType | None = UNSET
    output_config: MessagesOutputConfig | UnsetType | None = UNSET
    stream: bool | UnsetType | None = UNSET
    # Only an Anthropic upstream can do these (remote MCP servers, code-execution containers,
    # conversation state it holds: a thread).
    mcp_servers: Raw | UnsetType = UNSET
    container: Raw | UnsetType = UNSET
    thread: Raw | UnsetType = UNSET
    diagnostics: Raw | UnsetType = UNSET  # (may name an earlier message: `handlers.messages`)

    @property
    def is_stream(self) -> bool:
        return self.stream is True


# ---- what the gateway writes ------------------------------------------------------------------


class _Block(msgspec.Struct, tag_field="type"):
    pass


class TextOut(_Block, tag="text"):
    text: str


class ThinkingOut(_Block, tag="thinking"):
    thinking: str
    signature: str = ""  # translated thinking carries no Anthropic signature


class ToolUseOut(_Block, tag="tool_use"):
    id: str
    name: str
    input: Raw


BlockOut = TextOut | ThinkingOut | ToolUseOut


class UsageOut(msgspec.Struct, kw_only=True):
    """`usage` of a `message` (and of `message_delta`, where the counts are final)."""

    input_tokens: int | UnsetType = UNSET
    cache_creation_input_tokens: int | UnsetType = UNSET
    cache_read_input_tokens: int | UnsetType = UNSET
    output_tokens: int


class MessageOut(msgspec.Struct, kw_only=True):
    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    model: str
    content: list[BlockOut]
    stop_reason: str | None = None
    stop_sequence: str | None = None
    usage: UsageOut


class _Event(msgspec.Struct, tag_field="type"):
    pass


class MessageStart(_Event, tag="message_start"):
    message: MessageOut


class BlockStart(_Event, tag="content_block_start"):
    index: int
    content_block: BlockOut


class Ping(_Event, tag="ping"):
    pass


class _Delta(msgspec.Struct, tag_field="type"):
    pass


class TextDelta(_Delta, tag="text_delta"):
    text: str


class ThinkingDelta(_Delta, tag="thinking_delta"):
    thinking: str


class JsonDelta(_Delta, tag="input_json_delta"):
    partial_json: str


class BlockDelta(_Event, tag="content_block_delta"):
    index: int
    delta: TextDelta | ThinkingDelta | JsonDelta


class BlockStop(_Event, tag="content_block_stop"):
    index: int


class StopDelta(msgspec.Struct):
    stop_reason: str | None
    stop_sequence: str | None = None


class MessageDelta(_Event, tag="message_delta"):
    delta: StopDelta
    usage: UsageOut


class MessageStop(_Event, tag="message_stop"):
    pass


class ErrorDetail(msgspec.Struct):
    type: str
    message: str
    details: dict[str, str] | UnsetType = UNSET  # (`error_code`: what the SDK's threads read)


class ErrorOut(_Event, tag="error"):
    """The error body (`request_id` set) and the stream's `error` event (without it)."""

    error: ErrorDetail
    request_id: str | UnsetType = UNSET


AnthropicEvent = (
    MessageStart
    | BlockStart
    | Ping
    | BlockDelta
    | BlockStop
    | MessageDelta
    | MessageStop
    | ErrorOut
)
