"""Responses input items and tools as chat messages and tools.

Messages keep their role (`input_text`/`output_text` parts become text parts, `input_image` an
image part, `input_file` a file part); consecutive `function_call` items join the assistant turn
before them as its `tool_calls` (ids kept, so `function_call_output` items, which become `tool`
messages, still answer them); `reasoning` items are dropped. Items and tools are decoded one by
one, so a bad field is a 400 naming its full path, e.g. `input[2].content[0].type`.
"""

from __future__ import annotations

from typing import Any, Literal, TypeVar

import msgspec
from msgspec import UNSET

from gateway.errors import InvalidRequest
from gateway.responses.translation import Translation, unsupported
from gateway.schemas.chat import (
    AssistantMessage,
    ChatCompletionRequest,
    ContentPart,
    CustomTool,
    DeveloperMessage,
    FileContentPart,
    FunctionCall,
    FunctionDefinition,
    FunctionTool,
    ImageContentPart,
    ImageURL,
    Message,
    RefusalContentPart,
    SystemMessage,
    TextContentPart,
    ToolCall,
    ToolChoice,
    ToolChoiceAllowedTools,
    ToolChoiceFunction,
    ToolMessage,
    UserMessage,
)
from gateway.schemas.codec import encode, param_of, present
from gateway.schemas.response_output import FunctionToolOut
from gateway.schemas.responses import (
    FunctionCallItem,
    FunctionCallOutputItem,
    FunctionToolParam,
    InputContent,
    InputFile,
    InputImage,
    InputText,
    ItemType,
    MessageItem,
    OutputTextInput,
    RefusalInput,
    ToolChoiceObject,
    ToolType,
)

__all__ = ["ChatBuilder"]

T = TypeVar("T")

_DECODERS: dict[type[Any], msgspec.json.Decoder[Any]] = {
    t: msgspec.json.Decoder(t)
    for t in (
        ItemType,
        MessageItem,
        FunctionCallItem,
        FunctionCallOutputItem,
        ToolType,
        FunctionToolParam,
    )
}
_IMAGE_DETAIL: dict[str, Literal["auto", "low", "high"]] = {
    "auto": "auto",
    "low": "low",
    "high": "high",
    "original": "high",
}


def _decode(type_: type[T], raw: msgspec.Raw, where: str) -> T:
    """One input item or tool; a bad field is a 400 naming its full Responses path."""
    try:
        return _DECODERS[type_].decode(raw)  # type: ignore[no-any-return]
    except msgspec.ValidationError as exc:
        problem, path = param_of(str(exc))
        param = f"{where}.{path}" if path else where
        raise InvalidRequest(f"Invalid request body at '{param}': {problem}", param=param) from None


class ChatBuilder:
    """Collects the chat messages and tools of one request into its `Translation`."""

    def __init__(self) -> None:
        self.messages: list[Message] = []
        self.out = Translation(chat=ChatCompletionRequest(messages=self.messages))

    def refuse(self, param: str, why: str) -> None:
        if self.out.refusal is None:
            self.out.refusal = unsupported(param, why)

    def add(self, message: Message, origin: str, *, parts: bool = False) -> None:
        if parts:
            self.out.part_lists.add(len(self.messages))
        self.messages.append(message)
        self.out.origins.append(origin)

    def item(self, raw: msgspec.Raw, where: str) -> None:
        kind = _decode(ItemType, raw, where).type
        if kind == "message":
            self.message(_decode(MessageItem, raw, where), where)
        elif kind == "function_call":
            self.function_call(_decode(FunctionCallItem, raw, where), where)
        elif kind == "function_call_output":
            item = _decode(FunctionCallOutputItem, raw, where)
            content = self.text_parts(item.output, f"{where}.output")
            self.add(ToolMessage(content=content, tool_call_id=item.call_id), where)
        elif kind == "item_reference":
            self.refuse(where, "the gateway does not store responses or items")
        elif kind != "reasoning":  # earlier thinking has no chat equivalent: dropped
            self.refuse(f"{where}.type", f"input items of type '{kind}' cannot be translated")

    def message(self, item: MessageItem, where: str) -> None:
        content = item.content
        parts = isinstance(content, list)
        if item.role == "user":
            user = content if isinstance(content, str) else self.user_parts(content, where)
            self.add(UserMessage(content=user), where, parts=parts)
        elif item.role == "assistant":
            said: str | list[TextContentPart | RefusalContentPart] = (
                content if isinstance(content, str) else self.assistant_parts(content, where)
            )
            self.add(AssistantMessage(content=said), where, parts=parts)
        else:
            text = self.text_parts(content, f"{where}.content")
            role = SystemMessage if item.role == "system" else DeveloperMessage
            self.add(role(content=text), where, parts=parts)

    def function_call(self, item: FunctionCallItem, where: str) -> None:
        call = ToolCall(id=item.call_id, function=FunctionCall(item.name, item.arguments))
        last = self.messages[-1] if self.messages else None
        if isinstance(last, AssistantMessage):  # consecutive calls: one assistant turn
            if last.tool_calls is UNSET:
                last.tool_calls = []
            last.tool_calls.append(call)
            self.out.call_origins.setdefault(len(self.messages) - 1, []).append(where)
        else:
            self.out.call_origins[len(self.messages)] = [where]
            self.add(AssistantMessage(content=None, tool_calls=[call]), where)

    def user_parts(self, content: list[InputContent], where: str) -> list[ContentPart]:
        out: list[ContentPart] = []
        for j, part in enumerate(content):
            at = f"{where}.content[{j}]"
            if isinstance(part, InputText | OutputTextInput):
                out.append(TextContentPart(text=part.text))
            elif isinstance(part, InputImage) and part.image_url:
                detail = _IMAGE_DETAIL[part.detail] if part.detail else UNSET
                out.append(ImageContentPart(image_url=ImageURL(url=part.image_url, detail=detail)))
            elif isinstance(part, InputImage):
                self.refuse(at, "uploaded files (file_id) are only known to OpenAI")
            elif isinstance(part, InputFile) and (part.file_data or part.file_id):
                fields = {"file_data": part.file_data, "file_id": part.file_id}
                fields["filename"] = part.filename
                file = {k: v for k, v in fields.items() if v is not None}
                out.append(FileContentPart(file=msgspec.Raw(encode(file))))
            else:
                self.refuse(at, f"'{part.__struct_config__.tag}' parts cannot be translated")
        return out

    def assistant_parts(
        self, content: list[InputContent], where: str
    ) -> list[TextContentPart | RefusalContentPart]:
        out: list[TextContentPart | RefusalContentPart] = []
        for j, part in enumerate(content):
            if isinstance(part, InputText | OutputTextInput):
                out.append(TextContentPart(text=part.text))
            elif isinstance(part, RefusalInput):
                out.append(RefusalContentPart(refusal=part.refusal))
            else:
                self.refuse(f"{where}.content[{j}]", "assistant history may only hold text")
        return out

    def text_parts(
        self, content: str | list[InputContent], where: str
    ) -> str | list[TextContentPart]:
        if isinstance(content, str):
            return content
        out: list[TextContentPart] = []
        for j, part in enumerate(content):
            if isinstance(part, InputText | OutputTextInput):
                out.append(TextContentPart(text=part.text))
            else:
                self.refuse(f"{where}[{j}]", "only text can be sent here to this model")
        return out

    def tools(self, tools: list[msgspec.Raw]) -> list[FunctionTool | CustomTool]:
        out: list[FunctionTool | CustomTool] = []
        for i, raw in enumerate(tools):
            where = f"tools[{i}]"
            kind = _decode(ToolType, raw, where).type
            if kind != "function":
                self.refuse(where, f"built-in tools ('{kind}') need an upstream that runs them")
                continue
            tool = _decode(FunctionToolParam, raw, where)
            params = tool.parameters if present(tool.parameters) else UNSET
            if params is not UNSET and not bytes(params).lstrip().startswith(b"{"):
                msg = f"Invalid request body at '{where}.parameters': Expected a JSON object"
                raise InvalidRequest(msg, param=f"{where}.parameters")
            description = tool.description if isinstance(tool.description, str) else UNSET
            definition = FunctionDefinition(
                name=tool.name, description=description, parameters=params, strict=tool.strict
            )
            out.append(FunctionTool(function=definition))
            self.out.tools.append(
                FunctionToolOut(
                    name=tool.name,
                    description=description if isinstance(description, str) else None,
                    parameters=params if isinstance(params, msgspec.Raw) else None,
                    strict=tool.strict if isinstance(tool.strict, bool) else None,
                )
            )
        return out

    def tool_choice(self, choice: ToolChoiceObject) -> ToolChoice | None:
        if choice.type == "function":
            if choice.name is UNSET:
                msg = "Missing required parameter: 'tool_choice.name'."
                raise InvalidRequest(msg, param="tool_choice.name")
            named = {"type": "function", "function": {"name": choice.name}}
            return msgspec.convert(named, ToolChoiceFunction)
        if choice.type == "allowed_tools" and choice.tools is not UNSET:
            listed = [_decode(FunctionToolParam, t, "tool_choice.tools") for t in choice.tools]
            allowed = {
                "mode": choice.mode or "auto",
                "tools": [{"type": "function", "function": {"name": t.name}} for t in listed],
            }
            return ToolChoiceAllowedTools(allowed_tools=msgspec.Raw(encode(allowed)))
        self.refuse("tool_choice", f"'{choice.type}' names a built-in tool")
        return None
