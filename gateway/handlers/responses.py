"""`POST /v1/responses`: the Responses API on the shared pipeline, for every provider.

The request is translated into a chat request first, so `pipeline.begin()` applies the same
model, permission, limit, budget and routing checks as chat completions do. Which way it goes
(`passthrough.native_first`): to upstreams serving the Responses API themselves
(`responses_api = true`), the client's own body (model rewritten), their answer or events
relayed; to the others, the translated chat request, whose completion or chunk stream becomes
a `response` object or the Responses event stream. What only the former can do
(`Translation.refusal`: built-in tools, stored state, file ids) goes to them only.

As for chat, everything that can fail with a status happens before the first byte goes out.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import cast

import msgspec
from aiohttp import web

from gateway import pipeline
from gateway.admission import follow
from gateway.errors import GatewayError, InvalidRequest, NotFound
from gateway.failover import Exchange
from gateway.media import Estimate
from gateway.passthrough import Remembering, native_first, relays
from gateway.providers import ChatCall
from gateway.providers.base import ResponsesPassThrough
from gateway.responses import (
    ResponseEvents,
    Translation,
    error_event,
    from_completion,
    shell,
    to_chat,
)
from gateway.router import Route
from gateway.schemas.codec import decode_body, may_spell, present, raw_object
from gateway.schemas.responses import ResponseCreateRequest, ToolType
from gateway.settings import UpstreamConfig
from gateway.sse import relay
from gateway.state import KEYS_KEY, PRINCIPAL_KEY, STORED_KEY, STORED_SHARE_KEY, TICKET_KEY
from gateway.stored import UNKNOWN_CONVERSATION, Naming, StoredResponses
from gateway.tool_fees import ServerTools
from gateway.trace import TRACE_KEY
from gateway.usage_bounds import MOST_SEARCHES, UNCAPPED_SEARCHES

__all__ = ["create_response", "stored_response"]

Batches = AsyncGenerator[list[bytes], None]


async def create_response(request: web.Request) -> web.StreamResponse:
    """OpenAI Responses API; `model` is required."""
    request[TRACE_KEY].metered = True  # every authenticated model request gets a usage row
    body = await request.read()
    req = decode_body(body, ResponseCreateRequest)
    if req.background is True:
        _refuse_counted_background(request)
    translation = to_chat(req)
    model_id = req.model if isinstance(req.model, str) else None
    stored, named = _stored_prompt(request, req, body)

    async def look_up(call: ChatCall, routes: list[Route]) -> None:
        """The ids no process here ever showed, asked of the database once the key may use
        the model (`gateway.stored_share`), when a route relays them (a translated request
        sends none upstream); what it knew is read again."""
        nonlocal named
        if not named.unresolved or not relays(routes, ResponsesPassThrough, translation.refusal):
            return
        share = request.app[STORED_SHARE_KEY]
        if await share.resolve(named, request[TRACE_KEY].key_id, share.deadline()):
            call.stored_prompt, named = _stored_prompt(request, req, body)

    tools = _server_tools(req)
    if tools is not None and tools.unpriced and request[PRINCIPAL_KEY].key.budget_usd is not None:
        raise InvalidRequest(
            f"Invalid '{tools.unpriced}': not supported for this API key: such images are "
            "billed at image token counts the gateway's prices do not have, so they could not "
            "be counted against the key's USD budget. Use a quality of 'low', 'medium', "
            "'high' or 'auto', and an output_format of 'png', 'jpeg' or 'webp'.",
            param=tools.unpriced,
            code="unsupported_value",
        )
    try:
        # No body: the chat request is made from the struct, only if a provider forwards it.
        ex = await pipeline.begin(
            request,
            translation.chat,
            None,
            model_id,
            stored,
            _searches_at_most(req),
            ResponsesPassThrough,
            tools,
            look_up,
        )
    except InvalidRequest as exc:
        raise _renamed(exc, translation) from None
    try:
        return await native_first(
            ex,
            ResponsesPassThrough,
            translation.refusal,
            lambda: _pass_through(ex, body, named, stream=req.is_stream),
            lambda: _translated(ex, req, translation),
        )
    finally:
        pipeline.finish(ex)


def _stored_prompt(
    request: web.Request, req: ResponseCreateRequest, body: bytes
) -> tuple[Estimate | None, Naming]:
    """What the upstream stores for a request and bills as its prompt again
    (`gateway.stored`): the conversation it continues, its size when it passed through here,
    else as much as a file sent by id, and each `item_reference` input item as much again
    (None when there is none); and the ids of stored things the request names, which its
    answer may echo (`Remembering`).

    Raises:
        NotFound: something the request names by id (a previous response, its conversation,
            an input item, a container) is known to be another key's.
    """
    stored: Estimate | None = None
    known = request.app[STORED_KEY]
    key_id = request[TRACE_KEY].key_id
    named = Naming()
    previous = req.previous_response_id
    if isinstance(previous, str) and previous:
        param, code = "previous_response_id", "previous_response_not_found"
        named.name(known, key_id, previous, param, "Previous response", code)
        stored = known.prompt(previous, key_id)
    if present(req.conversation):
        if isinstance(req.conversation, msgspec.Raw):
            named.name(known, key_id, _conversation(req.conversation), "conversation")
        if stored is None:
            stored = UNKNOWN_CONVERSATION
    _containers(known, key_id, req, named)
    references = _references(req, body, known, key_id, named)
    if references:
        held = UNKNOWN_CONVERSATION.scaled(references)
        stored = held if stored is None else stored + held
    return stored, named


def _server_tools(req: ResponseCreateRequest) -> ServerTools | None:
    """The request's built-in tools billed beyond tokens (`tool_fees`), those of a stored
    `prompt` it names included."""
    prompt = present(req.prompt)
    if not req.tools and not prompt:
        return None
    return ServerTools.of(req.tools or (), req.max_tool_calls, req.tool_choice, prompt)


def _searches_at_most(req: ResponseCreateRequest) -> int:
    """The web searches a request's built-in `web_search` tools may make on a pass-through
    upstream, each billed a call: `max_tool_calls` (which counts every built-in tool's
    calls), else `UNCAPPED_SEARCHES`; 0 without such a tool.

    Raises:
        InvalidRequest: `max_tool_calls` past `MOST_SEARCHES` beside a web search tool.
    """
    for tool in req.tools or ():
        try:
            kind = _TOOL_TYPE.decode(tool).type
        except (msgspec.MsgspecError, RecursionError):
            continue  # (refused with its field's name on the way)
        if kind.startswith("web_search"):
            most = req.max_tool_calls
            if not isinstance(most, int):
                return UNCAPPED_SEARCHES
            if most > MOST_SEARCHES:
                raise InvalidRequest(
                    f"Invalid 'max_tool_calls': at most {MOST_SEARCHES} with a web_search tool.",
                    param="max_tool_calls",
                )
            return most
    return 0


class _InputItem(msgspec.Struct):
    """An input item's `type` (an easy input message has none), `id`, the stored item an
    MCP approval answers (`approval_request_id`), and the container a tool call sent back
    ran in (a code interpreter call's `container_id`, a shell call's `environment`)."""

    type: object = "message"
    id: object = None
    approval_request_id: object = None
    container_id: object = None
    environment: object = None


class _ContainerTool(msgspec.Struct):
    """Where a tool names a container: a code interpreter's `container` (an id, or its
    settings), a shell's `environment` (`container_reference`: its `container_id`)."""

    container: object = None
    environment: object = None


class _ConversationObject(msgspec.Struct):
    id: object = None


_TOOL_TYPE = msgspec.json.Decoder(ToolType)
_ITEM = msgspec.json.Decoder(_InputItem)
_CONTAINER_TOOL = msgspec.json.Decoder(_ContainerTool)
_CONVERSATION = msgspec.json.Decoder(str | _ConversationObject)


def _references(
    req: ResponseCreateRequest,
    body: bytes,
    known: StoredResponses,
    key_id: str | None,
    named: Naming,
) -> int:
    """How many `item_reference` input items the request holds (looked for only when its
    body may spell `id"`); the ids its input items name go into `named`.

    Raises:
        NotFound: an input item (a reference, or an item sent back with its id, which the
            upstream also resolves by its id) is known to be another key's (`gateway.stored`).
    """
    items = req.input
    if not isinstance(items, list) or not may_spell(body, b'id"'):
        return 0  # (an item_reference has an "id", an approval its "approval_request_id")
    count = 0
    for at, item in enumerate(items):
        try:
            view = _ITEM.decode(item)
        except (msgspec.MsgspecError, RecursionError):
            continue  # (refused with its field's name on the way: not counted here)
        if view.type == "item_reference":
            count += 1
        named.name(known, key_id, view.id, f"input[{at}].id", "Item")
        param = f"input[{at}].approval_request_id"
        named.name(known, key_id, view.approval_request_id, param, "Item")
        # (A tool call sent back names the container it ran in, which an `auto` one reuses.)
        param = f"input[{at}].container_id"
        named.name(known, key_id, view.container_id, param, "Container")
        if isinstance(view.environment, dict):
            container = view.environment.get("container_id")
            param = f"input[{at}].environment.container_id"
            named.name(known, key_id, container, param, "Container")
    return count


def _containers(
    known: StoredResponses, key_id: str | None, req: ResponseCreateRequest, named: Naming
) -> None:
    """Refuse a tool whose container (a code interpreter's `container` by id, a shell's
    `environment.container_id`) is another key's; the ids go into `named`.

    Raises:
        NotFound: it is (`gateway.stored`), param `tools[N].container` (or its
            `environment.container_id`).
    """
    for at, tool in enumerate(req.tools or ()):
        try:
            view = _CONTAINER_TOOL.decode(tool)
        except (msgspec.MsgspecError, RecursionError):
            continue  # (refused with its field's name on the way)
        named.name(known, key_id, view.container, f"tools[{at}].container", "Container")
        environment = view.environment
        if isinstance(environment, dict):
            container = environment.get("container_id")
            param = f"tools[{at}].environment.container_id"
            named.name(known, key_id, container, param, "Container")


def _conversation(conversation: msgspec.Raw) -> object:
    """A request's `conversation` (an id, or `{"id": ...}`) as its id."""
    try:
        value = _CONVERSATION.decode(conversation)
    except (msgspec.MsgspecError, RecursionError):
        return None
    return value if isinstance(value, str) else getattr(value, "id", None)


def _refuse_counted_background(request: web.Request) -> None:
    """Refuse a background response to a key whose budget or tokens per minute count tokens.

    A `responses_api` upstream answers `background: true` at once with a `queued` response
    that has no usage, then generates the answer on its own (billed to the operator's
    account); the client reads it later, from the upstream, past the gateway. Its usage never
    passes through here, so it could not be counted against the key. A key without a budget
    or tokens per minute counts no tokens: its background requests are relayed as before.

    Raises:
        InvalidRequest: the key has a budget or tokens per minute (param `background`).
    """
    try:
        ticket = request[TICKET_KEY]
    except KeyError:
        return
    if ticket is None:  # a key without limits or budget: nothing to count against
        return
    # The key as it is enforced now (as `pipeline.open_exchange` will charge it).
    follow(ticket, request.app[KEYS_KEY].current(ticket.key))
    key = ticket.key
    if key.has_budget or key.tpm is not None:
        raise InvalidRequest(
            "'background': true is not supported for this API key: a background response's "
            "usage comes after the answer, from the upstream, where the gateway cannot count "
            "it against the key's budget or tokens per minute. Send the request without "
            "'background' (streaming it if it is long), or use a key without a budget or "
            "tokens per minute.",
            param="background",
            code="unsupported_parameter",
        )


async def stored_response(request: web.Request) -> web.StreamResponse:
    """`GET`/`DELETE /v1/responses/{id}` (and its `input_items`, `cancel`): 404, since the
    gateway stores no responses (a clear answer instead of "unknown route")."""
    response_id = request.match_info["response_id"]
    raise NotFound(
        f"Response with id '{response_id[:100]}' not found: this gateway does not store "
        "responses, so they cannot be retrieved, cancelled or deleted. Send the earlier turns "
        "in 'input' instead of 'previous_response_id'.",
        param="response_id",
        code="response_not_found",
    )


async def _translated(
    ex: Exchange[ChatCall], req: ResponseCreateRequest, translation: Translation
) -> web.StreamResponse:
    """Run the translated chat request over `ex.routes`; answer in Responses shapes."""
    base = shell(req, translation)
    try:
        if req.is_stream:
            converter = ResponseEvents(base, ex.call, functools.partial(_answer_limit, ex))
            async with (
                contextlib.aclosing(pipeline.stream(ex)) as chunks,
                contextlib.aclosing(converter.events(chunks)) as batches,
            ):
                return await _relay(ex.request, batches, converter.error_frame)
        reply = await pipeline.complete(ex)
        if reply.usage is None:
            pipeline.unreported(ex, reply)
    except InvalidRequest as exc:  # a provider refused a field: name the Responses one
        raise _renamed(exc, translation) from None
    answer = from_completion(reply.body, base, reply.usage)
    return web.Response(body=answer, content_type="application/json")


def _answer_limit(ex: Exchange[ChatCall]) -> int | None:
    config = ex.provider.config
    return config.max_response_bytes if isinstance(config, UpstreamConfig) else None


def _upstream(route: Route) -> ResponsesPassThrough:
    # The routes were filtered with _passes_through before any attempt.
    return cast(ResponsesPassThrough, route.provider)


async def _pass_through(
    ex: Exchange[ChatCall], body: bytes, named: Naming, *, stream: bool
) -> web.StreamResponse:
    """Relay the client's body over `ex.routes` (all pass through); `named`: the stored ids
    it names (`Remembering`).

    Raises:
        UpstreamError: before anything was sent to the client (so it may still fall back).
    """
    fields = raw_object(body)  # decode_body made sure it is JSON
    remember = Remembering(ex, named)
    if not stream:
        reply = await pipeline.try_routes(
            ex, lambda route: _upstream(route).responses(ex.call, fields)
        )
        if reply.usage is None:
            pipeline.unreported(ex, reply)
        remember(final=True)
        return web.Response(body=reply.body, content_type="application/json")
    try:
        events, first = await pipeline.try_routes(
            ex,
            lambda route: pipeline.first_batch(
                route.provider.config, _upstream(route).stream_responses(ex.call, fields)
            ),
            stream=True,
        )
        numbered = _Numbered(events, first, remember)
        async with contextlib.aclosing(numbered.batches()) as batches:
            return await _relay(ex.request, batches, numbered.error_frame)
    finally:
        remember(final=True)  # (a stream cut after its terminal event is stored all the same)


async def _relay(
    request: web.Request,
    batches: AsyncIterator[list[bytes]],
    error_frame: Callable[[GatewayError], bytes],
) -> web.StreamResponse:
    # Batches hold framed events (`event:` and `data:` lines); Responses streams end after
    # their terminal event, without `[DONE]`.
    return await relay(request, batches, frame=b"".join, error_frame=error_frame, end=b"")


def _renamed(exc: InvalidRequest, translation: Translation) -> InvalidRequest:
    """`exc` with the chat parameter it names replaced by the Responses field it came from."""
    param = translation.param(exc.param)
    if exc.param and param != exc.param:
        exc.message = exc.message.replace(f"'{exc.param}'", f"'{param}'")
        exc.param = param
    return exc


class _Numbered:
    """A passed-through event stream, counted so that an error event can take the next
    `sequence_number` (upstream events number themselves from 0, one by one), whose stored
    ids are remembered as each batch passes (`Remembering`)."""

    def __init__(self, events: Batches, first: list[bytes], remember: Remembering) -> None:
        self._events = events
        self._first = first
        self._count = 0
        self._remember = remember

    async def batches(self) -> Batches:
        async with contextlib.aclosing(self._events) as events:
            self._count = len(self._first)
            self._remember()  # (before the client sees the ids)
            yield self._first
            async for batch in events:
                self._count += len(batch)
                self._remember()
                yield batch

    def error_frame(self, exc: GatewayError) -> bytes:
        self._count += 1
        return error_event(exc, self._count - 1)
