"""A Messages API request as the chat request it means, for upstreams that do not speak it.

The mapping is the Anthropic translation of `providers/anthropic/request.py` run backwards:
`system` becomes a system message; `tool_result` blocks become `tool` messages placed before
the rest of their user turn; `tool_use` blocks become the `tool_calls` of their assistant turn
(ids kept, `input` as the `arguments` string); images become `image_url` parts (base64 as a
data URL), PDF documents `file` parts and text documents text; `tools`, `tool_choice`
(`any` → `required`, `disable_parallel_tool_use` → `parallel_tool_calls: false`),
`stop_sequences`, `metadata.user_id` and `output_config.format` map to their chat fields.
`thinking` becomes `reasoning_effort` for models marked `reasoning` and is dropped for others;
earlier thinking blocks are dropped (chat upstreams cannot take them back).

What only Anthropic can do (server tools, remote MCP servers, containers, file ids, `top_k`,
block types chat has no place for) is not dropped silently: it becomes the translation's
`refusal`, the 400 a request gets when no route of its model speaks the Messages API.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, TypeVar

import msgspec
from msgspec import UNSET, UnsetType

from gateway.errors import InvalidRequest
from gateway.messages.schema import (
    BLOCKS,
    SOURCE,
    Content,
    MessagesBlock,
    MessagesMessage,
    MessagesRequest,
    MessagesTool,
)
from gateway.schemas.chat import (
    AssistantMessage,
    ChatCompletionRequest,
    ContentPart,
    FileContentPart,
    FunctionCall,
    FunctionDefinition,
    FunctionTool,
    ImageContentPart,
    ImageURL,
    JSONSchemaFormat,
    JSONSchemaSpec,
    Message,
    NamedFunction,
    ReasoningEffort,
    StreamOptions,
    SystemMessage,
    TextContentPart,
    ToolCall,
    ToolChoice,
    ToolChoiceFunction,
    ToolMessage,
    UserMessage,
)
from gateway.schemas.codec import encode, error_path, present

__all__ = ["THREAD_UNSUPPORTED", "Translation", "effort", "to_chat"]

# Anthropic's `error.details.error_code` for a `thread` it cannot take.
THREAD_UNSUPPORTED = "thread_unsupported_request"

T = TypeVar("T")

_FUNCTION = msgspec.json.Decoder(FunctionDefinition)
_EFFORTS: dict[str, ReasoningEffort] = {"low": "low", "medium": "medium", "high": "high"}
_CHOICES: dict[str, Literal["none", "auto", "required"]] = {
    "auto": "auto",
    "any": "required",
    "none": "none",
}


@dataclass(slots=True)
class Translation:
    """The chat request, and the 400 for what it had to leave out (None: nothing)."""

    chat: ChatCompletionRequest
    refusal: InvalidRequest | None = None


@dataclass(slots=True)
class _Builder:
    refusal: InvalidRequest | None = None
    messages: list[Message] = field(default_factory=list)

    def refuse(self, param: str, what: str) -> None:
        """Note the first part of the request that only an Anthropic upstream can take."""
        if self.refusal is None:
            self.refusal = InvalidRequest(
                f"The '{param}' parameter ({what}) can only be sent to models served by an "
                "Anthropic provider; this model's providers take the Messages API translated "
                "to chat completions.",
                param=param,
                code="unsupported_parameter",
            )


def effort(budget: int) -> ReasoningEffort:
    """A thinking budget as the reasoning effort of about that size."""
    if budget <= 1024:
        return "low"
    return "medium" if budget <= 4096 else "high"


def _blocks(content: Content) -> list[MessagesBlock]:
    return [MessagesBlock(type="text", text=content)] if isinstance(content, str) else content


def _text(blocks: list[MessagesBlock]) -> str:
    return "\n".join(b.text for b in blocks if b.type == "text" and isinstance(b.text, str))


def _source_part(b: _Builder, block: MessagesBlock, at: str) -> list[ContentPart]:
    """An image or document block as chat content parts."""
    source = _read(SOURCE, block.source, f"{at}.source")
    kind = source.type
    if kind == "base64" and isinstance(source.data, str) and isinstance(source.media_type, str):
        url = f"data:{source.media_type};base64,{source.data}"
        if block.type == "image":
            return [ImageContentPart(image_url=ImageURL(url=url))]
        name = block.title if isinstance(block.title, str) else "document.pdf"
        return [FileContentPart(file=msgspec.Raw(encode({"file_data": url, "filename": name})))]
    if kind == "url" and isinstance(source.url, str) and block.type == "image":
        return [ImageContentPart(image_url=ImageURL(url=source.url))]
    if kind == "text" and isinstance(source.data, str):
        return [TextContentPart(text=source.data)]
    if kind == "content" and isinstance(source.content, list):
        return [TextContentPart(text=_text(source.content))]
    b.refuse(f"{at}.source", f"a {kind} source")
    return []


def _read(decoder: msgspec.json.Decoder[T], raw: msgspec.Raw | UnsetType, at: str) -> T:
    """A block field kept raw, read for a block type the translation knows.

    Raises:
        InvalidRequest: the field is missing or malformed (named by its path).
    """
    if raw is UNSET:
        raise InvalidRequest(f"Missing required parameter: '{at}'.", param=at)
    try:
        return decoder.decode(raw)
    except msgspec.ValidationError as exc:
        problem = error_path(str(exc)).problem
        raise InvalidRequest(f"Invalid value for '{at}': {problem}", param=at) from None
    except (msgspec.DecodeError, RecursionError):
        raise InvalidRequest(f"Invalid value for '{at}': nested too deeply.", param=at) from None


def _user_turn(b: _Builder, blocks: list[MessagesBlock], at: str) -> None:
    """Tool results first (as `tool` messages), then the rest as one user message."""
    parts: list[ContentPart] = []
    for j, block in enumerate(blocks):
        where = f"{at}.content[{j}]"
        if block.type == "text" and isinstance(block.text, str):
            parts.append(TextContentPart(text=block.text))
        elif block.type in ("image", "document"):
            parts.extend(_source_part(b, block, where))
        elif block.type == "tool_result" and isinstance(block.tool_use_id, str):
            content = block.content
            result = [] if content is UNSET else _blocks(_read(BLOCKS, content, f"{where}.content"))
            text = _text(result)
            b.messages.append(ToolMessage(content=text, tool_call_id=block.tool_use_id))
            for k, inner in enumerate(result):  # images a tool returned follow as user parts
                if inner.type in ("image", "document"):
                    parts.extend(_source_part(b, inner, f"{where}.content[{k}]"))
        else:
            b.refuse(f"{where}.type", f"a '{block.type}' block")
    if parts:
        b.messages.append(UserMessage(content=parts))


def _assistant_turn(b: _Builder, blocks: list[MessagesBlock], at: str) -> None:
    texts: list[str] = []
    calls: list[ToolCall] = []
    for j, block in enumerate(blocks):
        if block.type == "text" and isinstance(block.text, str):
            texts.append(block.text)
        elif block.type == "tool_use" and isinstance(block.id, str) and isinstance(block.name, str):
            arguments = bytes(block.input).decode() if block.input is not UNSET else "{}"
            calls.append(ToolCall(id=block.id, function=FunctionCall(block.name, arguments)))
        elif block.type not in ("thinking", "redacted_thinking"):
            b.refuse(f"{at}.content[{j}].type", f"a '{block.type}' block")
    if texts or calls:
        content = "".join(texts) if texts else None
        b.messages.append(AssistantMessage(content=content, tool_calls=calls or UNSET))


def _messages(b: _Builder, req: MessagesRequest) -> None:
    if req.system:
        system = _text(_blocks(req.system))
        if system.strip():
            b.messages.append(SystemMessage(content=system))
    for i, msg in enumerate(req.messages):
        _turn(b, msg, f"messages[{i}]")


def _turn(b: _Builder, msg: MessagesMessage, at: str) -> None:
    if isinstance(msg.content, str):
        if msg.role == "user":
            b.messages.append(UserMessage(content=msg.content))
        else:
            b.messages.append(AssistantMessage(content=msg.content))
    elif msg.role == "user":
        _user_turn(b, msg.content, at)
    else:
        _assistant_turn(b, msg.content, at)


def _tools(b: _Builder, tools: list[MessagesTool]) -> list[FunctionTool]:
    out: list[FunctionTool] = []
    for i, tool in enumerate(tools):
        if not tool.is_client_tool or not isinstance(tool.name, str):
            b.refuse(f"tools[{i}]", f"the server tool '{tool.type}'")
            continue
        fields: dict[str, object] = {"name": tool.name}
        if tool.description:
            fields["description"] = tool.description
        if tool.input_schema is not UNSET:
            fields["parameters"] = tool.input_schema
        try:  # the name and schema as chat requests constrain them
            definition = _FUNCTION.decode(encode(fields))
        except msgspec.ValidationError:
            b.refuse(
                f"tools[{i}]",
                f"the tool '{tool.name[:64]}', named or shaped as chat tools cannot be",
            )
            continue
        out.append(FunctionTool(function=definition))
    return out


def _tool_choice(req: MessagesRequest) -> ToolChoice | None:
    choice = req.tool_choice
    if choice is UNSET or choice is None:
        return None
    if choice.type == "tool" and isinstance(choice.name, str):
        return ToolChoiceFunction(function=NamedFunction(name=choice.name))
    return _CHOICES.get(choice.type, "auto")


def to_chat(req: MessagesRequest, *, reasoning: bool) -> Translation:
    """The chat request for `req` (see the module doc); `reasoning`: the model reasons."""
    b = _Builder()
    _messages(b, req)
    chat = ChatCompletionRequest(messages=b.messages, model=req.model)
    if isinstance(req.max_tokens, int):
        chat.max_tokens = req.max_tokens
    if req.is_stream:
        chat.stream = True
        chat.stream_options = StreamOptions(include_usage=True)  # for the final message_delta
    if req.stop_sequences:
        chat.stop = list(req.stop_sequences)
    for name in ("temperature", "top_p"):
        value = getattr(req, name)
        if isinstance(value, int | float):
            setattr(chat, name, float(value))
    if isinstance(req.top_k, int):
        b.refuse("top_k", "top-k sampling")
    if req.tools:
        tools = _tools(b, req.tools)
        if tools:
            chat.tools = list(tools)
            choice = _tool_choice(req)
            if choice is not None:
                chat.tool_choice = choice
            if req.tool_choice and req.tool_choice.disable_parallel_tool_use is True:
                chat.parallel_tool_calls = False
    if req.metadata and isinstance(req.metadata.user_id, str):
        chat.user = req.metadata.user_id
    _output(req, chat, reasoning)
    if present(req.thread) and b.refusal is None:
        # (The code the `anthropic` SDK's threads read: it sends the whole conversation
        # again, without `thread`.)
        b.refusal = InvalidRequest(
            "The 'thread' parameter (conversation state the server holds) can only be sent to "
            "models served by an Anthropic provider; send the whole conversation instead.",
            param="thread",
            code=THREAD_UNSUPPORTED,
        )
    for name in ("mcp_servers", "container"):
        if getattr(req, name) is not UNSET:
            b.refuse(name, "a server-side feature")
    if not b.messages:
        if b.refusal is None:
            raise InvalidRequest(
                "The messages must include at least one non-empty message.", param="messages"
            )
        b.messages.append(UserMessage(content=""))  # only a native upstream will see it
    chat.messages = b.messages
    return Translation(chat=chat, refusal=b.refusal)


def _output(req: MessagesRequest, chat: ChatCompletionRequest, reasoning: bool) -> None:
    """Thinking (for reasoning models only) and structured output."""
    config = req.output_config if req.output_config else None
    thinking = req.thinking if req.thinking else None
    if reasoning and thinking is not None and thinking.type == "enabled":
        budget = thinking.budget_tokens if isinstance(thinking.budget_tokens, int) else 4096
        chat.reasoning_effort = effort(budget)
    elif reasoning and config is not None and isinstance(config.effort, str):
        chat.reasoning_effort = _EFFORTS.get(config.effort, UNSET)
    fmt = config.format if config is not None else None
    if fmt and fmt.type == "json_schema" and fmt.schema is not UNSET:
        spec = JSONSchemaSpec(name="output", schema=fmt.schema, strict=True)
        chat.response_format = JSONSchemaFormat(json_schema=spec)
