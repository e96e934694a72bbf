"""The order of a Responses API stream's events, as the `openai` SDK builds its response from
them (`responses.stream()`), checked on the pass-through (`openai_responses`).

The SDK raises from inside its accumulator, not as an API error, on a stream that breaks it: a
first event other than `response.created`, a lifecycle event of another response, an item
added twice, content for an item (or a part) never added, a text delta that is not a string,
an item done that is not the one added, `response.completed` with an item left unfinished. The
relay refuses such an event (`ResponsesOrder.allows`), so the stream ends with the documented
`error` event (or, before the first event, an HTTP error another route may answer). Event types
added after this was written pass, as do fields the SDK does not read.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import msgspec
from msgspec import UNSET, UnsetType

from gateway.schemas.codec import opens

__all__ = ["EVENT_VIEW", "EventView", "ResponsesOrder", "StreamItem"]

# Item types whose identity is their call id (the SDK's `_output_identity`).
_CALL_TYPES = frozenset({"function_call", "custom_tool_call", "shell_call", "shell_call_output"})
_LIFECYCLE = frozenset(
    {
        "response.created",
        "response.queued",
        "response.in_progress",
        "response.completed",
        "response.failed",
        "response.incomplete",
    }
)
_TEXT = frozenset({"response.output_text.delta", "response.output_text.done"})


class StreamItem(msgspec.Struct):
    type: str = ""
    id: str | None = None
    call_id: str | None = None
    container_id: object = None  # (a code interpreter call's: `gateway.stored`)
    environment: object = None  # (a shell call's, which may name its container)
    content: msgspec.Raw | UnsetType = UNSET  # a message's parts: a list
    arguments: msgspec.Raw | UnsetType = UNSET  # a call's arguments: a string

    def identity(self) -> tuple[str, str | None, str | None]:
        return self.type, None if self.type in _CALL_TYPES else self.id, self.call_id

    def whole(self) -> bool:
        """Whether the SDK can add to it: a message's `content` list, a call's arguments."""
        if self.type == "message":
            return opens(self.content, b"[")
        if self.type == "function_call":
            return opens(self.arguments, b'"')
        return True


class _Response(msgspec.Struct):
    id: str | None = None
    output: list[StreamItem] | None = None
    conversation: object = None  # (`gateway.stored`)


class _Part(msgspec.Struct):
    type: str = ""


class EventView(msgspec.Struct):
    """What the relay reads of an event: its type, and what places it in the stream."""

    type: str = ""
    response: _Response | None = None
    output_index: int | None = None
    content_index: int | None = None
    item: StreamItem | None = None
    part: _Part | None = None
    delta: msgspec.Raw | UnsetType = UNSET


EVENT_VIEW = msgspec.json.Decoder(EventView)


@dataclass(slots=True)
class _Output:
    item: StreamItem
    parts: list[str] = field(default_factory=list)  # a message's part types, by content_index
    done: bool = False


class ResponsesOrder:
    """Where a Responses stream is in the order the SDK builds its response in."""

    __slots__ = ("_id", "_items")

    def __init__(self) -> None:
        self._id: str | None = None  # the response's, from `response.created`
        self._items: dict[int, _Output] = {}  # by output_index

    def allows(self, event: EventView) -> bool:
        kind = event.type
        if self._id is None:
            return self._created(event)
        if kind in _LIFECYCLE:
            return self._lifecycle(event)
        index = event.output_index
        if kind == "response.output_item.added":
            item = event.item
            if item is None:
                return True  # (the SDK skips it)
            if index is None or index in self._items or not item.whole():
                return False
            self._items[index] = _Output(item)
            return True
        if index is None:
            return True  # an event about no output item
        out = self._items.get(index)
        if out is None:
            return False
        if kind == "response.output_item.done":
            if event.item is None or event.item.identity() != out.item.identity():
                return False
            out.done = True
        elif kind == "response.content_part.added" and out.item.type == "message":
            if event.part is None:
                return False
            out.parts.append(event.part.type)
        elif kind in _TEXT:
            at = event.content_index
            parts = out.parts
            if out.item.type != "message" or at is None or not 0 <= at < len(parts):
                return False
            return parts[at] == "output_text" and (
                kind.endswith(".done") or opens(event.delta, b'"')
            )
        elif kind == "response.function_call_arguments.delta":
            return out.item.type == "function_call" and opens(event.delta, b'"')
        return True

    def _created(self, event: EventView) -> bool:
        response = event.response
        if event.type != "response.created" or response is None or response.id is None:
            return False
        self._id = response.id
        for index, item in enumerate(response.output or ()):
            self._items[index] = _Output(item)
        return True

    def _lifecycle(self, event: EventView) -> bool:
        response = event.response
        if response is None or response.id != self._id:
            return False
        if event.type != "response.completed":
            return True
        final = {item.identity() for item in response.output or ()}
        return all(out.done or out.item.identity() in final for out in self._items.values())
