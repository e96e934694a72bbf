"""A chat completion chunk stream as the Responses API event stream.

`ResponseEvents` is a small state machine over the chat chunks (OpenAI format, whatever the
provider): `response.created` and `response.in_progress` first (with the first chunk; a stream
that ends without a choice ends with an error), then one output item at a time (`reasoning`,
`message` with its `output_text`/`refusal` parts, or a `function_call`), each opened with
`output_item.added` and closed with its `*.done` events before the next one starts, and
`response.completed` (or `response.incomplete`) with the whole object and usage last. Every
event carries `sequence_number`, counting from 0, and is framed with its `event:` line.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Literal

import msgspec

from gateway.errors import GatewayError, UpstreamError
from gateway.providers._translate import HeldAnswer
from gateway.providers.base import ChatCall
from gateway.responses.framing import event_frame, framed_batches
from gateway.responses.output import finished, item_status, new_id
from gateway.schemas.chat import ChatCompletionChunk, Delta, DeltaFunction, DeltaToolCall
from gateway.schemas.codec import encode
from gateway.schemas.response_output import (
    ArgumentsDeltaEvent,
    ArgumentsDoneEvent,
    CompletedEvent,
    CreatedEvent,
    ErrorEvent,
    IncompleteEvent,
    InProgressEvent,
    ItemAddedEvent,
    ItemDoneEvent,
    OutputFunctionCall,
    OutputItem,
    OutputMessage,
    OutputPart,
    OutputReasoning,
    OutputRefusal,
    OutputText,
    PartAddedEvent,
    PartDoneEvent,
    ReasoningDeltaEvent,
    ReasoningDoneEvent,
    ReasoningTextContent,
    RefusalDeltaEvent,
    RefusalDoneEvent,
    Response,
    StreamEvent,
    TextDeltaEvent,
    TextDoneEvent,
)

__all__ = ["ResponseEvents", "error_event"]

_CHUNK = msgspec.json.Decoder(ChatCompletionChunk)

PartKind = Literal["output_text", "refusal", "reasoning_text"]


@dataclass(slots=True)
class _Open:
    """The output item being streamed: its parts' text so far, or a call's arguments."""

    kind: Literal["message", "reasoning", "function_call"]
    id: str
    index: int
    parts: dict[PartKind, list[str]] = field(default_factory=dict)  # in content_index order
    call_id: str = ""
    name: str = ""
    chat_index: int = -1
    arguments: list[str] = field(default_factory=list)

    def call(self, status: Literal["in_progress", "completed", "incomplete"]) -> OutputFunctionCall:
        return OutputFunctionCall(
            id=self.id,
            call_id=self.call_id,
            name=self.name,
            arguments="".join(self.arguments),
            status=status,
        )


def _part(kind: PartKind, text: str) -> OutputPart:
    if kind == "output_text":
        return OutputText(text=text)
    if kind == "refusal":
        return OutputRefusal(refusal=text)
    return ReasoningTextContent(text=text)


def _part_delta(item: _Open, kind: PartKind, index: int, text: str) -> StreamEvent:
    if kind == "output_text":
        return TextDeltaEvent(
            item_id=item.id, output_index=item.index, content_index=index, delta=text
        )
    if kind == "refusal":
        return RefusalDeltaEvent(
            item_id=item.id, output_index=item.index, content_index=index, delta=text
        )
    return ReasoningDeltaEvent(
        item_id=item.id, output_index=item.index, content_index=index, delta=text
    )


def _part_done(item: _Open, kind: PartKind, index: int, text: str) -> StreamEvent:
    if kind == "output_text":
        return TextDoneEvent(
            item_id=item.id, output_index=item.index, content_index=index, text=text
        )
    if kind == "refusal":
        return RefusalDoneEvent(
            item_id=item.id, output_index=item.index, content_index=index, refusal=text
        )
    return ReasoningDoneEvent(
        item_id=item.id, output_index=item.index, content_index=index, text=text
    )


class ResponseEvents:
    """Chat chunk batches in, batches of framed Responses events out (see the module doc).

    The `*.done` events and `response.completed` repeat the whole answer, so it is held as it
    streams: like a whole answer, it is bounded by the answering provider's
    `max_response_bytes` (`limit`, read at the first chunk; None: unbounded), counted in
    characters of text and arguments.
    """

    def __init__(
        self, base: Response, call: ChatCall, limit: Callable[[], int | None] = lambda: None
    ) -> None:
        self._response = base
        self._call = call
        self._limit = limit
        self._held = HeldAnswer("a Responses stream")
        self._seq = 0
        self._frames: list[bytes] = []
        self._items: list[OutputItem] = []
        self._open: _Open | None = None
        self._closed_calls: set[int] = set()
        self._started = False
        self._chosen = False  # a choice of the answer came: there is a response to end
        self._finish: str | None = None

    async def events(self, chunks: AsyncIterator[list[bytes]]) -> AsyncGenerator[list[bytes], None]:
        """Translate every batch; the terminal event follows the end of the chat stream."""
        # After a failure, what came before it still goes out, and numbers stay contiguous.
        async with contextlib.aclosing(framed_batches(chunks, self._chunk, self._take)) as out:
            async for frames in out:
                yield frames
        if not self._chosen:
            # No answer, only choiceless chunks (or none: then the client gets a 502, as for a
            # whole completion without choices; else the stream's error event).
            raise UpstreamError("The upstream provider ended the stream without any choice.")
        self._close()
        done = finished(self._response, self._items, self._finish, self._call.usage)
        if done.status == "completed":
            self._emit(CompletedEvent(response=done))
        else:
            self._emit(IncompleteEvent(response=done))
        yield self._take()

    def error_frame(self, exc: GatewayError) -> bytes:
        """The `error` event that ends a stream after a failure (it takes the next number)."""
        self._seq += 1
        return error_event(exc, self._seq - 1)

    def _take(self) -> list[bytes]:
        frames, self._frames = self._frames, []
        return frames

    def _emit(self, event: StreamEvent) -> None:
        event.sequence_number = self._seq
        self._seq += 1
        self._frames.append(_frame(event))

    def _chunk(self, data: bytes) -> None:
        try:
            chunk = _CHUNK.decode(data)
        except (msgspec.MsgspecError, RecursionError):
            raise UpstreamError("The upstream provider sent a malformed stream event.") from None
        if not self._started:  # with the first chunk: see `MessageEvents._chunk`
            self._started = True
            self._held.limit = self._limit()  # the answering provider's, now it is known
            self._response.created_at = chunk.created
            self._response.model = chunk.model
            self._emit(CreatedEvent(response=self._response))
            self._emit(InProgressEvent(response=self._response))
        for choice in chunk.choices:
            if choice.index != 0:
                continue  # a Responses request has no `n`: one answer
            self._chosen = True
            self._delta(choice.delta)
            if choice.finish_reason:
                self._finish = choice.finish_reason
                self._close()

    def _delta(self, delta: Delta) -> None:
        if delta.reasoning_content:
            self._text("reasoning", "reasoning_text", delta.reasoning_content)
        if delta.content:
            self._text("message", "output_text", delta.content)
        if delta.refusal:
            self._text("message", "refusal", delta.refusal)
        if isinstance(delta.tool_calls, list):
            for fragment in delta.tool_calls:
                self._tool_call(fragment)

    def _start(self, item: _Open, added: OutputItem) -> None:
        self._close()  # the open item joins the output first: the new one comes after it
        item.index = len(self._items)
        self._open = item
        self._emit(ItemAddedEvent(output_index=item.index, item=added))

    def _text(self, kind: Literal["message", "reasoning"], part: PartKind, text: str) -> None:
        item = self._open
        if item is None or item.kind != kind:
            if kind == "message":
                item = _Open("message", new_id("msg"), len(self._items))
                self._start(item, OutputMessage(id=item.id, status="in_progress", content=[]))
            else:
                item = _Open("reasoning", new_id("rs"), len(self._items))
                self._start(item, OutputReasoning(id=item.id, content=[], status="in_progress"))
        if part not in item.parts:
            item.parts[part] = []
            index = len(item.parts) - 1
            self._emit(
                PartAddedEvent(
                    item_id=item.id,
                    output_index=item.index,
                    content_index=index,
                    part=_part(part, ""),
                )
            )
        self._held.add(len(text))
        item.parts[part].append(text)
        self._emit(_part_delta(item, part, list(item.parts).index(part), text))

    def _tool_call(self, fragment: DeltaToolCall) -> None:
        function = fragment.function if isinstance(fragment.function, DeltaFunction) else None
        item = self._open
        if item is None or item.kind != "function_call" or item.chat_index != fragment.index:
            if fragment.index in self._closed_calls:
                raise UpstreamError(
                    "The upstream provider interleaved the fragments of several tool calls."
                )
            item = _Open("function_call", new_id("fc"), len(self._items))
            item.call_id = fragment.id if isinstance(fragment.id, str) else new_id("call")
            item.name = function.name if function and isinstance(function.name, str) else ""
            item.chat_index = fragment.index
            self._start(item, item.call("in_progress"))
        elif function and isinstance(function.name, str) and function.name and not item.name:
            item.name = function.name  # a late name (some servers send it after the id)
        if function and isinstance(function.arguments, str) and function.arguments:
            self._held.add(len(function.arguments))
            item.arguments.append(function.arguments)
            self._emit(
                ArgumentsDeltaEvent(
                    item_id=item.id, output_index=item.index, delta=function.arguments
                )
            )

    def _close(self) -> None:
        """Finish the open item: its parts' or arguments' `done` events, then the item's."""
        item, self._open = self._open, None
        if item is None:
            return
        status = item_status(self._finish)
        done: OutputItem
        if item.kind == "function_call":
            self._closed_calls.add(item.chat_index)
            done = item.call(status)
            self._emit(
                ArgumentsDoneEvent(
                    item_id=item.id,
                    output_index=item.index,
                    name=done.name,
                    arguments=done.arguments,
                )
            )
        else:
            parts: list[OutputPart] = []
            for index, (kind, pieces) in enumerate(item.parts.items()):
                text = "".join(pieces)
                parts.append(_part(kind, text))
                self._emit(_part_done(item, kind, index, text))
                self._emit(
                    PartDoneEvent(
                        item_id=item.id,
                        output_index=item.index,
                        content_index=index,
                        part=parts[-1],
                    )
                )
            if item.kind == "message":
                said = [p for p in parts if isinstance(p, OutputText | OutputRefusal)]
                done = OutputMessage(id=item.id, status=status, content=said)
            else:
                thought = [p for p in parts if isinstance(p, ReasoningTextContent)]
                done = OutputReasoning(id=item.id, content=thought, status=status)
        self._items.append(done)
        self._emit(ItemDoneEvent(output_index=item.index, item=done))


_NAMES: dict[type[StreamEvent], bytes] = {}  # event class -> its `event:` name


def _frame(event: StreamEvent) -> bytes:
    name = _NAMES.get(type(event))
    if name is None:
        name = _NAMES[type(event)] = str(type(event).__struct_config__.tag).encode()
    return event_frame(name, encode(event))


def error_event(exc: GatewayError, sequence_number: int) -> bytes:
    """The Responses `error` event for a failure after the stream started."""
    code = exc.code or exc.type
    event = ErrorEvent(code=code, message=exc.message, param=exc.param)
    event.sequence_number = sequence_number
    return _frame(event)
