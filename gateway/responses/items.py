"""Responses input items and tools as chat messages and tools.

Messages keep their role (`input_text`/`output_text` parts become text parts, `input_image` an
image part, `input_file` a file part); consecutive `function_call` items join the assistant turn
before them as its `tool_calls` (ids kept, so `function_call_output` items, which become `tool`
messages, still answer them); `reasoning` items are dropped. Items and tools are decoded one by
one (each item once, into `InputItem`), so a bad field is a 400 naming its full path, e.g.
`input[2].content[0].type`.
"""

from __future__ import annotations

from typing import Any, Literal, TypeVar

import msgspec
from msgspec import UNSET, UnsetType

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
from gateway.schemas.codec import encode, error_path, present
from gateway.schemas.response_output import FunctionToolOut
from gateway.schemas.responses import (
    AllowedToolType,
    FunctionToolParam,
    InputContent,
    InputFile,
    InputImage,
    InputItem,
    InputText,
    ItemType,
    OutputTextInput,
    RefusalInput,
    ToolChoiceObject,
    ToolType,
)

__all__ = ["ChatBuilder", "missing"]

T = TypeVar("T")

_DECODERS: dict[type[Any], msgspec.json.Decoder[Any]] = {
    t: msgspec.json.Decoder(t)
    for t in (InputItem, ItemType, ToolType, FunctionToolParam, AllowedToolType)
}
# The item kinds `InputItem` holds; any other kind is only checked for its `type`.
_TRANSLATED = frozenset({"message", "function_call", "function_call_output"})
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
        problem, _, path = error_path(str(exc))
        param = f"{where}.{path}" if path else where
        raise InvalidRequest(f"Invalid request body at '{param}': {problem}", param=param) from None


def missing(param: str) -> InvalidRequest:
    """The 400 for a required field that was not sent."""
    return InvalidRequest(f"Missing required parameter: '{param}'.", param=param)


def _need(value: T | UnsetType, param: str) -> T:
    if isinstance(value, UnsetType):
        raise missing(param)
    return value


def _content(value: str | list[InputContent] | UnsetType, param: str) -> str | list[InputContent]:
    # _need() would infer Sequence[...] for this union.
    if isinstance(value, UnsetType):
        raise missing(param)
    return value


def _item(raw: msgspec.Raw, where: str) -> InputItem:
    """One input item, decoded once. An item of a kind that is not translated may have
    fields of other shapes (a `computer_call_output`'s `output` object): only its `type` is
    read then, and the refusal is left to the caller."""
    try:
        item: InputItem = _DECODERS[InputItem].decode(raw)
    except msgspec.ValidationError:
        kind = _decode(ItemType, raw, where).type
        if kind in _TRANSLATED:
            _decode(InputItem, raw, where)  # raises again, now as the 400 naming the field
        return InputItem(type=kind)
    return item


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
        item = _item(raw, where)
        kind = item.type
        if kind == "message":
            self.message(item, where)
        elif kind == "function_call":
            self.function_call(item, where)
        elif kind == "function_call_output":
            call_id = _need(item.call_id, f"{where}.call_id")
            output = _content(item.output, f"{where}.output")
            content = self.text_parts(output, f"{where}.output")
            self.add(ToolMessage(content=content, tool_call_id=call_id), where)
        elif kind == "item_reference":
            self.refuse(where, "the gateway does not store responses or items")
        elif kind != "reasoning":  # earlier thinking has no chat equivalent: dropped
            self.refuse(f"{where}.type", f"input items of type '{kind}' cannot be translated")

    def message(self, item: InputItem, where: str) -> None:
        role = _need(item.role, f"{where}.role")
        content = _content(item.content, f"{where}.content")
        parts = isinstance(content, list)
        if role == "user":
            user = content if isinstance(content, str) else self.user_parts(content, where)
            self.add(UserMessage(content=user), where, parts=parts)
        elif role == "assistant":
            said: str | list[TextContentPart | RefusalContentPart] = (
                content if isinstance(content, str) else self.assistant_parts(content, where)
            )
            self.add(AssistantMessage(content=said), where, parts=parts)
        else:
            text = self.text_parts(content, f"{where}.content")
            kind = SystemMessage if role == "system" else DeveloperMessage
            self.add(kind(content=text), where, parts=parts)

    def function_call(self, item: InputItem, where: str) -> None:
        call_id = _need(item.call_id, f"{where}.call_id")
        function = FunctionCall(
            _need(item.name, f"{where}.name"), _need(item.arguments, f"{where}.arguments")
        )
        call = ToolCall(id=call_id, function=function)
        last = self.messages[-1] if self.messages else None
        if isinstance(last, AssistantMessage):  # consecutive calls: one assistant turn
            if not isinstance(last.tool_calls, list):
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
            name = _need(choice.name, "tool_choice.name")
            named = {"type": "function", "function": {"name": name}}
            return msgspec.convert(named, ToolChoiceFunction)
        if choice.type == "allowed_tools":
            names: list[str] = []
            for i, raw in enumerate(_need(choice.tools, "tool_choice.tools")):
                where = f"tool_choice.tools[{i}]"
                kind = _decode(AllowedToolType, raw, where).type
                if kind == "function":
                    names.append(_decode(FunctionToolParam, raw, where).name)
                else:
                    self.refuse(where, f"built-in tools ('{kind}') need an upstream that runs them")
            allowed = {
                "mode": choice.mode or "auto",
                "tools": [{"type": "function", "function": {"name": name}} for name in names],
            }
            return ToolChoiceAllowedTools(allowed_tools=msgspec.Raw(encode(allowed)))
        self.refuse("tool_choice", f"'{choice.type}' names a built-in tool")
        return None
