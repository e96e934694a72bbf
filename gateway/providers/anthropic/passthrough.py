"""`POST /v1/messages` (and its token count) relayed to Anthropic untranslated.

The client's body goes to `{base_url}/v1/messages` as it is, with `model` set to the upstream
model, so `cache_control`, thinking blocks and their signatures, server tools and fields added
after this was written all reach Anthropic; the client's `anthropic-version` and
`anthropic-beta` headers go with it. A whole answer is relayed untouched; events are relayed
as they arrive, each with its `event:` line, up to and including `message_stop`.

Usage is read on the way (`message_start` holds the input and cache counts, `message_delta`
the final output count) into the call in chat terms, cache writes apart; a stream the client
cuts, or that breaks, before `message_delta` is charged `message_start`'s counts
(`UsageTally.cut`). Events are
held back until the answer has content, so an `error` event that comes first (Anthropic reports
overload right after `message_start`) is still an HTTP status and another route may be tried.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, Mapping

import msgspec
import structlog
from msgspec import UNSET, UnsetType

from gateway.errors import UpstreamConnectionError, UpstreamError
from gateway.providers._answers import answer_error
from gateway.providers._errors import DECODE_ERRORS
from gateway.providers._http import UpstreamClient, done
from gateway.providers._translate import HeldAnswer
from gateway.providers.anthropic.order import Order
from gateway.providers.anthropic.response import UsageTally, event_error
from gateway.providers.anthropic.wire import AnthropicErrorBody
from gateway.providers.base import ChatCall, ChatReply
from gateway.responses.framing import event_frame
from gateway.schemas.codec import encode, opens
from gateway.schemas.common import Count

__all__ = ["MessagesRelay"]

log = structlog.get_logger(__name__)

_TRUE = msgspec.Raw(b"true")


class _StartView(msgspec.Struct):
    """A `message_start`'s message: the SDK appends blocks to its `content` and counts into its
    `usage` (read apart: a bad count must not break the stream, but it must be an object)."""

    content: list[msgspec.Raw]
    usage: msgspec.Raw
    id: object = None  # (a thread's id for what continues it: `gateway.stored`)
    container: object = None  # (the code execution container: `gateway.stored`)


class _BlockView(msgspec.Struct):
    """A started block: the SDK adds text and thinking deltas to these strings."""

    type: str = ""
    text: str | UnsetType = UNSET
    thinking: str | UnsetType = UNSET
    name: object = None  # (a server tool's: a web search is billed as it runs)
    content: msgspec.Raw | UnsetType = UNSET  # (a search's results: an object when refused)


class _MessageView(msgspec.Struct):
    """What makes a body an Anthropic `message` its SDK's users can read (the SDK does not
    check it): a list of blocks as `_BlockView`, and a `usage` object, read apart (a bad
    count must not cost the client a good answer)."""

    type: str = ""
    content: list[_BlockView] | UnsetType = UNSET
    usage: msgspec.Raw | UnsetType = UNSET
    id: object = None  # (a thread's id for what continues it: `gateway.stored`)
    container: object = None  # (the code execution container: `gateway.stored`)


class _DeltaView(msgspec.Struct):
    """A block's delta (its text, JSON or thinking, which the SDK adds up as strings), or a
    `message_delta`'s."""

    type: str = ""
    text: str | UnsetType = UNSET
    partial_json: str | UnsetType = UNSET
    thinking: str | UnsetType = UNSET
    stop_reason: object = None  # (a `message_delta`'s: whether it closes the message)
    container: object = None  # (a `message_delta`'s: the code execution container)


class _EventView(msgspec.Struct):
    """What the relay reads of an event: its order, usage, and the fields the `anthropic` SDK
    builds its message from, typed as the SDK uses them (`_shaped`)."""

    type: str = ""
    message: _StartView | None = None
    usage: msgspec.Raw | UnsetType = UNSET
    error: AnthropicErrorBody | None = None
    index: int | None = None
    content_block: _BlockView | None = None
    delta: _DeltaView | None = None


# Per block and delta type, the string field the SDK adds to (types not named: not read).
_BLOCK_TEXT = {"text": "text", "thinking": "thinking"}
_DELTA_TEXT = {
    "text_delta": "text",
    "input_json_delta": "partial_json",
    "thinking_delta": "thinking",
}


def _show_message(call: ChatCall, message_id: object, container: object) -> None:
    """What Anthropic stores for the request's key that a message shows (`gateway.stored`):
    its id (a thread continues from it), its code execution container (`{"id": ...}`, the
    files its code wrote included)."""
    if type(message_id) is str and message_id:
        call.response_id = message_id
    if isinstance(container, dict):
        call.showing().add(container.get("id"), context=True)


def _show_files(call: ChatCall, block: _BlockView) -> None:
    """The files a code execution result block says its code wrote (`file_id`s, which a
    request may name again: `container_upload`, a document's or image's source)."""
    if not block.type.endswith("code_execution_tool_result") or not isinstance(
        block.content, msgspec.Raw
    ):
        return
    try:
        result = _RESULT.decode(block.content)
    except (msgspec.MsgspecError, RecursionError):
        return  # (an error result, or one the SDK reads otherwise: no files)
    if result.content:
        shown = call.showing()
        for output in result.content:
            shown.add(output.file_id)


class _Output(msgspec.Struct):
    file_id: object = None


class _Result(msgspec.Struct):
    """A code execution result (the block's `content`): its outputs, each a file it wrote
    (an error result has none)."""

    content: list[_Output] = []


_RESULT = msgspec.json.Decoder(_Result)


def _block_shaped(block: _BlockView | None) -> bool:
    """Whether a block holds the string the SDK (or its user) reads of its type."""
    return block is not None and getattr(block, _BLOCK_TEXT.get(block.type, "type")) is not UNSET


def _searches(block: _BlockView) -> int:
    """What a block adds to the web searches the server ran (billed a call each): a
    `server_tool_use` block of `web_search` starts one (1); a `web_search_tool_result` whose
    content is an error object, not a list of results, says it was refused (-1: Claude tried
    past `max_uses`, and a refused search is not billed)."""
    if block.type == "server_tool_use":
        return 1 if block.name == "web_search" else 0
    if block.type == "web_search_tool_result":
        return -1 if opens(block.content, b"{") else 0
    return 0


def _readable(view: _MessageView) -> bool:
    """Whether a whole answer is a `message` its SDK's users can read as one."""
    if view.type != "message" or view.content is UNSET or not opens(view.usage, b"{"):
        return False
    return all(map(_block_shaped, view.content))


def _shaped(kind: str, event: _EventView) -> bool:
    """Whether an event holds what the `anthropic` SDK reads of it, as it reads it (a null
    text or usage crashed its accumulator with a TypeError or AttributeError, not an API
    error). Fields and types added after this was written pass."""
    if kind == "content_block_delta":
        delta = event.delta
        return (
            delta is not None and getattr(delta, _DELTA_TEXT.get(delta.type, "type")) is not UNSET
        )
    if kind == "content_block_start":
        return _block_shaped(event.content_block)
    if kind == "message_start":
        return event.message is not None and opens(event.message.usage, b"{")
    if kind == "message_delta":
        return event.delta is not None and opens(event.usage, b"{")
    return True


class _CountView(msgspec.Struct):
    input_tokens: Count


_MESSAGE = msgspec.json.Decoder(_MessageView)
_EVENT = msgspec.json.Decoder(_EventView)
_COUNT = msgspec.json.Decoder(_CountView)


class MessagesRelay:
    """Relays Messages API requests to one Anthropic upstream through its provider's client."""

    def __init__(self, http: UpstreamClient, root: str) -> None:
        self._http = http
        self._name = http.config.name
        self._limit = http.config.max_response_bytes
        self._url = f"{root}/v1/messages"
        self._count_url = f"{root}/v1/messages/count_tokens"

    def _body(self, call: ChatCall, body: dict[str, msgspec.Raw], *, stream: bool) -> bytes:
        fields = dict(body)
        fields["model"] = msgspec.Raw(encode(call.upstream_model))
        if stream:
            fields["stream"] = _TRUE
        return encode(fields)

    async def create(
        self, call: ChatCall, body: dict[str, msgspec.Raw], headers: Mapping[str, str]
    ) -> ChatReply:
        data = self._body(call, body, stream=False)
        answer = await self._http.post(self._url, data, call, headers)
        view = self._http.decode(_MESSAGE, answer, "message")
        if not _readable(view):
            raise answer_error(self._name, answer, "message")
        _show_message(call, view.id, view.container)
        for block in view.content or ():
            _show_files(call, block)
        tally = UsageTally(self._name)
        tally.merge(view.usage)
        tally.searches = sum(map(_searches, view.content or ()))
        tally.account(call)
        if call.usage is None:  # (no count: what the answer shows is billed all the same)
            tally.billed(call)
        return ChatReply(body=answer, usage=call.usage)

    async def count(
        self, call: ChatCall, body: dict[str, msgspec.Raw], headers: Mapping[str, str]
    ) -> bytes:
        data = self._body(call, body, stream=False)
        answer = await self._http.post(self._count_url, data, call, headers)
        self._http.decode(_COUNT, answer, "token count")  # only a real count is relayed
        return answer

    async def stream(
        self, call: ChatCall, body: dict[str, msgspec.Raw], headers: Mapping[str, str]
    ) -> AsyncGenerator[list[bytes], None]:
        tally = UsageTally(self._name)
        order = Order()
        held: list[bytes] = []
        # Held until the first content (pings, `message_start`), bounded as a whole answer.
        bound = HeldAnswer("a Messages stream before its first content", self._limit)
        events = self._http.stream(self._url, self._body(call, body, stream=True), call, headers)
        try:
            async with contextlib.aclosing(events):
                async for batch in events:
                    before = len(held)
                    ended, error = self._reframe(call, batch, tally, order, held)
                    if not call.chunks:
                        bound.add(sum(map(len, held[before:])))
                    if error is not None:
                        if held and call.chunks:
                            yield held  # what came before the error still reaches the client
                        raise error
                    if ended:
                        # Whatever follows (or a connection left open) is not ours; the
                        # connection goes back to the pool if the body ends.
                        await done(events)
                    if held and (call.chunks or ended):
                        yield held
                        held = []
                    if ended:
                        return
            # Cut like a dropped connection (which a retry may fix before the first event).
            raise UpstreamConnectionError(
                f"The upstream provider '{self._name}' ended the stream before the message "
                "was complete."
            )
        except BaseException:
            # Cut (the client hung up, the deadline) or broken (an error event, the connection,
            # a timeout): what message_start reported counts. (A first batch's failure is not
            # charged: `failover.attempt_each` clears the call.)
            tally.cut(call)
            raise

    def _reframe(
        self, call: ChatCall, batch: list[bytes], tally: UsageTally, order: Order, out: list[bytes]
    ) -> tuple[bool, UpstreamError | None]:
        """Frame one batch's events into `out`; (saw `message_stop`, an upstream error)."""
        for payload in batch:
            try:
                event = _EVENT.decode(payload)
            except DECODE_ERRORS:
                return False, UpstreamError(
                    f"The upstream provider '{self._name}' sent a malformed stream event."
                )
            kind = event.type
            if not kind or not kind.isascii() or not kind.replace("_", "").isalnum():
                return False, UpstreamError(
                    f"The upstream provider '{self._name}' sent a malformed stream event."
                )
            if kind == "error":
                return False, event_error(self._name, event.error or AnthropicErrorBody())
            if not _shaped(kind, event):
                return False, UpstreamError(
                    f"The upstream provider '{self._name}' sent a malformed '{kind}' event."
                )
            if not order.allows(kind, event.index):
                return False, UpstreamError(
                    f"The upstream provider '{self._name}' sent '{kind}' out of order."
                )
            if kind == "message_start" and event.message is not None:
                tally.merge(event.message.usage)
                _show_message(call, event.message.id, event.message.container)
            elif kind == "message_delta":
                delta = event.delta
                if delta is not None:
                    _show_message(call, None, delta.container)
                stop = delta.stop_reason if delta is not None else None
                tally.delta(event.usage, stop if isinstance(stop, str) else None)
            elif kind == "content_block_start":
                tally.content += 1
                block = event.content_block  # (`_shaped`: one)
                if block is not None:
                    tally.searches += _searches(block)  # (billed as it runs: counted if cut)
                    _show_files(call, block)
            elif kind == "content_block_delta":
                tally.content += 1
                call.chunks += 1
                delta = event.delta  # (`_shaped`: one, with its type's string if it has one)
                if delta is not None:
                    text = delta.text or delta.partial_json or delta.thinking
                    if text:
                        tally.streamed += len(text)
            out.append(event_frame(kind.encode(), payload))
            if kind == "message_stop":
                tally.closed(call)  # (cut before it: `UsageTally.cut`)
                return True, None
        return False, None
