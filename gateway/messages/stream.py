"""A chat completion chunk stream as the Messages API event stream.

`MessageEvents` is a small state machine over the chat chunks (OpenAI format, whatever the
provider), writing Anthropic's exact sequence: `message_start` (the prompt estimate as its
`input_tokens`, the upstream's count follows in `message_delta`; sent with the first chunk, so
that the client has its headers and pings while the model thinks, and a stream that ends
without a choice ends with an error), then one content block at a time (`content_block_start`,
its deltas, `content_block_stop`) with a `ping` after the first
block's start as Anthropic sends it, then `message_delta` with the `stop_reason` and the usage,
and `message_stop`. Thinking text is a `thinking` block, text a `text` block, each tool call a
`tool_use` block whose arguments arrive as `input_json_delta`s. Every event is framed with its
`event:` line, which Anthropic's SDK needs to see an event at all.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass

import msgspec

from gateway.errors import UpstreamError
from gateway.messages.reply import message_id, stop_reason, usage_out
from gateway.messages.schema import (
    AnthropicEvent,
    BlockDelta,
    BlockStart,
    BlockStop,
    JsonDelta,
    MessageDelta,
    MessageOut,
    MessageStart,
    MessageStop,
    Ping,
    StopDelta,
    TextDelta,
    TextOut,
    ThinkingDelta,
    ThinkingOut,
    ToolUseOut,
    UsageOut,
)
from gateway.providers._translate import new_call_id
from gateway.providers.base import ChatCall
from gateway.responses.framing import event_frame, framed_batches
from gateway.schemas.chat import ChunkView, DeltaFunction, DeltaToolCall
from gateway.schemas.codec import encode

__all__ = ["MessageEvents"]

_CHUNK = msgspec.json.Decoder(ChunkView)
_NO_INPUT = msgspec.Raw(b"{}")


@dataclass(slots=True)
class _Tool:
    """The tool call being streamed (its block opens once its name is known)."""

    chat_index: int
    id: str
    name: str = ""
    arguments: str = ""  # not sent yet
    opened: bool = False


class MessageEvents:
    """Chat chunk batches in, batches of framed Messages events out (see the module doc)."""

    def __init__(self, call: ChatCall, estimate: int) -> None:
        self._call = call
        self._estimate = estimate
        self._frames: list[bytes] = []
        self._started = False
        self._chosen = False  # a choice of the answer came: there is a message to end
        self._blocks = 0  # blocks opened so far: the next block's index
        self._open: str | None = None  # the open block's kind: thinking, text, or tool_use
        self._tool: _Tool | None = None
        self._done_calls: set[int] = set()  # chat tool-call indexes that have had a block
        self._finish: str | None = None

    async def events(self, chunks: AsyncIterator[list[bytes]]) -> AsyncGenerator[list[bytes], None]:
        """Translate every batch; `message_delta` and `message_stop` follow the stream's end."""
        async with contextlib.aclosing(framed_batches(chunks, self._chunk, self._take)) as out:
            async for frames in out:
                yield frames
        if not self._chosen:
            # No answer, only choiceless chunks (or none: then the client gets a status, as
            # for a whole completion without choices; else the stream's error event).
            raise UpstreamError("The upstream provider ended the stream without any choice.")
        self._close()
        call = self._call
        usage = usage_out(call.usage, self._estimate, call.cache_write_tokens)
        if call.usage is None:  # never reported: what the stream held, roughly
            usage.output_tokens = call.chunks
        self._emit(
            MessageDelta(delta=StopDelta(stop_reason=stop_reason(self._finish)), usage=usage)
        )
        self._emit(MessageStop())
        yield self._take()

    def _take(self) -> list[bytes]:
        frames, self._frames = self._frames, []
        return frames

    def _emit(self, event: AnthropicEvent) -> None:
        name = str(type(event).__struct_config__.tag).encode()
        self._frames.append(event_frame(name, encode(event)))

    def _begin(self, chunk_id: str, model: str) -> None:
        if self._started:
            return
        self._started = True
        usage = UsageOut(input_tokens=self._estimate, output_tokens=0)
        message = MessageOut(id=message_id(chunk_id), model=model, content=[], usage=usage)
        self._emit(MessageStart(message=message))

    def _chunk(self, data: bytes) -> None:
        try:
            chunk = _CHUNK.decode(data)
        except (msgspec.MsgspecError, RecursionError):
            raise UpstreamError("The upstream provider sent a malformed stream event.") from None
        # The message starts with the first chunk, a choiceless one too (Azure's content
        # filter results, which may come long before the first token): the client's headers
        # and pings must not wait for the model (`sse_pings`).
        self._begin(chunk.id, chunk.model)
        for choice in chunk.choices:
            if choice.index != 0:
                continue  # a Messages request has one answer
            self._chosen = True
            delta = choice.delta
            if delta.reasoning_content:
                self._text("thinking", delta.reasoning_content)
            for text in (delta.content, delta.refusal):
                if isinstance(text, str) and text:
                    self._text("text", text)
            for fragment in delta.tool_calls or ():
                self._tool_fragment(fragment)
            if choice.finish_reason:
                self._finish = choice.finish_reason
                self._close()

    def _start(self, kind: str, block: ThinkingOut | TextOut | ToolUseOut) -> None:
        """Open a block (the one before it is closed already)."""
        self._open = kind
        self._emit(BlockStart(index=self._blocks, content_block=block))
        if self._blocks == 0:
            self._emit(Ping())  # where Anthropic sends it: after the first block's start
        self._blocks += 1

    def _delta(self, delta: TextDelta | ThinkingDelta | JsonDelta) -> None:
        self._emit(BlockDelta(index=self._blocks - 1, delta=delta))

    def _text(self, kind: str, text: str) -> None:
        if self._open != kind:
            self._close()
            self._start(kind, ThinkingOut(thinking="") if kind == "thinking" else TextOut(text=""))
        self._delta(ThinkingDelta(thinking=text) if kind == "thinking" else TextDelta(text=text))

    def _tool_fragment(self, fragment: DeltaToolCall) -> None:
        function = fragment.function if isinstance(fragment.function, DeltaFunction) else None
        tool = self._tool
        if tool is None or tool.chat_index != fragment.index:
            if fragment.index in self._done_calls:  # its block is closed: it cannot continue
                raise UpstreamError(
                    "The upstream provider interleaved the fragments of several tool calls."
                )
            self._close()
            call_id = fragment.id if isinstance(fragment.id, str) and fragment.id else None
            tool = self._tool = _Tool(fragment.index, call_id or new_call_id())
        if function is not None:
            if isinstance(function.name, str) and not tool.name:
                tool.name = function.name
            if isinstance(function.arguments, str):
                tool.arguments += function.arguments
        if not tool.opened:
            if tool.name:  # a tool_use block opens with its name: until then, arguments wait
                self._open_tool(tool)
        elif tool.arguments:
            self._delta(JsonDelta(partial_json=tool.arguments))
            tool.arguments = ""

    def _open_tool(self, tool: _Tool) -> None:
        tool.opened = True
        self._done_calls.add(tool.chat_index)
        self._start("tool_use", ToolUseOut(id=tool.id, name=tool.name, input=_NO_INPUT))
        if tool.arguments:
            self._delta(JsonDelta(partial_json=tool.arguments))
            tool.arguments = ""

    def _close(self) -> None:
        """End the open block; a tool call that never got its name still gets its block."""
        tool, self._tool = self._tool, None
        if tool is not None and not tool.opened:
            self._open_tool(tool)
        if self._open is not None:
            self._emit(BlockStop(index=self._blocks - 1))
            self._open = None
