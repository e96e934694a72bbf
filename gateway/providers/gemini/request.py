"""OpenAI chat request → Gemini `generateContent` request.

System and developer messages become `systemInstruction`; assistant tool calls and tool
results become `functionCall`/`functionResponse` parts (a result's function name is found
through its `tool_call_id`); JSON Schemas are converted to Gemini's `Schema` subset. A call's
thought signature travels inside its id (`call_<hex>__thought__<signature>`, LiteLLM's
convention) so the next request can hand it back, as Gemini 3 requires. Images are sent
inline: the gateway never downloads a URL (it must not be made to fetch internal addresses),
so http(s) URLs other than Gemini Files API and YouTube URIs are refused with a 400.
"""

from __future__ import annotations

from typing import Literal

import msgspec
from msgspec import UNSET, Raw, UnsetType

from gateway.errors import InvalidRequest
from gateway.providers._translate import (
    assistant_text,
    data_url,
    file_data,
    joined_text,
    json_value,
    nonzero,
    object_arguments,
    refuse_unsupported,
    stop_sequences,
    tool_choice_without_tools,
    top_k,
    unsupported,
)
from gateway.providers.base import ChatCall
from gateway.providers.gemini.schema import UnsupportedSchema, to_gemini_schema
from gateway.providers.gemini.wire import (
    GeminiBlob,
    GeminiContent,
    GeminiFileData,
    GeminiFunctionCall,
    GeminiFunctionCallingConfig,
    GeminiFunctionDeclaration,
    GeminiFunctionResponse,
    GeminiGenerationConfig,
    GeminiPart,
    GeminiRequest,
    GeminiThinkingConfig,
    GeminiTool,
    GeminiToolConfig,
)
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
from gateway.schemas.codec import encode

__all__ = ["DUMMY_SIGNATURE", "PROVIDER", "join_call_id", "split_call_id", "to_gemini"]

PROVIDER = "Gemini"
SIGNATURE_SEP = "__thought__"
# Marks the ids Gemini itself gave a function call; only those are sent back to it.
GEMINI_ID = "gcall_"
# Accepted by Gemini 3 for history that has no real signature (e.g. from another provider).
DUMMY_SIGNATURE = "skip_thought_signature_validator"
# URLs Gemini reads itself: its Files API and YouTube. Anything else would need a download.
FILE_URL_PREFIXES = (
    "https://generativelanguage.googleapis.com/",
    "https://www.youtube.com/",
    "https://youtube.com/",
    "https://youtu.be/",
)
# reasoning_effort → Gemini 2.5 thinkingBudget (0 turns thinking off where the model allows).
THINKING_BUDGETS = {
    "none": 0,
    "minimal": 512,
    "low": 1024,
    "medium": 2048,
    "high": 4096,
    "xhigh": 16384,
    "max": 24576,
}
# Gemini 2.5 Pro cannot switch thinking off; its smallest budget stands for "none".
PRO_MIN_BUDGET = 128
# ... and → Gemini 3 thinkingLevel (thinking cannot be switched off there).
THINKING_LEVELS = {"none": "low", "minimal": "minimal", "low": "low", "medium": "medium"}
_NO_PARAMETERS = b'{"type":"OBJECT"}'


def split_call_id(call_id: str) -> tuple[str, str | None]:
    """(id, thought signature) from an id minted by `join_call_id`."""
    head, sep, signature = call_id.partition(SIGNATURE_SEP)
    return head, (signature or None) if sep else None


def join_call_id(call_id: str, signature: str | None) -> str:
    return f"{call_id}{SIGNATURE_SEP}{signature}" if signature else call_id


def _media(url: str, param: str) -> GeminiPart:
    parsed = data_url(url)
    if parsed is not None:
        return GeminiPart(inline_data=GeminiBlob(mime_type=parsed.mime, data=parsed.data))
    if url.startswith(FILE_URL_PREFIXES):
        return GeminiPart(file_data=GeminiFileData(file_uri=url))
    raise InvalidRequest(
        f"Invalid value for '{param}': {PROVIDER} models take images as base64 data URLs "
        "(or Gemini Files API / YouTube URLs); the gateway does not download other URLs.",
        param=param,
    )


def _user_parts(msg: UserMessage, at: str) -> list[GeminiPart]:
    if isinstance(msg.content, str):
        return [GeminiPart(text=msg.content)] if msg.content else []
    parts: list[GeminiPart] = []
    for j, part in enumerate(msg.content):
        param = f"{at}.content[{j}]"
        if isinstance(part, TextContentPart):
            if part.text:
                parts.append(GeminiPart(text=part.text))
        elif isinstance(part, ImageContentPart):
            parts.append(_media(part.image_url.url, f"{param}.image_url.url"))
        elif isinstance(part, InputAudioPart):
            audio = part.input_audio
            blob = GeminiBlob(mime_type=f"audio/{audio.format}", data=audio.data)
            parts.append(GeminiPart(inline_data=blob))
        elif isinstance(part, FileContentPart):
            url = file_data(part, f"{param}.file", PROVIDER)
            parts.append(_media(url, f"{param}.file.file_data"))
        elif isinstance(part, RefusalContentPart):
            parts.append(GeminiPart(text=part.refusal))
    return parts


def _model_parts(msg: AssistantMessage, at: str, gemini3: bool) -> list[GeminiPart]:
    text = assistant_text(msg)
    parts = [GeminiPart(text=text)] if text else []
    for j, call in enumerate(msg.tool_calls or ()):
        args = object_arguments(call.function.arguments, f"{at}.tool_calls[{j}].function.arguments")
        call_id, signature = split_call_id(call.id)
        if signature is None and gemini3 and j == 0:
            signature = DUMMY_SIGNATURE  # history from elsewhere has no signature to replay
        parts.append(
            GeminiPart(
                function_call=GeminiFunctionCall(
                    name=call.function.name, args=args, id=_gemini_id(call_id)
                ),
                thought_signature=signature if signature else UNSET,
            )
        )
    return parts


def _gemini_id(call_id: str) -> str | UnsetType:
    """The id Gemini gave a call, to send back; ids minted elsewhere are never sent."""
    return call_id[len(GEMINI_ID) :] if call_id.startswith(GEMINI_ID) else UNSET


def _tool_response(msg: ToolMessage, names: dict[str, str], at: str) -> GeminiPart:
    name = names.get(msg.tool_call_id)
    if name is None:
        raise InvalidRequest(
            f"Invalid value for '{at}.tool_call_id': no assistant tool call has the id "
            f"'{msg.tool_call_id}'.",
            param=f"{at}.tool_call_id",
        )
    text = joined_text(msg.content)
    output = json_value(text) or Raw(encode(text))  # JSON results stay structured
    response = Raw(b'{"output":%b}' % bytes(output))  # Gemini wants an object
    call_id = _gemini_id(split_call_id(msg.tool_call_id)[0])
    return GeminiPart(
        function_response=GeminiFunctionResponse(name=name, response=response, id=call_id)
    )


def _contents(
    req: ChatCompletionRequest, gemini3: bool
) -> tuple[list[GeminiPart], list[GeminiContent]]:
    system: list[GeminiPart] = []
    contents: list[GeminiContent] = []
    names = {
        call.id: call.function.name
        for m in req.messages
        if isinstance(m, AssistantMessage)
        for call in m.tool_calls or ()
    }
    for i, msg in enumerate(req.messages):
        at = f"messages[{i}]"
        role: Literal["user", "model"] = "user"
        if isinstance(msg, SystemMessage | DeveloperMessage):
            text = joined_text(msg.content)
            if text:
                system.append(GeminiPart(text=text))
            continue
        if isinstance(msg, UserMessage):
            parts = _user_parts(msg, at)
        elif isinstance(msg, AssistantMessage):
            role, parts = "model", _model_parts(msg, at, gemini3)
        elif isinstance(msg, ToolMessage):
            parts = [_tool_response(msg, names, at)]
        elif isinstance(msg, FunctionMessage):
            raise unsupported(PROVIDER, f"{at}.role", "use tools instead of the legacy functions")
        if not parts:
            continue
        last = contents[-1] if contents else None
        if last is not None and last.role == role:
            last.parts.extend(parts)  # one turn per role; all function responses in one turn
        else:
            contents.append(GeminiContent(role=role, parts=parts))
    if not contents:
        if not system:
            raise InvalidRequest(
                "The messages must include at least one non-empty message.", param="messages"
            )
        contents, system = [GeminiContent(role="user", parts=system)], []
    return system, contents


def _schema(raw: Raw, param: str) -> Raw:
    try:
        return Raw(encode(to_gemini_schema(msgspec.json.decode(raw))))
    except UnsupportedSchema as exc:
        raise InvalidRequest(
            f"Invalid value for '{param}': {PROVIDER} cannot use this JSON schema: {exc}",
            param=param,
        ) from None


def _tools(
    req: ChatCompletionRequest,
) -> tuple[list[GeminiTool] | UnsetType, GeminiToolConfig | UnsetType]:
    declarations: list[GeminiFunctionDeclaration] = []
    for i, tool in enumerate(req.tools or ()):
        if isinstance(tool, CustomTool):
            raise unsupported(PROVIDER, f"tools[{i}]", "only function tools are available")
        fn = tool.function
        params: Raw | UnsetType = UNSET
        if fn.parameters is not UNSET:
            params = _schema(fn.parameters, f"tools[{i}].function.parameters")
            if bytes(params) == _NO_PARAMETERS:
                params = UNSET  # a function without arguments declares no parameters
        declarations.append(
            GeminiFunctionDeclaration(name=fn.name, description=fn.description, parameters=params)
        )
    choice = req.tool_choice
    if choice in (UNSET, None):
        config: GeminiToolConfig | UnsetType = UNSET
    elif not declarations:
        raise tool_choice_without_tools()
    elif isinstance(choice, ToolChoiceFunction):
        mode = GeminiFunctionCallingConfig(
            mode="ANY", allowed_function_names=[choice.function.name]
        )
        config = GeminiToolConfig(function_calling_config=mode)
    elif isinstance(choice, str):
        modes: dict[str, Literal["AUTO", "ANY", "NONE"]] = {
            "none": "NONE",
            "auto": "AUTO",
            "required": "ANY",
        }
        mode = GeminiFunctionCallingConfig(mode=modes[choice])
        config = GeminiToolConfig(function_calling_config=mode)
    else:
        raise unsupported(PROVIDER, "tool_choice", "use none, auto, required or a named function")
    tools = [GeminiTool(function_declarations=declarations)] if declarations else UNSET
    return tools, config


def _refuse_unsupported(req: ChatCompletionRequest) -> None:
    refuse_unsupported(req, PROVIDER)
    if req.audio is not UNSET or (req.modalities and set(req.modalities) - {"text", "image"}):
        raise unsupported(PROVIDER, "modalities", "only text and image output are available")


class _AnthropicThinking(msgspec.Struct):
    """The Anthropic-style `thinking` field some clients send to reasoning models."""

    type: str
    budget_tokens: int | None = None


def _thinking(call: ChatCall, gemini3: bool) -> GeminiThinkingConfig | UnsetType:
    req = call.request
    effort = req.reasoning_effort
    if not call.model.reasoning:
        return UNSET
    if req.thinking is not UNSET and not isinstance(effort, str):
        try:
            native = msgspec.json.decode(req.thinking, type=_AnthropicThinking)
        except msgspec.MsgspecError:
            raise InvalidRequest(
                'Invalid value for \'thinking\': expected {"type": "enabled", '
                '"budget_tokens": N} or {"type": "disabled"}.',
                param="thinking",
            ) from None
        if native.type == "disabled":
            return GeminiThinkingConfig(include_thoughts=False, thinking_budget=0)
        budget = native.budget_tokens if native.budget_tokens is not None else UNSET
        return GeminiThinkingConfig(include_thoughts=True, thinking_budget=budget)
    if not isinstance(effort, str):
        return UNSET
    show = effort != "none"
    if gemini3:
        return GeminiThinkingConfig(
            include_thoughts=show, thinking_level=THINKING_LEVELS.get(effort, "high")
        )
    budget = THINKING_BUDGETS[effort]
    if budget == 0 and "-pro" in call.upstream_model:
        budget = PRO_MIN_BUDGET
    return GeminiThinkingConfig(include_thoughts=show, thinking_budget=budget)


def _generation_config(call: ChatCall, gemini3: bool) -> GeminiGenerationConfig:
    req = call.request
    cfg = GeminiGenerationConfig(thinking_config=_thinking(call, gemini3))
    if isinstance(req.temperature, float | int):
        cfg.temperature = float(req.temperature)
    if isinstance(req.top_p, float | int):
        cfg.top_p = float(req.top_p)
    if (k := top_k(req)) is not None:
        cfg.top_k = k
    if call.max_tokens is not None:
        cfg.max_output_tokens = call.max_tokens
    stops = stop_sequences(req)
    if stops:
        cfg.stop_sequences = stops
    if isinstance(req.n, int) and req.n > 1:
        cfg.candidate_count = req.n
    if isinstance(req.seed, int):
        cfg.seed = req.seed
    # Zero is the default, and some models (Gemini 3) refuse the fields altogether.
    if (presence := nonzero(req.presence_penalty)) is not None:
        cfg.presence_penalty = presence
    if (frequency := nonzero(req.frequency_penalty)) is not None:
        cfg.frequency_penalty = frequency
    if req.modalities and "image" in req.modalities:
        cfg.response_modalities = ["TEXT", "IMAGE"]
    fmt = req.response_format
    if isinstance(fmt, JSONObjectFormat | JSONSchemaFormat) and req.tools and not gemini3:
        raise unsupported(
            PROVIDER,
            "response_format",
            "Gemini models before Gemini 3 cannot combine tools with JSON output",
        )
    if isinstance(fmt, JSONObjectFormat | JSONSchemaFormat):
        cfg.response_mime_type = "application/json"
    if isinstance(fmt, JSONSchemaFormat) and fmt.json_schema.schema is not UNSET:
        cfg.response_schema = _schema(fmt.json_schema.schema, "response_format.json_schema.schema")
    return cfg


def to_gemini(call: ChatCall) -> GeminiRequest:
    """Translate the client's request into a `generateContent` body.

    Raises:
        InvalidRequest: a field Gemini cannot honour, or content it cannot take.
    """
    req = call.request
    gemini3 = call.upstream_model.removeprefix("models/").startswith("gemini-3")
    _refuse_unsupported(req)
    system, contents = _contents(req, gemini3)
    tools, tool_config = _tools(req)
    return GeminiRequest(
        contents=contents,
        system_instruction=GeminiContent(parts=system) if system else UNSET,
        tools=tools,
        tool_config=tool_config,
        generation_config=_generation_config(call, gemini3),
    )
