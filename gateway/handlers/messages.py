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
from collections.abc import AsyncIterator, Iterable
from typing import Any, cast

import msgspec
from aiohttp import web
from msgspec import UNSET

from gateway import pipeline
from gateway.errors import InvalidRequest, NotFound
from gateway.failover import Exchange
from gateway.messages import MessageEvents, Translation, error_event, from_completion, to_chat
from gateway.messages.errors import anthropic_status
from gateway.messages.schema import MessagesRequest
from gateway.passthrough import native_first
from gateway.providers import ChatCall
from gateway.providers.base import has_capability
from gateway.providers.capabilities import MessagesPassThrough
from gateway.router import Route
from gateway.schemas.codec import decode_body, encode, opens, raw_object
from gateway.settings import ModelConfig
from gateway.sse import relay
from gateway.state import PRINCIPAL_KEY, STORED_KEY
from gateway.tokens import estimate_text_tokens
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
) -> tuple[MessagesRequest, Translation, Exchange[ChatCall], tuple[str | None, bool]]:
    """Decode and translate the request; open its exchange (see `pipeline.open_exchange`);
    the container it names (`_container`)."""
    req = decode_body(body, MessagesRequest)
    named = _container(request, req)
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
            speed=req.speed[:32] if isinstance(req.speed, str) else "",
        )

    ex = await pipeline.open_exchange(request, req.model, messages_call, free=free)
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


class _ContainerObject(msgspec.Struct):
    id: object = None


_CONTAINER = msgspec.json.Decoder(str | _ContainerObject | None)


def _container(request: web.Request, req: MessagesRequest) -> tuple[str | None, bool]:
    """The code execution container the request names (`container`: an id, or `{"id"}`),
    and whether it is known here as the key's (`gateway.stored`).

    Raises:
        NotFound: it is another key's: what Anthropic stores for that key (the files its
            code wrote), which it would give this one.
    """
    if not isinstance(req.container, msgspec.Raw):
        return None, True
    try:
        value = _CONTAINER.decode(req.container)
    except (msgspec.MsgspecError, RecursionError):
        return None, True  # (Anthropic refuses it)
    named = value.id if isinstance(value, _ContainerObject) else value
    if not isinstance(named, str):
        return None, True
    key_id = request[TRACE_KEY].key_id
    others = request.app[STORED_KEY].use(named, key_id)
    if others:
        raise NotFound(
            f"Container with id '{named[:100]}' not found.",
            param="container",
            code="container_not_found",
        )
    return named, others is not None


def _remember(ex: Exchange[ChatCall], named: tuple[str | None, bool]) -> None:
    """The container the answer names is the key's (`gateway.stored`), unless the request
    named it itself (an echo), or named one not known here (whose answer's container may be
    that one's context: naming what was made elsewhere does not make it this key's)."""
    shown = ex.call.shown
    container, known = named
    if shown is None or not known:
        return
    ids = [found for found in shown.contexts if found != container]
    if ids:
        ex.request.app[STORED_KEY].own(ids, ex.trace.key_id)


async def _relayed(
    ex: Exchange[ChatCall],
    body: bytes,
    headers: dict[str, str],
    named: tuple[str | None, bool],
    *,
    stream: bool,
) -> web.StreamResponse:
    """Relay the client's body over `ex.routes` (all Anthropic's); `named`: the container
    the request names (`_container`)."""
    fields = raw_object(body)  # decode_body made sure it is JSON
    try:
        if not stream:
            reply = await pipeline.try_routes(
                ex, lambda route: _native(route).messages(ex.call, fields, headers)
            )
            if reply.usage is None:
                pipeline.unreported(ex, reply)
            return web.Response(body=reply.body, content_type="application/json")
        events = pipeline.stream(
            ex, lambda route: _native(route).stream_messages(ex.call, fields, headers)
        )
        async with contextlib.aclosing(events) as batches:
            return await _relay(ex.request, batches)
    finally:
        _remember(ex, named)  # (a container shows in the closing `message_delta`)


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
