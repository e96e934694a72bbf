"""`POST /v1/responses` passed through to OpenAI-compatible upstreams (`responses_api = true`).

The client's body goes to `{base_url}/responses` as it is, with `model` set to the upstream
model, the model's default output limit filled in when the request sets none, and `call_id`s
longer than OpenAI's 64 characters shortened (`_call_ids`). A whole
answer is relayed untouched; events are relayed as they arrive, each with its `event:` line,
up to and including the terminal `response.completed`/`.incomplete`/`.failed` event, after
which the upstream is not read any further. Usage is read from the final `response`.

An upstream `error` event (flat as documented, or wrapped in `error` as OpenAI sends it) is
classified by its typed `type` and `code` the way an error status would be, so that e.g. a
`context_length_exceeded` before the first event is the client's 400, not a retryable 503
(`_answers.event_error`); a whole answer that is not a `response` is refused likewise.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, Sequence

import msgspec
import structlog

from gateway.errors import UpstreamConnectionError, UpstreamError
from gateway.providers._answers import event_error, response_usage, served_at
from gateway.providers._call_ids import short_input_ids
from gateway.providers._errors import DECODE_ERRORS, stream_error
from gateway.providers._http import UpstreamClient, done
from gateway.providers.base import ChatCall, ChatReply
from gateway.providers.responses_order import (
    EVENT_VIEW,
    EventView,
    ResponsesOrder,
    StreamItem,
)
from gateway.responses.framing import event_frame
from gateway.schemas.codec import encode, present
from gateway.schemas.response_output import ResponseUsage
from gateway.tool_fees import Item

__all__ = ["ResponsesRelay"]

log = structlog.get_logger(__name__)

_TRUE = msgspec.Raw(b"true")


class _ResponseUsageView(msgspec.Struct):
    usage: ResponseUsage | None = None
    service_tier: object = None  # (the tier it was served at: `_answers.served_at`)


class _TerminalView(msgspec.Struct):
    """The `response` (with usage) that a terminal Responses stream event carries."""

    response: _ResponseUsageView | None = None


_TERMINAL_USAGE = msgspec.json.Decoder(_TerminalView)


class _OutputItem(Item):
    """An output item as billed (`tool_fees.Item`), and what names the container of a shell
    call (`gateway.stored`)."""

    environment: object = None


class _Answer(msgspec.Struct):
    """What a whole `response` is read for beyond its usage: its id, conversation and items'
    ids (what the upstream stores: `gateway.stored`) and its items (web searches, billed a
    call each, and the other built-in tools' calls billed beyond tokens: `tool_fees`)."""

    id: object = None
    output: list[_OutputItem] = []
    conversation: object = None


class _Added(msgspec.Struct):
    """A stream's `response.output_item.added` or `.done` event: the item and its place."""

    item: Item | None = None
    output_index: object = None


class _TerminalItems(msgspec.Struct):
    response: _Answer | None = None


_ANSWER = msgspec.json.Decoder(_Answer)
_ADDED = msgspec.json.Decoder(_Added)
_TERMINAL_ITEMS = msgspec.json.Decoder(_TerminalItems)
_SEARCH = "web_search_call"
_SEARCHED = "response.web_search_call.completed"  # (one event a search, on a stream)
_ITEM_EVENTS = frozenset({"response.output_item.added", "response.output_item.done"})
_PARTIAL_IMAGE = "response.image_generation_call.partial_image"


def _read_answer(call: ChatCall, answer: bytes) -> None:
    """Take a whole `response`'s id, the web searches it shows (`web_search_call` items)
    and its other billed tool calls (`ChatCall.server_tools`) into `call`."""
    try:
        view = _ANSWER.decode(answer)
    except (msgspec.MsgspecError, RecursionError):
        return  # (checked as a response already: nothing more to take)
    if isinstance(view.id, str) and view.id:
        call.response_id = view.id
    call.showing().add(_conversation_id(view.conversation), context=True)
    for item in view.output:
        _show_item(call, item)
    call.web_searches = sum(1 for item in view.output if item.type == _SEARCH)
    _take_items(call, view.output)


def _show_item(call: ChatCall, item: _OutputItem | StreamItem) -> None:
    """An output item's id, and the container it ran in (a code interpreter call's
    `container_id`, a shell call's `environment`)."""
    shown = call.showing()
    shown.add(item.id)
    shown.add(item.container_id, context=True)
    shown.add(_container_of(item.environment), context=True)


def _conversation_id(conversation: object) -> object:
    """A response's `conversation` (`{"id": ...}`) as its id."""
    return conversation.get("id") if isinstance(conversation, dict) else None


def _container_of(environment: object) -> object:
    """The container a shell call's `environment` names (`container_reference`), if any."""
    return environment.get("container_id") if isinstance(environment, dict) else None


def _take_items(call: ChatCall, items: Sequence[Item]) -> None:
    """Count a whole `response`'s billed calls (its answer: nothing of it was cut)."""
    tools = call.server_tools
    if tools is not None:
        tools.answered = True
        for at, item in enumerate(items):
            tools.take(item, at)


def _take_event(call: ChatCall, kind: str, payload: bytes) -> None:
    """Count the billed tool call a stream event shows (`ChatCall.server_tools`): an item
    added or done (billed as it runs: counted if the stream is cut), a partial image."""
    tools = call.server_tools
    if tools is None:
        return
    if kind == _PARTIAL_IMAGE:
        tools.partial_image()
        return
    try:
        event = _ADDED.decode(payload)
    except (msgspec.MsgspecError, RecursionError):
        return  # (checked in order already: an item the gateway cannot read bills nothing)
    if event.item is not None:
        at = event.output_index
        tools.take(event.item, at if type(at) is int else None)


# The events that end a Responses stream; each carries the whole `response`, usage included.
_TERMINAL = frozenset({"response.completed", "response.incomplete", "response.failed"})


class ResponsesRelay:
    """Relays Responses API requests to one upstream through its provider's client."""

    def __init__(self, http: UpstreamClient, url: str) -> None:
        self._http = http
        self._name = http.config.name
        self._url = url

    def _body(self, call: ChatCall, body: dict[str, msgspec.Raw]) -> bytes:
        fields = dict(body)
        fields["model"] = msgspec.Raw(encode(call.upstream_model))
        items = short_input_ids(fields["input"]) if "input" in fields else None
        if items is not None:  # call ids minted elsewhere, too long for OpenAI
            fields["input"] = items
        if not present(fields.get("max_output_tokens")) and call.max_tokens is not None:
            fields["max_output_tokens"] = msgspec.Raw(encode(call.max_tokens))
        return encode(fields)

    async def create(self, call: ChatCall, body: dict[str, msgspec.Raw]) -> ChatReply:
        answer = await self._http.post(self._url, self._body(call, body), call)
        call.usage = response_usage(self._name, answer, call)  # raises unless a `response`
        _read_answer(call, answer)
        return ChatReply(body=answer, usage=call.usage)

    async def stream(
        self, call: ChatCall, body: dict[str, msgspec.Raw]
    ) -> AsyncGenerator[list[bytes], None]:
        fields = dict(body)
        fields["stream"] = _TRUE
        events = self._http.stream(self._url, self._body(call, fields), call)
        order = ResponsesOrder()
        async with contextlib.aclosing(events):
            async for batch in events:
                out, ended, error = self._reframe(call, batch, order)
                if out:
                    yield out  # events before an error still reach the client
                if error is not None:
                    raise error
                if ended:
                    # Whatever follows (or a connection left open) is not ours; the connection
                    # goes back to the pool if the body ends.
                    await done(events)
                    return
        # Cut like a dropped connection (which a retry may fix before the first event).
        raise UpstreamConnectionError(
            f"The upstream provider '{self._name}' ended the stream before the "
            "response was complete."
        )

    def _reframe(
        self, call: ChatCall, batch: list[bytes], order: ResponsesOrder
    ) -> tuple[list[bytes], bool, UpstreamError | None]:
        """Split one batch into (framed events for the client, ended, upstream error).

        `ended` means a terminal event was the last one taken: the rest is dropped.
        """
        out: list[bytes] = []
        for payload in batch:
            if payload.startswith(b"[DONE]"):  # not sent by OpenAI; some servers do
                continue
            try:
                kind = self._event_type(call, payload, order)
            except UpstreamError as exc:
                return out, False, exc
            if kind == "error":
                if call.server_tools is not None:  # (the upstream's word: nothing was cut)
                    call.server_tools.answered = True
                return out, False, event_error(self._name, payload)
            out.append(event_frame(kind.encode(), payload))
            if kind in _TERMINAL:
                return out, True, None
        return out, False, None

    def _event_type(self, call: ChatCall, payload: bytes, order: ResponsesOrder) -> str:
        """One upstream event's type, once it is in order; usage of a terminal event is
        accounted on the way."""
        try:
            event: EventView | None = EVENT_VIEW.decode(payload)
        except DECODE_ERRORS:
            event = None
        kind = event.type if event is not None else ""
        if not kind and stream_error(self._name, payload) is not None:
            return "error"  # a chat-style {"error": {...}} event
        if event is None or not kind or "\n" in kind or "\r" in kind:
            raise UpstreamError(
                f"The upstream provider '{self._name}' sent a malformed stream event."
            )
        if kind != "error" and not order.allows(event):
            raise UpstreamError(f"The upstream provider '{self._name}' sent '{kind}' out of order.")
        # What the upstream stores for the key, as soon as an event shows it (a stream cut
        # before its terminal event stored it all the same): the response (`response.created`
        # first), its conversation, its items and their containers.
        response = event.response
        if response is not None:
            if response.id:
                call.response_id = response.id
            call.showing().add(_conversation_id(response.conversation), context=True)
            for item in response.output or ():
                _show_item(call, item)
        if event.item is not None:
            _show_item(call, event.item)
        if kind in _TERMINAL:
            try:
                view = _TERMINAL_USAGE.decode(payload).response
            except msgspec.ValidationError:
                log.warning("upstream_usage_unreadable", provider=self._name)
            else:
                if view is not None and view.usage is not None:
                    call.usage = view.usage.to_usage()
                    served_at(call, view.service_tier)
            if call.server_tools is not None:
                call.server_tools.answered = True
                try:
                    whole = _TERMINAL_ITEMS.decode(payload).response
                except (msgspec.MsgspecError, RecursionError):
                    whole = None
                if whole is not None:
                    _take_items(call, whole.output)
        elif kind.endswith(".delta"):
            call.chunks += 1
        elif kind == _SEARCHED:
            call.web_searches += 1
        elif kind in _ITEM_EVENTS or kind == _PARTIAL_IMAGE:
            _take_event(call, kind, payload)
        return kind
