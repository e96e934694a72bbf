"""Anthropic's Messages API behind the OpenAI chat interface: requests, answers and streams.

System and developer messages become the top-level `system`; tool results become
`tool_result` blocks in user turns; consecutive same-role turns are merged because the API
demands alternation. JSON mode is a forced `json_tool_call` tool whose input comes back as the
message content (or, when a tool cannot be forced, native `output_config` structured output).
`reasoning_effort` becomes a thinking budget. Fields Anthropic cannot honour (`n > 1`,
`logprobs`, penalties, `seed`, audio) are refused with a 400 rather than silently dropped.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Literal

import aiohttp
import msgspec
from msgspec import UNSET, Raw, UnsetType

from gateway.errors import InvalidRequest, UpstreamError, UpstreamUnavailable
from gateway.providers._http import UpstreamClient
from gateway.providers._translate import (
    ChunkWriter,
    completion_body,
    data_url,
    joined_text,
    message,
    object_arguments,
    unsupported,
)
from gateway.providers.base import ChatCall, ChatReply
from gateway.schemas.chat import (
    AssistantMessage,
    ChatCompletionRequest,
    Choice,
    CustomTool,
    DeveloperMessage,
    FileContentPart,
    FunctionCall,
    FunctionMessage,
    ImageContentPart,
    InputAudioPart,
    JSONObjectFormat,
    JSONSchemaFormat,
    RefusalContentPart,
    SystemMessage,
    TextContentPart,
    ToolCall,
    ToolChoiceFunction,
    ToolMessage,
    UserMessage,
)
from gateway.schemas.common import CompletionTokensDetails, PromptTokensDetails, Usage
from gateway.settings import ProviderConfig

__all__ = ["AnthropicProvider", "from_anthropic", "to_anthropic"]

API_VERSION = "2023-06-01"
PROVIDER = "Anthropic"
JSON_TOOL = "json_tool_call"  # the forced tool that carries JSON-mode answers (LiteLLM's name)
IMAGE_TYPES = frozenset({"image/jpeg", "image/png", "image/gif", "image/webp"})
# reasoning_effort → thinking budget (tokens); Anthropic's minimum budget is 1024.
THINKING_BUDGETS = {
    "minimal": 1024,
    "low": 1024,
    "medium": 2048,
    "high": 4096,
    "xhigh": 8192,
    "max": 16384,
}
MIN_THINKING_BUDGET = 1024
FINISH_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}
_TOOL_ID = re.compile(r"^[A-Za-z0-9_-]{1,256}$")
_TOOL_ID_BAD = re.compile(r"[^A-Za-z0-9_-]")
_ANY_OBJECT = Raw(b'{"type":"object","properties":{},"additionalProperties":true}')
_NO_ARGS = Raw(b'{"type":"object","properties":{}}')

# ---- wire structs: what we send ------------------------------------------------------------


class _Block(msgspec.Struct, tag_field="type", omit_defaults=True):
    pass


class AnthropicText(_Block, tag="text"):
    text: str


class _Source(msgspec.Struct, tag_field="type"):
    pass


class AnthropicBase64Source(_Source, tag="base64"):
    media_type: str
    data: str


class AnthropicURLSource(_Source, tag="url"):
    url: str


class AnthropicImage(_Block, tag="image"):
    source: AnthropicBase64Source | AnthropicURLSource


class AnthropicDocument(_Block, tag="document"):
    source: AnthropicBase64Source | AnthropicURLSource


class AnthropicToolUse(_Block, tag="tool_use"):
    id: str
    name: str
    input: Raw


class AnthropicToolResult(_Block, tag="tool_result"):
    tool_use_id: str
    content: str


AnthropicBlock = (
    AnthropicText | AnthropicImage | AnthropicDocument | AnthropicToolUse | AnthropicToolResult
)


class AnthropicMessage(msgspec.Struct):
    role: Literal["user", "assistant"]
    content: list[AnthropicBlock]


class AnthropicTool(msgspec.Struct, omit_defaults=True):
    name: str
    input_schema: Raw
    description: str | UnsetType = UNSET


class AnthropicToolChoice(msgspec.Struct, omit_defaults=True):
    type: Literal["auto", "any", "tool", "none"]
    name: str | UnsetType = UNSET
    disable_parallel_tool_use: bool | UnsetType = UNSET


class AnthropicRequest(msgspec.Struct, omit_defaults=True):
    model: str
    max_tokens: int
    messages: list[AnthropicMessage]
    system: list[AnthropicText] | UnsetType = UNSET
    stop_sequences: list[str] | UnsetType = UNSET
    temperature: float | UnsetType = UNSET
    top_p: float | UnsetType = UNSET
    tools: list[AnthropicTool] | UnsetType = UNSET
    tool_choice: AnthropicToolChoice | UnsetType = UNSET
    thinking: Raw | UnsetType = UNSET
    metadata: dict[str, str] | UnsetType = UNSET
    output_config: Raw | UnsetType = UNSET
    stream: bool | UnsetType = UNSET


# ---- wire structs: what we read (unknown block and event types are tolerated) ---------------


class AnthropicUsage(msgspec.Struct):
    input_tokens: int | None = None
    output_tokens: int | None = None
    cache_creation_input_tokens: int | None = None
    cache_read_input_tokens: int | None = None


class _ContentBlock(msgspec.Struct):
    type: str
    text: str = ""
    thinking: str = ""
    id: str = ""
    name: str = ""
    input: Raw | UnsetType = UNSET


class AnthropicResponse(msgspec.Struct):
    id: str = ""
    model: str = ""
    content: list[_ContentBlock] = []
    stop_reason: str | None = None
    usage: AnthropicUsage = msgspec.field(default_factory=AnthropicUsage)


class _Delta(msgspec.Struct):
    type: str = ""
    text: str = ""
    partial_json: str = ""
    thinking: str = ""
    stop_reason: str | None = None


class _ErrorBody(msgspec.Struct):
    type: str = ""
    message: str = ""


class _Event(msgspec.Struct):
    type: str
    message: AnthropicResponse | None = None
    index: int = 0
    content_block: _ContentBlock | None = None
    delta: _Delta | None = None
    usage: AnthropicUsage | None = None
    error: _ErrorBody | None = None


_ENCODER = msgspec.json.Encoder()
_RESPONSE = msgspec.json.Decoder(AnthropicResponse)
_EVENT = msgspec.json.Decoder(_Event)

# ---- OpenAI request → Anthropic request ------------------------------------------------------


def tool_id(call_id: str) -> str:
    """An id Anthropic accepts (`[A-Za-z0-9_-]`), applied alike to tool calls and results.

    Ids minted by other providers may carry suffixes (e.g. a Gemini thought signature) or
    characters Anthropic refuses; the rewrite is deterministic so a call and its result match.
    """
    call_id = call_id.split("__thought__", 1)[0]
    if _TOOL_ID.match(call_id):
        return call_id
    cleaned = _TOOL_ID_BAD.sub("_", call_id)[:200]
    return f"{cleaned}_{hashlib.sha256(call_id.encode()).hexdigest()[:8]}"


def _image(url: str, param: str) -> AnthropicImage | AnthropicDocument:
    parsed = data_url(url)
    if parsed is not None:
        source = AnthropicBase64Source(media_type=parsed.mime, data=parsed.data)
        if parsed.mime in IMAGE_TYPES:
            return AnthropicImage(source=source)
        if parsed.mime == "application/pdf":
            return AnthropicDocument(source=source)
        raise InvalidRequest(
            f"Invalid value for '{param}': {PROVIDER} accepts JPEG, PNG, GIF and WebP images "
            f"and PDF documents, not '{parsed.mime}'.",
            param=param,
        )
    if url.startswith(("https://", "http://")):
        return AnthropicImage(source=AnthropicURLSource(url=url))  # Anthropic fetches it itself
    raise InvalidRequest(
        f"Invalid value for '{param}': expected an http(s) URL or a base64 data URL.", param=param
    )


def _file(part: FileContentPart, param: str) -> AnthropicDocument | AnthropicImage:
    fields = msgspec.json.decode(part.file)
    file_data = fields.get("file_data") if isinstance(fields, dict) else None
    if not isinstance(file_data, str):
        raise unsupported(PROVIDER, param, "only inline files (file_data) can be sent")
    return _image(file_data, param)


def _user_blocks(msg: UserMessage, at: str) -> list[AnthropicBlock]:
    if isinstance(msg.content, str):
        return [AnthropicText(msg.content)] if msg.content.strip() else []
    blocks: list[AnthropicBlock] = []
    for j, part in enumerate(msg.content):
        param = f"{at}.content[{j}]"
        if isinstance(part, TextContentPart):
            if part.text.strip():
                blocks.append(AnthropicText(part.text))
        elif isinstance(part, ImageContentPart):
            blocks.append(_image(part.image_url.url, f"{param}.image_url.url"))
        elif isinstance(part, FileContentPart):
            blocks.append(_file(part, f"{param}.file"))
        elif isinstance(part, InputAudioPart):
            raise unsupported(PROVIDER, param, "audio input cannot be sent to Anthropic")
        elif isinstance(part, RefusalContentPart):
            blocks.append(AnthropicText(part.refusal))
    return blocks


def _assistant_blocks(msg: AssistantMessage, at: str) -> list[AnthropicBlock]:
    blocks: list[AnthropicBlock] = []
    if isinstance(msg.content, str):
        if msg.content.strip():
            blocks.append(AnthropicText(msg.content))
    elif msg.content is not None:
        for part in msg.content:
            text = part.text if isinstance(part, TextContentPart) else part.refusal
            if text.strip():
                blocks.append(AnthropicText(text))
    for j, call in enumerate(msg.tool_calls or ()):
        args = object_arguments(call.function.arguments, f"{at}.tool_calls[{j}].function.arguments")
        blocks.append(AnthropicToolUse(id=tool_id(call.id), name=call.function.name, input=args))
    return blocks


def _turns(req: ChatCompletionRequest) -> tuple[list[AnthropicText], list[AnthropicMessage]]:
    """System blocks, and the conversation as alternating user/assistant turns."""
    system: list[AnthropicText] = []
    turns: list[AnthropicMessage] = []
    for i, msg in enumerate(req.messages):
        at = f"messages[{i}]"
        role: Literal["user", "assistant"] = "user"
        blocks: list[AnthropicBlock]
        if isinstance(msg, SystemMessage | DeveloperMessage):
            text = joined_text(msg.content)
            if text.strip():
                system.append(AnthropicText(text))
            continue
        if isinstance(msg, UserMessage):
            blocks = _user_blocks(msg, at)
        elif isinstance(msg, AssistantMessage):
            role, blocks = "assistant", _assistant_blocks(msg, at)
        elif isinstance(msg, ToolMessage):
            text = joined_text(msg.content)
            blocks = [AnthropicToolResult(tool_use_id=tool_id(msg.tool_call_id), content=text)]
        elif isinstance(msg, FunctionMessage):
            raise unsupported(PROVIDER, f"{at}.role", "use tools instead of the legacy functions")
        if not blocks:
            continue
        if turns and turns[-1].role == role:
            turns[-1].content.extend(blocks)  # the API demands alternating roles
        else:
            turns.append(AnthropicMessage(role=role, content=blocks))
    for turn in turns:
        if turn.role == "user":
            # In a user turn, tool results must come before anything else.
            turn.content.sort(key=lambda b: not isinstance(b, AnthropicToolResult))
    if turns and turns[0].role == "assistant":
        turns.insert(0, AnthropicMessage(role="user", content=[AnthropicText(".")]))
    if turns and turns[-1].role == "assistant":
        # A final assistant turn is a prefill, which must not end with whitespace.
        last = turns[-1].content[-1]
        if isinstance(last, AnthropicText):
            last.text = last.text.rstrip()
    if not turns:
        raise InvalidRequest(
            "The messages must include at least one non-empty user or assistant message.",
            param="messages",
        )
    return system, turns


def _refuse_unsupported(req: ChatCompletionRequest) -> None:
    if isinstance(req.n, int) and req.n > 1:
        raise unsupported(PROVIDER, "n", "it returns one choice per request")
    if req.logprobs is True or isinstance(req.top_logprobs, int):
        raise unsupported(PROVIDER, "logprobs" if req.logprobs is True else "top_logprobs")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(req, name) not in (UNSET, None, 0, 0.0):
            raise unsupported(PROVIDER, name)
    if req.logit_bias:
        raise unsupported(PROVIDER, "logit_bias")
    if isinstance(req.seed, int):
        raise unsupported(PROVIDER, "seed", "Anthropic has no deterministic sampling")
    if req.audio is not UNSET or (req.modalities and set(req.modalities) - {"text"}):
        raise unsupported(PROVIDER, "modalities", "only text output is available")
    if req.prediction is not UNSET:
        raise unsupported(PROVIDER, "prediction")
    if req.functions is not UNSET or req.function_call is not UNSET:
        raise unsupported(PROVIDER, "functions", "use tools instead of the legacy functions")


def _tools(req: ChatCompletionRequest, turns: list[AnthropicMessage]) -> list[AnthropicTool]:
    tools: list[AnthropicTool] = []
    for i, tool in enumerate(req.tools or ()):
        if isinstance(tool, CustomTool):
            raise unsupported(PROVIDER, f"tools[{i}]", "only function tools are available")
        fn = tool.function
        tools.append(
            AnthropicTool(
                name=fn.name,
                input_schema=fn.parameters if fn.parameters is not UNSET else _NO_ARGS,
                description=fn.description,
            )
        )
    if not tools:
        # Anthropic refuses tool history without tool definitions: declare the tools the
        # history used (the request offers none, so tool_choice becomes "none").
        used = {b.name: None for t in turns for b in t.content if isinstance(b, AnthropicToolUse)}
        tools = [AnthropicTool(name=name, input_schema=_ANY_OBJECT) for name in used]
    return tools


def _tool_choice(req: ChatCompletionRequest, offered: bool) -> AnthropicToolChoice | UnsetType:
    choice = req.tool_choice
    if choice in (UNSET, None):
        if req.parallel_tool_calls is False and offered:
            return AnthropicToolChoice(type="auto", disable_parallel_tool_use=True)
        return UNSET
    if not offered:
        raise InvalidRequest(
            "'tool_choice' is only allowed when 'tools' are specified.", param="tool_choice"
        )
    no_parallel = True if req.parallel_tool_calls is False else UNSET
    if choice == "none":
        return AnthropicToolChoice(type="none")
    if choice == "auto":
        return AnthropicToolChoice(type="auto", disable_parallel_tool_use=no_parallel)
    if choice == "required":
        return AnthropicToolChoice(type="any", disable_parallel_tool_use=no_parallel)
    if isinstance(choice, ToolChoiceFunction):
        return AnthropicToolChoice(
            type="tool", name=choice.function.name, disable_parallel_tool_use=no_parallel
        )
    raise unsupported(PROVIDER, "tool_choice", "use none, auto, required or a named function")


def _thinking(call: ChatCall, max_tokens: int) -> tuple[Raw | UnsetType, int]:
    """The `thinking` object for a reasoning model, and the max_tokens it needs."""
    req = call.request
    if not call.model.reasoning:
        return UNSET, max_tokens
    if req.thinking is not UNSET:
        return req.thinking, max_tokens  # already in Anthropic's own shape
    effort = req.reasoning_effort
    if not isinstance(effort, str):
        return UNSET, max_tokens
    if effort == "none":
        return Raw(b'{"type":"disabled"}'), max_tokens
    budget = THINKING_BUDGETS[effort]
    if req.token_limit is None:
        max_tokens += budget  # the default limit is for the answer; thinking comes on top
    elif max_tokens <= budget:
        budget = max_tokens - 1  # the client's limit counts thinking, as OpenAI's does
        if budget < MIN_THINKING_BUDGET:
            raise InvalidRequest(
                f"With reasoning_effort '{effort}', max_tokens must be more than "
                f"{MIN_THINKING_BUDGET} for {PROVIDER} models.",
                param="max_completion_tokens",
            )
    return Raw(b'{"type":"enabled","budget_tokens":%d}' % budget), max_tokens


def _ends_in_tool_results(turns: list[AnthropicMessage]) -> bool:
    return turns[-1].role == "user" and any(
        isinstance(b, AnthropicToolResult) for b in turns[-1].content
    )


def to_anthropic(
    call: ChatCall, default_max_tokens: int, *, stream: bool = False
) -> tuple[AnthropicRequest, bool]:
    """Translate the client's request; returns it and whether JSON mode uses the forced tool.

    Raises:
        InvalidRequest: a field Anthropic cannot honour, or content it cannot take.
    """
    req = call.request
    _refuse_unsupported(req)
    system, turns = _turns(req)
    tools = _tools(req, turns)
    offered = bool(req.tools)
    tool_choice = _tool_choice(req, offered)
    if tools and not offered:
        tool_choice = AnthropicToolChoice(type="none")
    max_tokens = call.max_tokens or default_max_tokens
    thinking, max_tokens = _thinking(call, max_tokens)
    thinking_on = isinstance(thinking, Raw) and b'"enabled"' in bytes(thinking)
    if thinking_on and _ends_in_tool_results(turns):
        # Continuing a tool loop with thinking needs the earlier thinking blocks, which
        # OpenAI clients do not send back: this turn runs without thinking instead.
        thinking, thinking_on = UNSET, False
    out = AnthropicRequest(
        model=call.upstream_model,
        max_tokens=max_tokens,
        messages=turns,
        system=system or UNSET,
        tools=tools or UNSET,
        tool_choice=tool_choice,
        thinking=thinking,
        stream=True if stream else UNSET,
    )
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or ())
    stops = [s for s in stops if s.strip()]  # Anthropic rejects whitespace-only sequences
    if stops:
        out.stop_sequences = stops
    if not thinking_on:  # thinking forbids sampling changes
        if isinstance(req.temperature, float | int):
            out.temperature = min(float(req.temperature), 1.0)  # Anthropic's range is 0-1
        if isinstance(req.top_p, float | int):
            out.top_p = float(req.top_p)
    user = req.user if isinstance(req.user, str) else req.safety_identifier
    if isinstance(user, str) and user:
        out.metadata = {"user_id": user}
    json_tool = _json_mode(req, out, thinking_on)
    return out, json_tool


def _json_mode(req: ChatCompletionRequest, out: AnthropicRequest, thinking_on: bool) -> bool:
    fmt = req.response_format
    if isinstance(fmt, JSONSchemaFormat):
        schema = fmt.json_schema.schema if fmt.json_schema.schema is not UNSET else _ANY_OBJECT
    elif isinstance(fmt, JSONObjectFormat):
        schema = _ANY_OBJECT
    else:
        return False
    if thinking_on or req.tools:
        # A tool cannot be forced with thinking on, and forcing it would hide the client's
        # own tools: use Anthropic's native structured output instead.
        out.output_config = Raw(b'{"format":{"type":"json_schema","schema":%b}}' % bytes(schema))
        return False
    out.tools = [AnthropicTool(name=JSON_TOOL, input_schema=schema, description="Reply in JSON.")]
    out.tool_choice = AnthropicToolChoice(type="tool", name=JSON_TOOL)
    return True


# ---- Anthropic answer → OpenAI answer --------------------------------------------------------


def openai_usage(usage: AnthropicUsage) -> Usage:
    """Anthropic's input count excludes cache reads and writes; OpenAI's prompt count has all."""
    cached = usage.cache_read_input_tokens or 0
    prompt = (usage.input_tokens or 0) + cached + (usage.cache_creation_input_tokens or 0)
    completion = usage.output_tokens or 0
    return Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=prompt + completion,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=cached),
        completion_tokens_details=CompletionTokensDetails(reasoning_tokens=0),
    )


def finish_reason(stop_reason: str | None, json_tool: bool) -> str:
    reason = FINISH_REASONS.get(stop_reason or "end_turn", "stop")
    return "stop" if json_tool and reason == "tool_calls" else reason


def from_anthropic(resp: AnthropicResponse, json_tool: bool) -> tuple[bytes, Usage]:
    """An Anthropic `message` as an OpenAI `chat.completion` (encoded) and its usage."""
    texts: list[str] = []
    thoughts: list[str] = []
    calls: list[ToolCall] = []
    for block in resp.content:
        if block.type == "text":
            texts.append(block.text)
        elif block.type == "thinking":
            thoughts.append(block.thinking)
        elif block.type == "tool_use":
            args = bytes(block.input).decode() if block.input is not UNSET else "{}"
            if json_tool and block.name == JSON_TOOL:
                texts.append(args)
            else:
                calls.append(ToolCall(id=block.id, function=FunctionCall(block.name, args)))
    usage = openai_usage(resp.usage)
    msg = message("".join(texts) if texts else None, calls, reasoning="".join(thoughts))
    body = completion_body(
        id=f"chatcmpl-{resp.id}",
        model=resp.model,
        choices=[Choice(0, msg, finish_reason(resp.stop_reason, json_tool))],
        usage=usage,
    )
    return body, usage


@dataclass(slots=True)
class _BlockState:
    kind: str  # "text", "thinking", "tool", "json" (the forced JSON tool), or another type
    slot: int = 0  # the OpenAI tool-call index of a "tool" block
    has_arguments: bool = False


class AnthropicStream:
    """Turns Anthropic stream events into OpenAI chunks, one event at a time, nothing buffered.

    Content blocks map to OpenAI deltas: text to `content`, thinking to `reasoning_content`,
    tool_use to a tool call (its index counts tool calls only, not Anthropic's block index),
    and the forced JSON tool's argument fragments to `content`.
    """

    def __init__(self, call: ChatCall, provider: str, json_tool: bool) -> None:
        self.call = call
        self.provider = provider
        self.json_tool = json_tool
        self.writer: ChunkWriter | None = None
        self.usage = AnthropicUsage()
        self.finished = False
        self.done = False
        self._blocks: dict[int, _BlockState] = {}  # by Anthropic's block index

    def feed(self, data: bytes) -> list[bytes]:
        """The chunks for one upstream event.

        Raises:
            UpstreamError: the event is an error, or the stream is malformed.
        """
        try:
            event = _EVENT.decode(data)
        except msgspec.MsgspecError:
            raise UpstreamError(
                f"The upstream provider '{self.provider}' sent a malformed stream event."
            ) from None
        kind = event.type
        if kind == "message_start" and event.message is not None:
            msg = event.message
            self.writer = ChunkWriter(
                id=f"chatcmpl-{msg.id}",
                model=msg.model,
                include_usage=self.call.request.wants_usage,
            )
            self._merge_usage(msg.usage)
            start = self.writer.start()
            return [start] if start else []
        if kind == "error":
            raise self._error(event.error or _ErrorBody())
        writer = self.writer
        if writer is None:
            if kind == "ping":
                return []
            raise UpstreamError(
                f"The upstream provider '{self.provider}' sent '{kind}' before 'message_start'."
            )
        if kind == "content_block_start" and event.content_block is not None:
            return self._block_start(writer, event.index, event.content_block)
        if kind == "content_block_delta" and event.delta is not None:
            return self._block_delta(writer, event.index, event.delta)
        if kind == "content_block_stop":
            state = self._blocks.get(event.index)
            if state is not None and state.kind == "tool" and not state.has_arguments:
                return [writer.tool_arguments(state.slot, "{}")]  # a call without arguments
            return []
        if kind == "message_delta":
            if event.usage is not None:
                self._merge_usage(event.usage)
            if event.delta is not None and event.delta.stop_reason and not self.finished:
                self.finished = True
                return [writer.finish(finish_reason(event.delta.stop_reason, self.json_tool))]
            return []
        if kind == "message_stop":
            self.done = True
            usage = self.call.usage = openai_usage(self.usage)
            out = [] if self.finished else [writer.finish("stop")]
            return [*out, writer.usage(usage)] if writer.include_usage else out
        return []  # ping, and event types added after this was written

    def _merge_usage(self, usage: AnthropicUsage) -> None:
        for name in usage.__struct_fields__:
            value = getattr(usage, name)
            if value is not None:
                setattr(self.usage, name, value)

    def _block_start(self, writer: ChunkWriter, index: int, block: _ContentBlock) -> list[bytes]:
        if block.type == "tool_use":
            if self.json_tool and block.name == JSON_TOOL:
                self._blocks[index] = _BlockState("json")
                return []
            slot, chunk = writer.tool_start(block.id, block.name)
            self._blocks[index] = _BlockState("tool", slot)
            self.call.chunks += 1
            return [chunk]
        self._blocks[index] = _BlockState(block.type)
        if block.type == "text" and block.text:
            self.call.chunks += 1
            return [writer.text(block.text)]
        return []

    def _block_delta(self, writer: ChunkWriter, index: int, delta: _Delta) -> list[bytes]:
        state = self._blocks.get(index)
        if delta.type == "text_delta" and delta.text:
            self.call.chunks += 1
            return [writer.text(delta.text)]
        if delta.type == "thinking_delta" and delta.thinking:
            self.call.chunks += 1
            return [writer.reasoning(delta.thinking)]
        if delta.type == "input_json_delta" and delta.partial_json and state is not None:
            self.call.chunks += 1
            if state.kind == "json":
                return [writer.text(delta.partial_json)]
            state.has_arguments = True
            return [writer.tool_arguments(state.slot, delta.partial_json)]
        return []  # signature, citation and empty deltas carry nothing for OpenAI clients

    def _error(self, error: _ErrorBody) -> UpstreamError:
        text = f"The upstream provider '{self.provider}' failed mid-stream: "
        text += error.message or error.type or "unknown error"
        if error.type in ("overloaded_error", "api_error", "rate_limit_error"):
            return UpstreamUnavailable(text)
        return UpstreamError(text)


# ---- the adapter -----------------------------------------------------------------------------


class AnthropicProvider:
    """Adapter for `type = "anthropic"` providers."""

    def __init__(self, config: ProviderConfig, session: aiohttp.ClientSession) -> None:
        self.config = config
        self._http = UpstreamClient(config, session)
        self._url = f"{config.url}/v1/messages"
        self._headers: dict[str | None, dict[str, str]] = {}

    def _headers_for(self, call: ChatCall) -> dict[str, str]:
        headers = self._headers.get(call.api_key)
        if headers is None:
            headers = {
                "content-type": "application/json",
                "anthropic-version": API_VERSION,
                **self.config.headers,
            }
            if call.api_key:
                headers["x-api-key"] = call.api_key
            self._headers[call.api_key] = headers
        return headers

    def _body(self, call: ChatCall, *, stream: bool) -> tuple[bytes, bool]:
        request, json_tool = to_anthropic(call, self.config.default_max_tokens, stream=stream)
        return _ENCODER.encode(request), json_tool

    async def chat(self, call: ChatCall) -> ChatReply:
        body, json_tool = self._body(call, stream=False)
        data = await self._http.post(self._url, body, self._headers_for(call))
        call.first_byte_at = call.first_byte_at or time.monotonic()
        try:
            resp = _RESPONSE.decode(data)
        except msgspec.MsgspecError:
            raise UpstreamError(
                f"The upstream provider '{self.config.name}' returned a malformed message."
            ) from None
        out, call.usage = from_anthropic(resp, json_tool)
        return ChatReply(body=out, usage=call.usage)

    async def stream_chat(self, call: ChatCall) -> AsyncGenerator[list[bytes], None]:
        body, json_tool = self._body(call, stream=True)
        state = AnthropicStream(call, self.config.name, json_tool)
        async for batch in self._http.stream(self._url, body, self._headers_for(call)):
            if call.first_byte_at is None:
                call.first_byte_at = time.monotonic()
            out: list[bytes] = []
            try:
                for data in batch:
                    out.extend(state.feed(data))
                    if state.done:
                        break
            except UpstreamError:
                if out:
                    yield out  # what arrived before the error still reaches the client
                raise
            if out:
                yield out
            if state.done:
                return
        raise UpstreamError(
            f"The upstream provider '{self.config.name}' ended the stream before it was complete."
        )
