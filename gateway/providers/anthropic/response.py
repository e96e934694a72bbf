"""Anthropic answers and stream events → OpenAI `chat.completion` and `chat.completion.chunk`."""

from __future__ import annotations

from dataclasses import dataclass, field

import msgspec
from msgspec import UNSET, UnsetType

from gateway.errors import UpstreamError, UpstreamUnavailable
from gateway.prices import SPEED
from gateway.providers._answers import read_usage, served_at
from gateway.providers._errors import DECODE_ERRORS
from gateway.providers._translate import ChunkWriter, HeldAnswer, completion_body, message
from gateway.providers.anthropic.order import Order
from gateway.providers.anthropic.request import JSON_TOOL, JsonTool
from gateway.providers.anthropic.wire import (
    EVENT_DECODER,
    USAGE_DECODER,
    AnthropicContentBlock,
    AnthropicDelta,
    AnthropicErrorBody,
    AnthropicResponse,
    AnthropicUsage,
)
from gateway.providers.base import ChatCall
from gateway.schemas.chat import Choice, FunctionCall, ToolCall
from gateway.schemas.codec import encode
from gateway.schemas.common import CompletionTokensDetails, PromptTokensDetails, Usage

__all__ = [
    "AnthropicStream",
    "UsageTally",
    "event_error",
    "finish_reason",
    "from_anthropic",
    "openai_usage",
]

FINISH_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}
# What an open content block's state is counted as against max_response_bytes: about the
# memory it takes, so an upstream that opens blocks and never closes them is bounded too.
BLOCK_STATE_SIZE = 256


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


@dataclass(slots=True)
class UsageTally:
    """An answer's usage so far (`message_start` holds the input and cache counts,
    `message_delta` the final output count); once a count cannot be read, the answer's usage
    is unknown and its row is estimated."""

    provider: str
    usage: AnthropicUsage = field(default_factory=AnthropicUsage)
    readable: bool = True
    streamed: int = 0  # characters of output (text, thinking, tool JSON) streamed so far
    final: bool = False  # the closing `message_delta` came (a stop_reason): output is known
    content: int = 0  # content events (block starts and deltas) seen so far
    searches: int = 0  # web searches seen started (`server_tool_use` blocks) so far
    _final_at: int = 0  # content events by then (content after it reopens the count)

    def merge(
        self, raw: msgspec.Raw | UnsetType, *, closing: bool = False
    ) -> AnthropicUsage | None:
        """Add an event's usage to the tally; the usage read (None: none, or unreadable). An
        unreadable usage makes the answer's unknown, except a `closing` one (a stream's
        `message_delta`): that is no final count, and what came before still stands."""
        if raw is UNSET:
            return None
        usage = read_usage(self.provider, raw, USAGE_DECODER)
        if usage is None:
            if not closing:
                self.readable = False
            return None
        for name in usage.__struct_fields__:
            value = getattr(usage, name)
            if value is not None:
                setattr(self.usage, name, value)
        return usage

    def counts(self) -> AnthropicUsage | None:
        """The usage reported; None when it cannot be read, or lacks the input or output
        count (a `usage: {}` is no report of zero: the row is estimated)."""
        usage = self.usage
        if not self.readable or usage.input_tokens is None or usage.output_tokens is None:
            return None
        return usage

    def delta(self, usage: msgspec.Raw | UnsetType, stop_reason: str | None) -> None:
        """A `message_delta`: its usage merged, and final when it closes the message with its
        own output count (a stop_reason and `output_tokens`: Anthropic sends one, after the
        last block; `message_start`'s `output_tokens` is a placeholder). One without, or
        content after it, leaves the output a count so far (`cut`)."""
        read = self.merge(usage, closing=True)
        output = read.output_tokens if read is not None else None
        # (A count of 0 after streamed output is no count either.)
        counted = output is not None and (output != 0 or not self.streamed)
        if stop_reason:
            self.final, self._final_at = counted, self.content
        elif not counted:  # (a later delta with a count, and no content since: still final)
            self.final = False

    def closed(self, call: ChatCall) -> AnthropicUsage | None:
        """At `message_stop`: the final counts, into the call; without a closing count (none
        came, or unreadable), the stream is accounted as cut (`cut`: its counts so far and an
        estimate of its output, or the pipeline's estimate) and None."""
        if not self.final or self.content != self._final_at:
            self.cut(call)
            return None
        counts = self.account(call)
        if counts is None:
            self.cut(call)
        return counts

    def account(self, call: ChatCall) -> AnthropicUsage | None:
        """A whole answer's counts (`counts`), into the call (None: left for an estimate)."""
        counts = self.counts()
        if counts is not None:
            call.usage = openai_usage(counts)
            self.billed(call)
        return counts

    def billed(self, call: ChatCall) -> None:
        """Into the call, what is priced beside the token counts: the prompt-cache writes
        (an hour's apart), the web searches (the count reported, or the searches seen
        started when it is less: a stream cut before its closing count) and the speed it was
        served at."""
        usage = self.usage
        if self.readable:
            call.cache_write_tokens = usage.cache_creation_input_tokens or 0
            hour = usage.detail("cache_creation", "ephemeral_1h_input_tokens")
            call.cache_write_1h_tokens = min(hour, call.cache_write_tokens)
            searches = usage.detail("server_tool_use", "web_search_requests")
            if isinstance(usage.speed, str) and usage.speed:
                served_at(call, SPEED + usage.speed)  # (its word on fast mode: `prices.SPEED`)
            call.steps = usage.beyond_messages()  # (a compaction's, an advisor's: billed)
        else:
            call.cache_write_tokens = call.cache_write_1h_tokens = searches = 0
        call.web_searches = max(call.web_searches, searches, self.searches)

    def cut(self, call: ChatCall) -> None:
        """Account a stream cut or broken before its final count (the client hung up, an
        error event, a dropped connection): the input and
        cache counts `message_start` reported, and for output the larger of the count so far
        and the streamed characters at four a token (`tokens.estimate_text_tokens`; a delta
        holds several tokens). Estimated (`Call.usage_estimated`), and bounded as reported
        usage is (`usage_bounds`). Cut before `message_start` (or unreadable), or with its
        usage already in hand: left as it is (the pipeline's estimate, or the final count)."""
        usage = self.usage
        if call.usage is not None or not self.readable or usage.input_tokens is None:
            call.web_searches = max(call.web_searches, self.searches)  # (billed all the same)
            return
        self.billed(call)
        if self.final and self.content == self._final_at:  # cut before `message_stop` only
            call.usage = openai_usage(usage)
            return
        output = max(usage.output_tokens or 0, (self.streamed + 3) // 4)
        call.usage = openai_usage(msgspec.structs.replace(usage, output_tokens=output))
        call.usage_estimated = True


def event_error(provider: str, error: AnthropicErrorBody) -> UpstreamError:
    """The failure an Anthropic stream's `error` event reports: overload, an internal error
    or a rate limit may pass on another route (before the first byte); anything else not."""
    text = f"The upstream provider '{provider}' failed mid-stream: "
    text += error.message or error.type or "unknown error"
    if error.type in ("overloaded_error", "api_error", "rate_limit_error"):
        return UpstreamUnavailable(text)
    return UpstreamError(text)


def finish_reason(stop_reason: str | None, json_tool: JsonTool | None) -> str:
    reason = FINISH_REASONS.get(stop_reason or "end_turn", "stop")
    return "stop" if json_tool is not None and reason == "tool_calls" else reason


def json_answer(arguments: str, json_tool: JsonTool) -> str:
    """The JSON-mode answer carried by the forced tool's input (unwrapped if it was wrapped)."""
    if not json_tool.wrapped:
        return arguments
    try:
        value = msgspec.json.decode(arguments)
    except (msgspec.DecodeError, RecursionError):
        return arguments
    return encode(value.get("values") if isinstance(value, dict) else value).decode()


def from_anthropic(
    resp: AnthropicResponse, json_tool: JsonTool | None, counts: AnthropicUsage | None
) -> tuple[bytes, Usage | None]:
    """An Anthropic `message` as an OpenAI `chat.completion` (encoded) and its usage, from its
    `counts` (`UsageTally`; None: unreadable, and the completion has no usage)."""
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
            if json_tool is not None and block.name == JSON_TOOL:
                texts.append(json_answer(args, json_tool))
            else:
                calls.append(ToolCall(id=block.id, function=FunctionCall(block.name, args)))
    usage = openai_usage(counts) if counts is not None else None
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
    kind: str  # "tool", "json" (the forced JSON tool), or another block type
    slot: int = 0  # the OpenAI tool-call index of a "tool" block
    has_arguments: bool = False
    held: list[str] = field(default_factory=list)  # a wrapped JSON answer, until it is whole
    held_size: int = 0  # its characters

    def size(self) -> int:
        return BLOCK_STATE_SIZE + self.held_size


class AnthropicStream:
    """Turns Anthropic stream events into OpenAI chunks, one event at a time, as they come.

    Content blocks map to OpenAI deltas: text to `content`, thinking to `reasoning_content`,
    tool_use to a tool call (its index counts tool calls only, not Anthropic's block index),
    and the forced JSON tool's argument fragments to `content` (a wrapped, non-object answer
    is held until its block ends, since only the whole of it can be unwrapped).

    What is held, that answer and the state of each open block, is bounded as a whole answer
    is, by the provider's `max_response_bytes` (`limit`; None: unbounded), counted in
    characters of the held answer and `BLOCK_STATE_SIZE` per open block.
    """

    def __init__(
        self,
        call: ChatCall,
        provider: str,
        json_tool: JsonTool | None,
        limit: int | None = None,
    ) -> None:
        self.call = call
        self.provider = provider
        self.json_tool = json_tool
        self.writer: ChunkWriter | None = None
        self.tally = UsageTally(provider)
        self.finished = False
        self.done = False
        self._blocks: dict[int, _BlockState] = {}  # open blocks, by Anthropic's block index
        self._order = Order()  # (the SDK's order: refused out of it, as `/v1/messages` does)
        self._held = HeldAnswer("a stream translated from Anthropic", limit)

    def feed(self, data: bytes) -> list[bytes]:
        """The chunks for one upstream event.

        Raises:
            UpstreamError: the event is an error, or the stream is malformed.
        """
        try:
            event = EVENT_DECODER.decode(data)
        except DECODE_ERRORS:
            raise UpstreamError(
                f"The upstream provider '{self.provider}' sent a malformed stream event."
            ) from None
        kind = event.type
        if kind == "error":
            raise event_error(self.provider, event.error or AnthropicErrorBody())
        if not self._order.allows(kind, event.index):
            where = "out of order" if self._order.started else "before 'message_start'"
            raise UpstreamError(f"The upstream provider '{self.provider}' sent '{kind}' {where}.")
        index = event.index or 0  # (an event about a block has one: `allows` checked)
        if kind == "message_start":
            msg = event.message
            if msg is None:
                raise UpstreamError(
                    f"The upstream provider '{self.provider}' sent a malformed stream event."
                )
            self.writer = ChunkWriter(
                id=f"chatcmpl-{msg.id}",
                model=msg.model,
                include_usage=self.call.request.wants_usage,
            )
            self.tally.merge(msg.usage)
            return []  # the role goes out with the first delta
        writer = self.writer
        if writer is None:
            if kind == "ping":
                return []
            raise UpstreamError(
                f"The upstream provider '{self.provider}' sent '{kind}' before 'message_start'."
            )
        if kind == "content_block_start":
            self.tally.content += 1
            if event.content_block is None:
                raise UpstreamError(
                    f"The upstream provider '{self.provider}' sent a malformed stream event."
                )
            return self._block_start(writer, index, event.content_block)
        if kind == "content_block_delta" and event.delta is not None:
            self.tally.content += 1
            return self._block_delta(writer, index, event.delta)
        if kind == "content_block_stop":
            state = self._blocks.pop(index, None)
            if state is not None:
                self._held.release(state.size())
            if state is not None and state.kind == "tool" and not state.has_arguments:
                return [writer.tool_arguments(state.slot, "{}")]  # a call without arguments
            if state is not None and state.held and self.json_tool is not None:
                return [writer.text(json_answer("".join(state.held), self.json_tool))]
            return []
        if kind == "message_delta":
            self.tally.delta(event.usage, event.delta.stop_reason if event.delta else None)
            if event.delta is not None and event.delta.stop_reason and not self.finished:
                self.finished = True
                return [writer.finish(finish_reason(event.delta.stop_reason, self.json_tool))]
            return []
        if kind == "message_stop":
            self.done = True
            out = [] if self.finished else [writer.finish("stop")]
            if self.tally.closed(self.call) is None:  # estimated: the client is told nothing
                return out
            usage = self.call.usage
            return [*out, writer.usage(usage)] if writer.include_usage and usage else out
        return []  # ping, and event types added after this was written

    def end(self) -> list[bytes]:
        if not self.done:
            raise UpstreamError(
                f"The upstream provider '{self.provider}' ended the stream before it was complete."
            )
        return []

    def cut(self) -> None:
        """(`StreamState.cut`: what `message_start` and the stream so far counted.)"""
        self.tally.cut(self.call)

    def _block_start(
        self, writer: ChunkWriter, index: int, block: AnthropicContentBlock
    ) -> list[bytes]:
        if block.type == "tool_use":
            if self.json_tool is not None and block.name == JSON_TOOL:
                self._open(index, _BlockState("json"))
                return []
            slot, chunk = writer.tool_start(block.id, block.name)
            self._open(index, _BlockState("tool", slot))
            self.call.chunks += 1
            return [chunk]
        self._open(index, _BlockState(block.type))
        if block.type == "text" and block.text:
            self.call.chunks += 1
            self.tally.streamed += len(block.text)
            return [writer.text(block.text)]
        return []

    def _open(self, index: int, state: _BlockState) -> None:
        old = self._blocks.get(index)  # (a block started twice: the second replaces it)
        if old is not None:
            self._held.release(old.size())
        self._held.add(state.size())
        self._blocks[index] = state

    def _block_delta(self, writer: ChunkWriter, index: int, delta: AnthropicDelta) -> list[bytes]:
        state = self._blocks.get(index)
        if delta.type == "text_delta" and delta.text:
            self.call.chunks += 1
            self.tally.streamed += len(delta.text)
            return [writer.text(delta.text)]
        if delta.type == "thinking_delta" and delta.thinking:
            self.call.chunks += 1
            self.tally.streamed += len(delta.thinking)
            return [writer.reasoning(delta.thinking)]
        if delta.type == "input_json_delta" and delta.partial_json and state is not None:
            self.call.chunks += 1
            self.tally.streamed += len(delta.partial_json)
            if state.kind == "json":
                if self.json_tool is not None and self.json_tool.wrapped:
                    self._held.add(len(delta.partial_json))
                    state.held.append(delta.partial_json)  # unwrapped once it is whole
                    state.held_size += len(delta.partial_json)
                    return []
                return [writer.text(delta.partial_json)]
            if state.kind == "tool":
                state.has_arguments = True
                return [writer.tool_arguments(state.slot, delta.partial_json)]
        return []  # signature, citation and empty deltas carry nothing for OpenAI clients
