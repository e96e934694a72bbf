"""The result of translating a Responses request, and the way back to Responses field names.

Providers refuse chat parameters by their chat names (`messages[2].content[1]`); the client
sent Responses fields (`input[3].content[1]`). `Translation.param()` maps one to the other,
from where each chat message came from.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from gateway.errors import InvalidRequest
from gateway.schemas.chat import ChatCompletionRequest
from gateway.schemas.response_output import FunctionToolOut

__all__ = ["Translation", "unsupported"]

# Chat request fields whose Responses counterpart has another name.
_RENAMED = {
    "response_format": "text.format",
    "max_tokens": "max_output_tokens",
    "max_completion_tokens": "max_output_tokens",
    "reasoning_effort": "reasoning.effort",
    "verbosity": "text.verbosity",
}
_MESSAGE_PARAM = re.compile(r"^messages\[(\d+)\](?:\.tool_calls\[(\d+)\]|\.content\[(\d+)\])?")
_TOOL_PARAM = re.compile(r"^tools\[(\d+)\]")
# Chat's nested tool_choice fields and the flat Responses ones they came from.
_TOOL_CHOICE = re.compile(
    r"^tool_choice\.(?:(function)\b|allowed_tools\.(?:tools(\[\d+\])|(mode)))"
)
_HEAD = re.compile(r"^[A-Za-z_]+")


def unsupported(param: str, why: str) -> InvalidRequest:
    """The 400 for what only an upstream serving the Responses API itself could do."""
    return InvalidRequest(
        f"'{param}' is not supported on this model: {why}.",
        param=param,
        code="unsupported_parameter",
    )


@dataclass(slots=True)
class Translation:
    """The chat request, the first thing only a pass-through could serve, and the way back
    from chat parameter names (in provider errors) to the Responses fields they came from."""

    chat: ChatCompletionRequest
    tools: list[FunctionToolOut] = field(default_factory=list)
    refusal: InvalidRequest | None = None
    origins: list[str] = field(default_factory=list)  # per chat message
    call_origins: dict[int, list[str]] = field(default_factory=dict)  # per assistant message
    part_lists: set[int] = field(default_factory=set)  # messages whose parts map one to one

    def param(self, chat_param: str | None) -> str | None:
        """The Responses field a chat request parameter (e.g. `messages[2].content[1]`) names."""
        if chat_param is None:
            return None
        found = _MESSAGE_PARAM.match(chat_param)
        if found is not None:
            k = int(found[1])
            if k >= len(self.origins):
                return "input"
            calls = self.call_origins.get(k, [])
            if found[2] is not None and int(found[2]) < len(calls):
                return calls[int(found[2])]
            if found[3] is not None and k in self.part_lists:
                return f"{self.origins[k]}.content[{found[3]}]"
            return self.origins[k]
        tool = _TOOL_PARAM.match(chat_param)
        if tool is not None:
            return tool[0]
        choice = _TOOL_CHOICE.match(chat_param)
        if choice is not None:
            if choice[1]:
                return "tool_choice.name"
            return f"tool_choice.tools{choice[2]}" if choice[2] else "tool_choice.mode"
        head = _HEAD.match(chat_param)
        return _RENAMED.get(head[0], chat_param) if head else chat_param
