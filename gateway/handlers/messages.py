"""`POST /v1/messages` and `POST /v1/messages/count_tokens`: Anthropic's Messages API.

A request is translated into a chat request first (`messages.to_chat`), so the pipeline
applies the same model, permission, limit, budget and routing checks as chat completions do.
Which way it goes (`passthrough.native_first`): to Anthropic upstreams the client's own body
(model rewritten) with its `anthropic-version` and `anthropic-beta` headers, their answer or
events relayed; to the others the translated chat request, whose completion or chunks become
a `message` or Anthropic's event stream. Errors on these routes are Anthropic-shaped (see
`messages.errors`; the middleware writes them, the streams end with an `error` event).

A token count is the Anthropic upstream's when the model's first route is one, else the
gateway's estimate of the translated request; it uses no tokens, so it holds none of the key's
budget, but counts as a request against its limits and gets a usage row.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import AsyncIterator, Awaitable, Iterable
from typing import Any, cast

import msgspec
from aiohttp import web
from msgspec import UNSET

from gateway import pipeline
from gateway.errors import InvalidRequest
from gateway.failover import Exchange
from gateway.messages import MessageEvents, Translation, error_event, from_completion, to_chat
from gateway.messages.errors import anthropic_status
from gateway.messages.schema import MessagesRequest
from gateway.passthrough import Remembering, native_first, relays
from gateway.providers import ChatCall
from gateway.providers.base import has_capability
from gateway.providers.capabilities import MessagesPassThrough
from gateway.router import Route
from gateway.schemas.codec import (
    decode_body,
    encode,
    may_spell,
    opens,
    raw_object,
    spells_escaped,
)
from gateway.settings import ModelConfig
from gateway.sse import relay
from gateway.state import PRINCIPAL_KEY, STORED_KEY, STORED_SHARE_KEY
from gateway.stored import LONGEST_ID, MOST_LOOKED_UP, Naming, StoredResponses, too_many
from gateway.tokens import Estimate, estimate_text_tokens
from gateway.trace import TRACE_KEY
from gateway.usage_bounds import MOST_SEARCHES, UNCAPPED_SEARCHES

__all__ = ["count_tokens", "create_message"]

# The client headers an Anthropic upstream gets too; anything else (its key!) never does.
_FORWARDED = ("anthropic-version", "anthropic-beta")
_HEADER_VALUE = re.compile(r"^[A-Za-z0-9._,: -]{1,1024}$")


def _headers(request: web.Request) -> dict[str, str]:
    """The client's `anthropic-version` and `anthropic-beta`, for Anthropic upstreams.

    Raises:
        InvalidRequest: a value no Anthropic header has (checked before it goes anywhere).
    """
    out: dict[str, str] = {}
    for name in _FORWARDED:
        value = request.headers.get(name)
        if value is None:
            continue
        if not _HEADER_VALUE.match(value):
            raise InvalidRequest(f"{name}: invalid header value.", param=name)
        out[name] = value
    return out


def _refuse_other_models(request: web.Request, req: MessagesRequest) -> None:
    """Refuse `fallbacks` (Anthropic's server-side fallback beta: other models, at other
    speeds, that answer when the requested one declines) and the advisor tool (another model
    consulted, billed at its rates) to a key whose budget is in USD or whose models are
    listed: those models bypass the key's list and the gateway's prices (the answer is charged
    at the requested model's). Other keys have them relayed.

    Raises:
        InvalidRequest: such a key, and fallbacks that name anything (param `fallbacks`), or
            an `advisor_*` tool (param `tools`).
    """
    key = request[PRINCIPAL_KEY].key
    restricted = key.budget_usd is not None or bool(key.models)
    if restricted and any(
        isinstance(tool.type, str) and tool.type.startswith("advisor") for tool in req.tools or ()
    ):
        raise InvalidRequest(
            "tools: the advisor tool is not supported for this API key: its model is served "
            "outside the models and prices the key is held to. Send the request without it.",
            param="tools",
            code="unsupported_parameter",
        )
    raw = req.fallbacks
    if raw is UNSET:
        return
    given = bytes(raw).strip()
    if given in (b"null", b"[]"):
        return
    if not (given.startswith(b"[") or given == b'"default"'):
        raise InvalidRequest('fallbacks: a list of models, or "default".', param="fallbacks")
    if restricted:
        raise InvalidRequest(
            "fallbacks: not supported for this API key: a fallback model is served outside "
            "the models and prices the key is held to. Send the request without it.",
            param="fallbacks",
            code="unsupported_parameter",
        )


def _native(route: Route) -> MessagesPassThrough:
    # native_first gives relayed() only routes that have the capability.
    return cast(MessagesPassThrough, route.provider)


async def _begin(
    request: web.Request, body: bytes
) -> tuple[MessagesRequest, Translation, Exchange[ChatCall], Naming]:
    """Decode and translate the request; open its exchange (see `pipeline.open_exchange`);
    what it names of what Anthropic stores (`_stored`)."""
    req = decode_body(body, MessagesRequest)
    if not req.messages and not _continues(req):
        # (A thread continued after a `pause_turn` sends none: the server holds the turn.)
        raise InvalidRequest(
            "Invalid request body at 'messages': Expected `array` of length >= 1",
            param="messages",
        )
    named, held = _stored(request, req, body)

    async def look_up(call: ChatCall, routes: list[Route]) -> None:
        """The ids no process here ever showed, asked of the database once the key may use
        the model (`gateway.stored_share`), when a route relays them (a translated request
        sends none upstream), and whether any process saw a file (which turns on the search
        for files), both within one deadline; what it knew is read again."""
        nonlocal named
        if not relays(routes, MessagesPassThrough, translations[0].refusal):
            return
        share = request.app[STORED_SHARE_KEY]
        deadline = share.deadline()
        files = False  # (searched for files though none is known here)
        if (
            not request.app[STORED_KEY].files
            and may_spell(body, b'file_id"')
            and _FILE_ID.search(body)
            and await share.files_seen()
        ):
            files = True
            named, call.stored_prompt = _stored(request, req, body, files=True)
        key_id = request[TRACE_KEY].key_id
        if named.unresolved and await share.resolve(named, key_id, deadline):
            named, call.stored_prompt = _stored(request, req, body, files=files)

    if request.path.endswith("/count_tokens"):
        free = True
    else:
        free = False
        if req.max_tokens is UNSET:
            raise InvalidRequest("max_tokens: Field required", param="max_tokens")
        _refuse_other_models(request, req)
    translations: list[Translation] = []

    def messages_call(model: ModelConfig) -> ChatCall:
        translations.append(to_chat(req, reasoning=model.reasoning))
        return ChatCall(
            request=translations[0].chat,
            model=model,
            held_searches=_searches_at_most(req),
            searches_on=MessagesPassThrough,
            held_writes=_cache_writes(body),
            stored_prompt=held,
            speed=req.speed[:32] if isinstance(req.speed, str) else "",
        )

    ex = await pipeline.open_exchange(request, req.model, messages_call, free=free, prepare=look_up)
    return req, translations[0], ex, named


def _searches_at_most(req: MessagesRequest) -> int:
    """The web searches the request's server tools may make: each `web_search` tool's
    `max_uses`, or `UNCAPPED_SEARCHES` without one.

    Raises:
        InvalidRequest: a `max_uses` past `MOST_SEARCHES` (a key's budget holds each search).
    """
    if not req.tools:
        return 0
    most = 0
    for i, tool in enumerate(req.tools):
        if isinstance(tool.type, str) and tool.type.startswith("web_search"):
            uses = tool.max_uses
            if type(uses) is not int or uses < 0:
                most += UNCAPPED_SEARCHES
            elif uses > MOST_SEARCHES:
                raise InvalidRequest(
                    f"tools.{i}.max_uses: at most {MOST_SEARCHES} searches a request.",
                    param=f"tools.{i}.max_uses",
                )
            else:
                most += uses
    return most


# An escape of a character JSON never needs escaped (ASCII from " " to DEL): what may spell
# `cache_control` or a ttl's "1h" in a hidden way. (Clients escape non-ASCII text, not these.)
_ASCII_ESCAPE = re.compile(rb"\\u00[2-7]")


def _cache_writes(body: bytes) -> str:
    """How a Messages request's prompt may be written to the prompt cache: "1h" when it asks
    for an hour's (`"ttl": "1h"`), "5m" for other `cache_control` marks, "" for none. Found
    in the body's bytes; a body that escapes ASCII characters is read for its marks where
    Anthropic takes them (`_Marks`: the rest skipped unread)."""
    if _ASCII_ESCAPE.search(body) is not None:
        try:
            return _MARKS.decode(body).writes()
        except (msgspec.MsgspecError, RecursionError):
            return "1h"  # (read whole before: held at the most it may be)
    if body.find(b"cache_control") < 0:
        return ""
    return "1h" if body.find(b'"1h"') >= 0 else "5m"


_NULL = msgspec.Raw(b"null")


class _Inner(msgspec.Struct):
    """A tool result's block: its `cache_control`, if any."""

    cache_control: object = None  # (an object marks; any other shape is refused upstream)

    def writes(self) -> str:
        mark = self.cache_control
        if isinstance(mark, dict):
            return "1h" if mark.get("ttl") == "1h" else "5m"
        return ""


class _Marked(_Inner):
    """A block or a tool, and a tool result's blocks."""

    content: msgspec.Raw = _NULL

    def writes(self) -> str:
        return super().writes() or _most(_blocks(self.content, _INNER))


class _Said(msgspec.Struct):
    content: msgspec.Raw = _NULL

    def writes(self) -> str:
        return _most(_blocks(self.content, _BLOCKS))


class _Marks(msgspec.Struct):
    """Where a Messages request may mark its prompt for the cache: its system blocks, its
    messages' blocks (and a tool result's), its tools."""

    system: msgspec.Raw = _NULL
    messages: list[_Said] = []
    tools: list[_Marked] | None = None

    def writes(self) -> str:
        found = max(_most(self.tools or ()), _most(_blocks(self.system, _BLOCKS)), key=_RANK.index)
        return max(found, _most(self.messages), key=_RANK.index)


def _blocks(value: msgspec.Raw, blocks: msgspec.json.Decoder[list[Any]]) -> list[Any]:
    """A content that is a list of blocks, read as `blocks` reads them (a string: none)."""
    return blocks.decode(value) if opens(value, b"[") else []


_RANK = ("", "5m", "1h")


def _most(items: Iterable[_Marked | _Said | _Inner]) -> str:
    found = ""
    for item in items:
        writes = item.writes()
        if writes == "1h":
            return writes
        found = found or writes
    return found


_MARKS = msgspec.json.Decoder(_Marks)
_BLOCKS = msgspec.json.Decoder(list[_Marked])
_INNER = msgspec.json.Decoder(list[_Inner])


async def create_message(request: web.Request) -> web.StreamResponse:
    """Anthropic's Messages API; `model`, `messages` and `max_tokens` are required."""
    request[TRACE_KEY].metered = True  # every authenticated model request gets a usage row
    body = await request.read()
    headers = _headers(request)
    req, translation, ex, named = await _begin(request, body)
    try:
        return await native_first(
            ex,
            MessagesPassThrough,
            translation.refusal,
            lambda: _relayed(ex, body, headers, named, stream=req.is_stream),
            lambda: _translated(ex, stream=req.is_stream),
        )
    finally:
        pipeline.finish(ex)


class _IdObject(msgspec.Struct):
    id: object = None


class _Thread(msgspec.Struct):
    type: object = None
    previous_message_id: object = None


class _Diagnostics(msgspec.Struct):
    previous_message_id: object = None


class _FileBlock(msgspec.Struct):
    """A content block as far as it may name a file: its `file_id` (`container_upload`), its
    `source` (a document's or image's: a file, or content holding more blocks; a
    `search_result`'s is a string) and its `content` (a tool result's blocks). The rest
    (text, a tool call's input...) is skipped unread."""

    file_id: object = None
    source: _FileSource | str | None = None
    content: list[_FileBlock] | str | None = None


class _FileSource(msgspec.Struct):
    file_id: object = None
    content: list[_FileBlock] | str | None = None


class _FileTurn(msgspec.Struct):
    content: list[_FileBlock] | str = ""


class _FileTurns(msgspec.Struct):
    messages: list[_FileTurn] = []


_NULL = msgspec.Raw(b"null")


class _RawTurn(msgspec.Struct):
    content: msgspec.Raw = _NULL  # (a Raw cannot be in a union)


class _RawTurns(msgspec.Struct):
    messages: list[_RawTurn] = []


class _RawBlock(msgspec.Struct):
    """A block or source of a shape the view above does not take, each field left raw: only
    what may hold a file is read further (nothing else is parsed, numbers included)."""

    file_id: msgspec.Raw = _NULL
    source: msgspec.Raw = _NULL
    content: msgspec.Raw = _NULL


# How deep in a message's content a named file is looked for (a document in a tool result's
# content is 3 levels down; the request's own nesting is bounded where it was decoded).
_FILE_DEPTH = 16


_CONTAINER = msgspec.json.Decoder(str | _IdObject | None)
_THREAD = msgspec.json.Decoder(_Thread)
_DIAGNOSTICS = msgspec.json.Decoder(_Diagnostics)
_FILE_TURNS = msgspec.json.Decoder(_FileTurns)
_RAW_TURNS = msgspec.json.Decoder(_RawTurns)
_RAW_BLOCK = msgspec.json.Decoder(_RawBlock)
_RAW_LIST = msgspec.json.Decoder(list[msgspec.Raw])
_ANY = msgspec.json.Decoder()
# A `"file_id": "<string>"` member, its key spelled with any character as a `\u` escape, whose
# string could spell a remembered id (`LONGEST_ID` characters, each at most a 6-byte escape):
# a longer one names no known file, and reading it to its end cost the regular expression a
# step a character (10 s for a 30 MB value).
# The value: runs of plain characters between escapes, each run and their number at most that
# long, never given back once read (a longer value, which the closing quote does not follow,
# fails at once: read a character at a time and backtracked, such near misses cost 36 ms a
# megabyte).
_FILE_VALUE = rb'\s*:\s*("[^"\\]{0,%d}+(?:\\.[^"\\]{0,%d}+){0,%d}+")' % ((6 * LONGEST_ID,) * 3)
_FILE_ID = re.compile(
    rb'"((?:f|\\u0066)(?:i|\\u0069)(?:l|\\u006[cC])(?:e|\\u0065)(?:_|\\u005[fF])'
    rb'(?:i|\\u0069)(?:d|\\u0064))"' + _FILE_VALUE
)
# `_FILE_ID` for a body that escapes no letter of the key: its value only.
_PLAIN_FILE_ID = re.compile(rb'"file_id"' + _FILE_VALUE)
_DECODE = (msgspec.MsgspecError, RecursionError)


def _stored(
    request: web.Request, req: MessagesRequest, body: bytes, *, files: bool = False
) -> tuple[Naming, Estimate | None]:
    """What Anthropic stores that the request names (`gateway.stored`): a code execution
    container (`container`: an id or `{"id"}`), the message a thread continues from
    (`thread.previous_message_id`) or that diagnostics compare with, files its code wrote
    (`file_id` of a `container_upload` block or a file source); and the conversation a
    continued thread bills as its prompt again (its size when known here, else held as a
    file sent by id), None when there is none. Files are searched for once some answer
    showed one (`StoredResponses.files`), or with `files`.

    Raises:
        NotFound: one of them is another key's: what Anthropic stored for that key, which it
            would give this one.
    """
    named = Naming()
    known = request.app[STORED_KEY]
    key_id = request[TRACE_KEY].key_id
    held: Estimate | None = None
    with contextlib.suppress(*_DECODE):  # (what Anthropic refuses is not looked at)
        if isinstance(req.container, msgspec.Raw):
            container = _CONTAINER.decode(req.container)
            container = container.id if isinstance(container, _IdObject) else container
            named.name(known, key_id, container, "container", "Container")
    with contextlib.suppress(*_DECODE):
        if isinstance(req.thread, msgspec.Raw):
            thread = _THREAD.decode(req.thread)
            previous = thread.previous_message_id
            if thread.type == "continue" and isinstance(previous, str):
                param = "thread.previous_message_id"
                named.name(known, key_id, previous, param, "Message", "thread_not_found")
                held = known.prompt(previous, key_id)
    with contextlib.suppress(*_DECODE):
        if isinstance(req.diagnostics, msgspec.Raw):
            previous = _DIAGNOSTICS.decode(req.diagnostics).previous_message_id
            named.name(known, key_id, previous, "diagnostics.previous_message_id", "Message")
    if (files or known.files) and may_spell(body, b'file_id"'):
        _name_files(named, known, key_id, body)
    return named, held


def _name_files(named: Naming, known: StoredResponses, key_id: str | None, body: bytes) -> None:
    """Name every file the messages' content names, at whatever depth (`container_upload`, a
    document's or image's file source, one in a tool result's content or a content source's).

    Every `"file_id": "..."` of the body, its key spelled however JSON may, is found by one
    regular expression (about 2 ms a megabyte; up to about 25 for a body made of such
    members), each value read once however often it is named; more than `MOST_LOOKED_UP`
    of them is refused. One that is another key's is refused wherever
    it is; the messages are read for where, to name that place as the `param` (through a view
    of only where files go, else, for a shape the view does not take, such as an error
    result's object `content`, block by block with each field left raw).

    Raises:
        NotFound: one is another key's (`Naming.name`).
        InvalidRequest: the messages cannot be read (never, for a body read whole already),
            or they name more than `MOST_LOOKED_UP` files.
    """
    if spells_escaped(body, b'file_id"'):
        values = dict.fromkeys(value for _, value in _FILE_ID.findall(body))
    else:  # (the key as it is: a simpler expression, about twice as fast on many members)
        values = dict.fromkeys(_PLAIN_FILE_ID.findall(body))
    if len(values) > MOST_LOOKED_UP:
        raise too_many(len(values))
    candidates: list[str] = []
    for value in values:
        with contextlib.suppress(*_DECODE):
            candidate = _ANY.decode(value)
            if type(candidate) is str:
                candidates.append(candidate)
    if any(known.others(candidate, key_id) for candidate in candidates):
        _find_files(named, known, key_id, body)  # (refused with its place, if it has one)
    for candidate in candidates:
        # Named, for what its answer echoes (`Naming`); and one that is another key's but was
        # not placed (a duplicate key the read takes the last of, where Anthropic's parser may
        # take the first) is refused all the same.
        named.name(known, key_id, candidate, "messages", "File")


def _find_files(named: Naming, known: StoredResponses, key_id: str | None, body: bytes) -> None:
    """`_name_files`' read of the messages for where each file is.

    Raises:
        NotFound: one is another key's (`Naming.name`).
        InvalidRequest: the messages cannot be read.
    """
    found: list[tuple[str, object]] = []
    try:
        turns = _FILE_TURNS.decode(body).messages
    except _DECODE:
        try:
            for at, raw in enumerate(_RAW_TURNS.decode(body).messages):
                _raw_files(raw.content, ("messages", at, "content"), found, 0)
        except _DECODE:  # (it was read whole already: never, unless it is not JSON)
            raise InvalidRequest(
                "The request's messages could not be read.", param="messages"
            ) from None
    else:
        for at, turn in enumerate(turns):
            if isinstance(turn.content, list):
                _files(turn.content, ("messages", at, "content"), found, 0)
    for where, file_id in found:
        named.name(known, key_id, file_id, where, "File")


def _files(
    blocks: list[_FileBlock], at: tuple[str | int, ...], found: list[tuple[str, object]], depth: int
) -> None:
    """The `file_id`s in `blocks` and below, with where each is (made only for one found)."""
    if depth > _FILE_DEPTH:
        return
    for place, block in enumerate(blocks):
        file_id, source, content = block.file_id, block.source, block.content
        if file_id is None and source is None and content is None:
            continue  # (nearly every block: text, a tool call, an image by data)
        here = (*at, place)
        if file_id is not None:
            found.append((_path((*here, "file_id")), file_id))
        if isinstance(source, _FileSource):
            if source.file_id is not None:
                found.append((_path((*here, "source", "file_id")), source.file_id))
            if isinstance(source.content, list):
                _files(source.content, (*here, "source", "content"), found, depth + 1)
        if isinstance(content, list):
            _files(content, (*here, "content"), found, depth + 1)


def _raw_files(
    value: msgspec.Raw, at: tuple[str | int, ...], found: list[tuple[str, object]], depth: int
) -> None:
    """`_files` for a raw value of a shape the view does not take: a list is walked, an
    object read for its `file_id`, `source` and `content`, anything else holds no file."""
    if depth > _FILE_DEPTH:
        return
    first = memoryview(value)[:1].tobytes()
    if first == b"[":
        for place, item in enumerate(_RAW_LIST.decode(value)):
            _raw_files(item, (*at, place), found, depth + 1)
    elif first == b"{":
        block = _RAW_BLOCK.decode(value)
        if memoryview(block.file_id)[:1].tobytes() == b'"':
            found.append((_path((*at, "file_id")), _ANY.decode(block.file_id)))
        _raw_files(block.source, (*at, "source"), found, depth + 1)
        _raw_files(block.content, (*at, "content"), found, depth + 1)


def _path(at: tuple[str | int, ...]) -> str:
    """`("messages", 0, "content")` as `messages[0].content`."""
    return "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in at)[1:]


def _continues(req: MessagesRequest) -> bool:
    """Whether the request continues a thread (`thread: {"type": "continue", ...}`)."""
    if not isinstance(req.thread, msgspec.Raw):
        return False
    try:
        return _THREAD.decode(req.thread).type == "continue"
    except _DECODE:
        return False


async def _relayed(
    ex: Exchange[ChatCall],
    body: bytes,
    headers: dict[str, str],
    named: Naming,
    *,
    stream: bool,
) -> web.StreamResponse:
    """Relay the client's body over `ex.routes` (all Anthropic's); `named`: what the request
    names of what Anthropic stores (`_stored`)."""
    fields = raw_object(body)  # decode_body made sure it is JSON
    remember = Remembering(ex, named, files=True)  # (its items: files its code wrote)
    try:
        if not stream:
            reply = await pipeline.try_routes(
                ex, lambda route: _native(route).messages(ex.call, fields, headers)
            )
            if reply.usage is None:
                pipeline.unreported(ex, reply)
            return web.Response(body=reply.body, content_type="application/json")
        events = _FirstRemembered(
            pipeline.stream(
                ex, lambda route: _native(route).stream_messages(ex.call, fields, headers)
            ),
            remember,
        )
        async with contextlib.aclosing(events) as batches:
            return await _relay(ex.request, batches)
    finally:
        remember(final=True)  # (its size, and a container shown in its `message_delta`)


class _FirstRemembered:
    """A relayed stream whose first batch (`message_start`: the message's id, maybe its
    container) is remembered as the key's before the client gets it (`Remembering`); the rest
    when the stream ends. After the first, each batch is the stream's own `__anext__`, with
    no frame of ours (as `pipeline.Stream`)."""

    __slots__ = ("_events", "_first", "_remember")

    def __init__(self, events: pipeline.Stream, remember: Remembering) -> None:
        self._events = events
        self._remember = remember
        self._first = True

    def __aiter__(self) -> _FirstRemembered:
        return self

    def __anext__(self) -> Awaitable[list[bytes]]:
        if self._first:
            self._first = False
            return self._take_first()
        return self._events.__anext__()

    async def _take_first(self) -> list[bytes]:
        batch = await self._events.__anext__()
        self._remember()
        return batch

    async def aclose(self) -> None:
        await self._events.aclose()


async def _translated(ex: Exchange[ChatCall], *, stream: bool) -> web.StreamResponse:
    estimate = ex.call.prompt_estimate()
    if stream:
        converter = MessageEvents(ex.call, estimate)
        async with (
            contextlib.aclosing(pipeline.stream(ex)) as chunks,
            contextlib.aclosing(converter.events(chunks)) as batches,
        ):
            return await _relay(ex.request, batches)
    reply = await pipeline.complete(ex)
    if reply.usage is None:
        pipeline.unreported(ex, reply)
    return web.Response(body=from_completion(reply.body, estimate), content_type="application/json")


async def _relay(request: web.Request, batches: AsyncIterator[list[bytes]]) -> web.StreamResponse:
    # Batches hold framed events (`event:` and `data:` lines); Messages streams end with
    # `message_stop`, without `[DONE]`.
    return await relay(
        request,
        batches,
        frame=b"".join,
        error_frame=error_event,
        end=b"",
        status_of=anthropic_status,
    )


class _Count(msgspec.Struct):
    input_tokens: int


async def count_tokens(request: web.Request) -> web.Response:
    """The input tokens of a Messages request (the upstream's count, or an estimate)."""
    request[TRACE_KEY].metered = True
    body = await request.read()
    headers = _headers(request)
    _, _, ex, _ = await _begin(request, body)
    try:
        first = ex.routes[0].provider
        if has_capability(first, MessagesPassThrough):
            ex.routes = [r for r in ex.routes if has_capability(r.provider, MessagesPassThrough)]
            fields = raw_object(body)
            answer = await pipeline.try_routes(
                ex, lambda route: _native(route).count_tokens(ex.call, fields, headers)
            )
            return web.Response(body=answer, content_type="application/json")
        return web.Response(
            body=encode(_Count(input_tokens=_estimate(ex.call))), content_type="application/json"
        )
    finally:
        pipeline.release(ex)


def _estimate(call: ChatCall) -> int:
    """The translated request's estimate, its tool definitions included."""
    total = call.prompt_estimate()
    for tool in call.request.tools or ():
        total += estimate_text_tokens(encode(tool).decode())
    return total
