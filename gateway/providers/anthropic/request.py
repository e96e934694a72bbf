"""OpenAI chat request → Anthropic Messages request.

System and developer messages become the top-level `system`; tool results become
`tool_result` blocks in user turns; consecutive same-role turns are merged because the API
demands alternation. JSON mode is a forced `json_tool_call` tool (or, when a tool cannot be
forced, native `output_config` structured output). `reasoning_effort` becomes a thinking
budget. Fields Anthropic cannot honour (`n > 1`, `logprobs`, penalties, `seed`, audio) are
refused with a 400 rather than silently dropped.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Literal

from msgspec import UNSET, Raw, UnsetType

from gateway.errors import InvalidRequest
from gateway.providers._translate import (
    assistant_text,
    data_url,
    file_data,
    joined_text,
    nonzero,
    object_arguments,
    refuse_unsupported,
    stop_sequences,
    tool_choice_without_tools,
    top_k,
    unsupported,
)
from gateway.providers.anthropic.schema import object_schema, strict_schema
from gateway.providers.anthropic.wire import (
    AnthropicBase64Source,
    AnthropicBlock,
    AnthropicDocument,
    AnthropicImage,
    AnthropicMessage,
    AnthropicRequest,
    AnthropicText,
    AnthropicTool,
    AnthropicToolChoice,
    AnthropicToolResult,
    AnthropicToolUse,
    AnthropicURLSource,
)
from gateway.providers.base import ChatCall
from gateway.schemas.chat import (
    AssistantMessage,
    ChatCompletionRequest,
    CustomTool,
    DeveloperMessage,
    FileContentPart,
    FunctionMessage,
    ImageContentPart,
    InputAudioPart,
    JSONObjectFormat,
    JSONSchemaFormat,
    RefusalContentPart,
    SystemMessage,
    TextContentPart,
    ToolChoiceFunction,
    ToolMessage,
    UserMessage,
)

__all__ = ["JSON_TOOL", "PROVIDER", "JsonTool", "thinking_on_top", "to_anthropic", "tool_id"]

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
_TOOL_ID = re.compile(r"^[A-Za-z0-9_-]{1,256}$")
_TOOL_ID_BAD = re.compile(r"[^A-Za-z0-9_-]")
_ANY_OBJECT = Raw(b'{"type":"object","properties":{},"additionalProperties":true}')
_NO_ARGS = Raw(b'{"type":"object","properties":{}}')


@dataclass(frozen=True, slots=True)
class JsonTool:
    """JSON mode through the forced `json_tool_call` tool: the tool's input is the answer.

    `wrapped`: the client's schema is not an object, so the tool takes it as `{"values": ...}`
    and the answer is that value.
    """

    wrapped: bool = False


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
            blocks.append(_image(file_data(part, f"{param}.file", PROVIDER), f"{param}.file"))
        elif isinstance(part, InputAudioPart):
            raise unsupported(PROVIDER, param, "audio input cannot be sent to Anthropic")
        elif isinstance(part, RefusalContentPart):
            blocks.append(AnthropicText(part.refusal))
    return blocks


def _assistant_blocks(msg: AssistantMessage, at: str) -> list[AnthropicBlock]:
    text = assistant_text(msg)
    blocks: list[AnthropicBlock] = [AnthropicText(text)] if text.strip() else []
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
    refuse_unsupported(req, PROVIDER)
    if isinstance(req.n, int) and req.n > 1:
        raise unsupported(PROVIDER, "n", "it returns one choice per request")
    for name in ("presence_penalty", "frequency_penalty"):
        if nonzero(getattr(req, name)) is not None:
            raise unsupported(PROVIDER, name)
    if isinstance(req.seed, int):
        raise unsupported(PROVIDER, "seed", "Anthropic has no deterministic sampling")
    if req.audio is not UNSET or (req.modalities and set(req.modalities) - {"text"}):
        raise unsupported(PROVIDER, "modalities", "only text output is available")


def _tools(req: ChatCompletionRequest, turns: list[AnthropicMessage]) -> list[AnthropicTool]:
    tools: list[AnthropicTool] = []
    for i, tool in enumerate(req.tools or ()):
        if isinstance(tool, CustomTool):
            raise unsupported(PROVIDER, f"tools[{i}]", "only function tools are available")
        fn = tool.function
        schema = _NO_ARGS
        if fn.parameters is not UNSET:
            schema, wrapped = object_schema(fn.parameters, f"tools[{i}].function.parameters")
            if wrapped:
                raise InvalidRequest(
                    f"Invalid value for 'tools[{i}].function.parameters': the parameters of a "
                    "function must be a JSON schema of type 'object'.",
                    param=f"tools[{i}].function.parameters",
                )
        tools.append(AnthropicTool(name=fn.name, input_schema=schema, description=fn.description))
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
        raise tool_choice_without_tools()
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


def thinking_on_top(call: ChatCall) -> int:
    """The thinking budget `to_anthropic` adds to the output limit (0: none): a reasoning
    model's `reasoning_effort` when no one set a limit but the model's config, whose limit
    is for the answer alone. Admission holds it too (`AnthropicProvider.output_on_top`)."""
    req = call.request
    if req.token_limit is not None or call.output_cap is not None or req.thinking is not UNSET:
        return 0
    effort = req.reasoning_effort
    return (
        THINKING_BUDGETS.get(effort, 0) if call.model.reasoning and isinstance(effort, str) else 0
    )


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
    if on_top := thinking_on_top(call):
        max_tokens += on_top  # the default limit is for the answer; thinking comes on top
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


def _json_mode(
    req: ChatCompletionRequest, out: AnthropicRequest, thinking_on: bool
) -> JsonTool | None:
    """Set up JSON mode: a forced tool, or native structured output where none can be forced.

    A tool cannot be forced beside the client's own tools (it would hide them); a schema then
    goes to `output_config`, which also works with thinking. JSON without a schema has no
    native form, so it always takes the forced tool (thinking is then turned off).
    """
    fmt = req.response_format
    param = "response_format.json_schema.schema"
    if isinstance(fmt, JSONSchemaFormat) and fmt.json_schema.schema is not UNSET:
        if req.tools or thinking_on:
            schema = strict_schema(fmt.json_schema.schema, param)
            out.output_config = Raw(b'{"format":{"type":"json_schema","schema":%b}}' % schema)
            return None
        schema, wrapped = object_schema(fmt.json_schema.schema, param)
    elif isinstance(fmt, JSONObjectFormat | JSONSchemaFormat):
        if req.tools:
            raise unsupported(
                PROVIDER,
                "response_format",
                "JSON mode without a schema cannot be combined with tools; use json_schema",
            )
        schema, wrapped = _ANY_OBJECT, False
    else:
        return None
    json_tool = AnthropicTool(name=JSON_TOOL, input_schema=schema, description="Reply in JSON.")
    out.tools = [*(out.tools or ()), json_tool]
    out.tool_choice = AnthropicToolChoice(type="tool", name=JSON_TOOL)
    return JsonTool(wrapped=wrapped)


def _thinking_on(thinking: Raw | UnsetType) -> bool:
    return isinstance(thinking, Raw) and b'"disabled"' not in bytes(thinking)


def to_anthropic(
    call: ChatCall, default_max_tokens: int, *, stream: bool = False
) -> tuple[AnthropicRequest, JsonTool | None]:
    """Translate the client's request; returns it and, in JSON mode, the forced JSON tool.

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
    thinking, max_tokens = _thinking(call, call.max_tokens or default_max_tokens)
    out = AnthropicRequest(
        model=call.upstream_model,
        max_tokens=max_tokens,
        messages=turns,
        system=system or UNSET,
        tools=tools or UNSET,
        tool_choice=tool_choice,
        stream=True if stream else UNSET,
    )
    json_tool = _json_mode(req, out, _thinking_on(thinking))
    forced = isinstance(out.tool_choice, AnthropicToolChoice) and out.tool_choice.type in (
        "any",
        "tool",
    )
    if _thinking_on(thinking) and (forced or _ends_in_tool_results(turns)):
        # Anthropic refuses thinking with a forced tool, and continuing a tool loop with
        # thinking needs the earlier thinking blocks, which OpenAI clients do not send
        # back: such a turn runs without thinking.
        thinking = UNSET
    out.thinking = thinking
    stops = [s for s in stop_sequences(req) if s.strip()]  # whitespace-only ones are refused
    if stops:
        out.stop_sequences = stops
    if not _thinking_on(thinking):  # thinking forbids sampling changes
        if isinstance(req.temperature, float | int):
            out.temperature = min(float(req.temperature), 1.0)  # Anthropic's range is 0-1
        elif isinstance(req.top_p, float | int):
            # Recent models refuse temperature and top_p together; temperature wins.
            out.top_p = float(req.top_p)
        if (k := top_k(req)) is not None:
            out.top_k = k
    user = req.user if isinstance(req.user, str) else req.safety_identifier
    if isinstance(user, str) and user:
        out.metadata = {"user_id": user}
    return out, json_tool
