"""The request path every model endpoint shares, whatever its wire format.

`open_exchange()` resolves the model, checks the key may use it, holds what its limits and
budget allow, and picks the upstream (`begin()` is that for chat requests); `complete()`,
`stream()` and `try_routes()` call it; `finish()` accounts for what was used, in a `finally`,
so a failed, refused or abandoned request is accounted too. Chat completions, the Responses
and Messages APIs, embeddings and legacy completions all run on this, so limits, budgets,
usage rows and routing apply alike.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncGenerator, Awaitable, Callable, Coroutine
from typing import Any, TypeVar, cast

import structlog
from aiohttp import web
from msgspec import UNSET

from gateway import usage_bounds
from gateway.admission import Gate, Ticket, follow
from gateway.errors import (
    InvalidRequest,
    PermissionDenied,
    UpstreamConnectionError,
    UpstreamError,
    UpstreamUnavailable,
)
from gateway.failover import Exchange, attempt_each, stream_ended
from gateway.media import Estimate, image_tokens
from gateway.prices import SPEED, STANDARD_TIERS, UNPRICED_TIERS, Price, PriceBook, Usage
from gateway.providers import ChatReply
from gateway.providers.base import (
    UNBOUNDED,
    Call,
    ChatCall,
    OutputOnTop,
    Provider,
    has_capability,
)
from gateway.records import model_allowed
from gateway.router import Route, Router
from gateway.schemas.chat import ChatCompletionRequest
from gateway.schemas.codec import present
from gateway.schemas.common import (
    CompletionTokensDetails,
    PromptTokensDetails,
    Usage as OpenAIUsage,
)
from gateway.settings import ModelConfig, ProviderConfig
from gateway.state import (
    GATE_KEY,
    KEYS_KEY,
    PRICES_KEY,
    PRINCIPAL_KEY,
    SNAPSHOT_KEY,
    TICKET_KEY,
)
from gateway.tool_fees import ServerTools
from gateway.trace import TRACE_KEY, RequestTrace, elapsed_ms
from gateway.usage_bounds import OUTPUT_FLOOR

__all__ = [
    "MAX_MODEL_ID",
    "Batches",
    "Stream",
    "begin",
    "complete",
    "finish",
    "first_batch",
    "open_exchange",
    "release",
    "stream",
    "try_routes",
]

MAX_MODEL_ID = 256

log = structlog.get_logger(__name__)

T = TypeVar("T")
C = TypeVar("C", bound=Call)
Batches = AsyncGenerator[list[bytes], None]


async def begin(
    request: web.Request,
    req: ChatCompletionRequest,
    body: bytes | None,
    model_id: str | None,
    stored: Estimate | None = None,
    searches: int = 0,
    searches_on: type | None = None,
    server_tools: ServerTools | None = None,
    prepare: Callable[[ChatCall, list[Route]], Awaitable[None]] | None = None,
) -> Exchange[ChatCall]:
    """Check a decoded chat request against the key and the config, and choose its upstream.

    `body` is the client's JSON when `req` is the client's own chat request (see `ChatCall`);
    `stored`, a prompt the upstream stores for it (`ChatCall.stored_prompt`); `searches`, the
    web searches its built-in tools may make on routes with capability `searches_on`
    (`ChatCall.held_searches`), and `server_tools` its other built-in tools that bill beyond
    tokens (`ChatCall.server_tools`), held on the same routes; `prepare`, see `open_exchange`.

    Raises:
        InvalidRequest: no model, a parameter the model does not take.
        NotFound: the model does not exist.
        PermissionDenied: the key may not use the model, or it has a USD budget and the
            model has no known price.
        RateLimited, QuotaExceeded: the request does not fit the key's limits or budget.
        UpstreamError: no account of the model may be tried now (`Router.routes`).
    """

    def chat_call(model: ModelConfig) -> ChatCall:
        _check_reasoning(req, model.name, model.reasoning)
        if req.stream_options not in (UNSET, None) and not req.is_stream:
            raise InvalidRequest(
                "The 'stream_options' parameter is only allowed when 'stream' is true.",
                param="stream_options",
            )
        # (A search model searches once a request, `web_search_options`: billed a call.)
        return ChatCall(
            request=req,
            body=body,
            model=model,
            stored_prompt=stored,
            web_searches=0 if req.web_search_options is UNSET else 1,
            held_searches=searches,
            searches_on=searches_on,
            server_tools=server_tools,
        )

    return await open_exchange(request, model_id, chat_call, prepare=prepare)


async def open_exchange(
    request: web.Request,
    model_id: str | None,
    make_call: Callable[[ModelConfig], C],
    *,
    serves: type | None = None,
    free: bool = False,
    prepare: Callable[[C, list[Route]], Awaitable[None]] | None = None,
) -> Exchange[C]:
    """Resolve the model, check the key may use it, and choose the upstream of any endpoint.

    Args:
        make_call: the endpoint's call for the resolved model (it may refuse the request).
        serves: the provider capability (a Protocol of `providers.capabilities`) it needs;
            the model's routes are narrowed to providers that have it.
        free: the request uses no tokens (a token count): its key's request limits apply,
            but no tokens are held.
        prepare: awaited with the call and its routes once the model is resolved and the key
            may use it, before admission (the lookup of stored ids: `gateway.stored_share`).

    Raises:
        InvalidRequest: no model, a parameter the model does not take, or (with `serves`) no
            provider of the model has the capability.
        NotFound: the model does not exist.
        PermissionDenied: the key may not use the model.
    """
    trace = request[TRACE_KEY]
    trace.metered = True  # refusals are counted too
    if not model_id:
        raise InvalidRequest("You must provide a model parameter.", param="model")
    if len(model_id) > MAX_MODEL_ID:
        raise InvalidRequest(
            f"The model id is longer than {MAX_MODEL_ID} characters.", param="model"
        )
    router = request[SNAPSHOT_KEY].router
    principal = request[PRINCIPAL_KEY]
    model = router.resolve(model_id)
    models = principal.key.models  # (an empty list allows every model)
    # `model_id in models` first: the usual grant, without the providers' tuple and globs.
    if (
        models
        and model_id not in models
        and not model_allowed(models, model_id, router.providers_of(model))
    ):
        raise PermissionDenied(
            f"This API key is not allowed to use the model '{model_id}'.", param="model"
        )
    call = make_call(model)
    routes = router.routes(model)
    if serves is not None:
        _require(router, model, model_id, serves, trace.endpoint)
        # Never empty: `routes` lists every account of the model (or raised).
        routes = [route for route in routes if has_capability(route.provider, serves)]
    route = routes[0]
    call.upstream_model, call.api_key = route.upstream_model, route.api_key
    call.request_id = trace.request_id
    trace.model_id = model_id
    trace.provider = route.provider.config.name
    trace.upstream_model = route.upstream_model
    trace.stream = call.is_stream
    ex = Exchange(request=request, trace=trace, call=call, provider=route.provider, routes=routes)
    key = principal.key
    if key.budget_usd is not None:
        prices = request.app[PRICES_KEY]
        _require_prices(prices, model_id, routes)
        tier = call.asked_tier
        if tier and tier not in UNPRICED_TIERS and not _tier_priced(prices, tier, routes):
            field, value = "service_tier", tier
            if tier.startswith(SPEED):
                field, value = "speed", tier[len(SPEED) :]
            raise InvalidRequest(
                f"'{field}': {value[:32]!r} is not supported for this API key on this model: "
                "that processing is billed at rates the gateway's prices do not have for it, "
                "so it could not be counted against the key's USD budget. Send the request "
                "without it.",
                param=field,
                code="unsupported_value",
            )
    if prepare is not None:
        await prepare(call, routes)
    try:  # (set by `middleware.gateway` on every model request; not Mapping.get's two calls)
        ex.ticket = request[TICKET_KEY]
    except KeyError:
        ex.ticket = None
    if ex.ticket is not None and not free:  # a free request holds no tokens
        # Its body took a while to arrive: the key's limits and budget may have changed.
        follow(ex.ticket, request.app[KEYS_KEY].current(ex.ticket.key))
        await _charge(request.app[GATE_KEY], request.app[PRICES_KEY], ex.ticket, call, routes)
    return ex


def _tier_priced(prices: PriceBook, tier: str, routes: list[Route]) -> bool:
    """Whether every route that sends the request's `service_tier` upstream (`_sends_tier`)
    has the price list's rates for `tier`."""
    for route in routes:
        if not _sends_tier(route.provider, tier):
            continue  # (translated without it: served, and charged, at the standard rates)
        price = prices.price(route.model, route.provider.config, route.upstream_model)
        if price is None or price.service_tier(tier) is None:
            return False
    return True


def _at_tier(price: Price, tier: str, provider: Provider, *, said: bool = False) -> Price:
    """`price` at processing tier `tier` where the price list has its rates: a tier the
    answer `said` it was served at, or one asked for that went upstream (`_sends_tier`); a
    standard one (`STANDARD_TIERS`), or none, is `price` itself."""
    if not tier or tier in STANDARD_TIERS or not (said or _sends_tier(provider, tier)):
        return price
    return price.service_tier(tier) or price


def _sends_tier(provider: Provider, tier: str) -> bool:
    """Whether requests to `provider` keep what asks for `tier` (`Call.asked_tier`): the
    `service_tier` of OpenAI-compatible upstreams (the Anthropic and Gemini translations drop
    it), Anthropic's `speed` on its own Messages pass-through (translations drop it)."""
    if tier.startswith(SPEED):
        return provider.config.type == "anthropic"
    return provider.config.type in _TIERED


_TIERED = frozenset({"openai", "azure"})


def _require_prices(prices: PriceBook, model_id: str, routes: list[Route]) -> None:
    """A key with a USD budget may only use models with a known price on every route.

    Raises:
        PermissionDenied: a route's price is unknown (code `model_price_unknown`).
    """
    for route in routes:
        if prices.price(route.model, route.provider.config, route.upstream_model) is None:
            raise PermissionDenied(
                f"The model '{model_id}' has no known price, and this API key has a USD "
                f'budget. Give it a price in the config ([[models]] name = "{model_id}" '
                "with input_price_per_mtok and output_price_per_mtok), or use a model with one.",
                param="model",
                code="model_price_unknown",
            )


async def _charge(
    gate: Gate, prices: PriceBook, ticket: Ticket, call: Call, routes: list[Route]
) -> None:
    """Hold what the request may use at most: everything its prompt holds (see
    `tokens.prompt_size`) and its output limit (without one of its own, the largest default
    of the providers it may be routed to, which is then sent upstream as its limit), on the
    costliest of its routes."""
    targets = {(r.provider.config.type, r.upstream_model) for r in routes}

    def image_cost(url: str, detail: str | None) -> Estimate:
        costs = [image_tokens(kind, model, url, detail) for kind, model in targets]
        return Estimate(max(c.likely for c in costs), max(c.most for c in costs))

    prompt = call.prompt_size(image_cost)
    default = max(r.provider.config.default_max_tokens for r in routes)
    call.cap_output(default)
    output = call.output_bound(default)
    if call.model.reasoning and isinstance(call, ChatCall):  # (e.g. Anthropic's thinking)
        output += max(
            (
                cast(OutputOnTop, r.provider).output_on_top(call)
                for r in routes
                if has_capability(r.provider, OutputOnTop)
            ),
            default=0,
        )
    likely, most = call.held(prompt.likely, output), call.held(prompt.most, output)
    costs = []
    for r in routes:
        price = prices.price(r.model, r.provider.config, r.upstream_model)
        if price is None:
            continue
        price = _at_tier(price, call.asked_tier, r.provider)  # (held at the tier asked for)
        count = likely.web_searches
        on = call.searches_on
        tools = 0.0
        runs = call.held_searches or call.server_tools is not None
        if runs and on is not None and has_capability(r.provider, on):
            # (Only a route that runs the tools makes their calls.)
            count += call.held_searches
            if call.server_tools is not None:
                rate = prices.image_rate(call.server_tools.image_model, r.provider.config)
                tools = call.server_tools.held(rate)
        searches = tools + prices.searches_cost(
            count, r.model, r.provider.config, r.upstream_model, price
        )
        costs.append((_held_cost(price, likely) + searches, _held_cost(price, most) + searches))
    likely_usd = max((c[0] for c in costs), default=0.0)
    most_usd = max((c[1] for c in costs), default=0.0)
    await gate.hold(ticket, (prompt.likely + output, likely_usd), (prompt.most + output, most_usd))


def _held_cost(price: Price, held: Usage) -> float:
    """What a hold costs: its kinds at their rates (`ChatCall.held`), never less than its
    tokens as plain text (a model's cache-write rate may be below its input rate, and the
    write may not happen)."""
    return max(price.cost(held), price.cost(Usage(held.prompt, held.completion)))


def _require(router: Router, model: ModelConfig, model_id: str, serves: type, path: str) -> None:
    """Refuse a model none of whose providers has what the endpoint needs (whatever their
    breakers say: this is about what the model is, not about what is up)."""
    kinds = {router.provider(t.provider).config.type for t in model.targets}
    if any(has_capability(router.provider(t.provider), serves) for t in model.targets):
        return
    raise InvalidRequest(
        f"The model '{model_id}' is served by {' and '.join(sorted(kinds))} providers, "
        f"which have no {path} API.",
        param="model",
        code="unsupported_model",
    )


def _check_reasoning(req: ChatCompletionRequest, model_id: str, reasoning: bool) -> None:
    if reasoning:
        return
    if req.reasoning_effort not in (UNSET, None):
        name = "reasoning_effort"
    elif present(req.thinking):
        name = "thinking"
    else:
        return  # (nearly every request: two tests, no dict of them built)
    raise InvalidRequest(
        f"The '{name}' parameter is not supported by the model '{model_id}'; "
        "it is only accepted for models marked as reasoning models.",
        param=name,
        code="unsupported_parameter",
    )


# `try_routes` and `complete` are plain functions that hand back `attempt_each`'s coroutine
# for the caller to await: as coroutines of their own, each would add a frame that every
# suspension of the request (connect, send, wait for the answer) passes through twice.


def try_routes(
    ex: Exchange[Any], attempt: Callable[[Route], Awaitable[T]], *, stream: bool = False
) -> Coroutine[Any, Any, T]:
    """`failover.attempt_each` over the request's routes, with the breakers and routing
    settings of the config the request runs on (to be awaited). With `stream` (an attempt is
    a stream's first batch), the answering account is told how it went by `finish()`.

    Raises:
        UpstreamError: as `attempt_each` does.
    """
    router = ex.request[SNAPSHOT_KEY].router
    return attempt_each(
        ex, attempt, breakers=router.breakers, routing=router.settings.routing, stream=stream
    )


def complete(ex: Exchange[ChatCall]) -> Coroutine[Any, Any, ChatReply]:
    """The whole answer of a non-streaming request, from the first route that gives one
    (to be awaited).

    Raises:
        UpstreamError: the upstream refused the request, or every attempt failed.
    """
    return try_routes(ex, lambda route: route.provider.chat(ex.call))


def unreported(ex: Exchange[Any], reply: ChatReply) -> None:
    """A whole answer whose upstream reported no usage: it has no chunks to count, so its
    output is estimated from its bytes at four a token (its JSON's keys included: on the
    safe side), never past the output limit the upstream was sent; output the answer does not
    show (`Call.unseen_output`) is charged that limit."""
    most = usage_bounds.output_sent(ex.call, ex.provider)
    estimate = most if ex.call.unseen_output else (len(reply.body) + 3) // 4
    ex.call.chunks = min(estimate, most)


def stream(ex: Exchange[C], open_stream: Callable[[Route], Batches] | None = None) -> Stream:
    """Batches of the stream's payloads; routes are tried until one sends its first batch.

    Args:
        open_stream: an attempt's stream on a route (default: the chat stream of its provider).

    Raises:
        UpstreamError: before the first batch (the caller can still answer with a status)
            or during the stream (the caller ends it with an error event; no retry then).
    """

    def chat_stream(route: Route) -> Batches:
        return route.provider.stream_chat(cast(ChatCall, ex.call))

    opener = open_stream or chat_stream

    def attempt(route: Route) -> Coroutine[Any, Any, tuple[Batches, list[bytes]]]:
        return first_batch(route.provider.config, opener(route))

    return Stream(ex, attempt)


class Stream:
    """What `stream()` hands back: an async iterator of the batches of the first route that
    sends one, to be closed with `aclose()` (`contextlib.aclosing`).

    Not an async generator: after the first batch, each `__anext__()` is the answering
    stream's own, so no frame of ours is resumed for every batch, and no generator of ours is
    made, registered with the loop and finalised for every stream."""

    __slots__ = ("_attempt", "_events", "_ex")

    def __init__(
        self,
        ex: Exchange[Any],
        attempt: Callable[[Route], Awaitable[tuple[Batches, list[bytes]]]],
    ) -> None:
        self._ex = ex
        self._attempt: Callable[[Route], Awaitable[tuple[Batches, list[bytes]]]] | None = attempt
        self._events: Batches | None = None

    def __aiter__(self) -> Stream:
        return self

    def __anext__(self) -> Awaitable[list[bytes]]:
        events = self._events
        if events is None:
            return self._first()
        return events.__anext__()

    async def _first(self) -> list[bytes]:
        if self._attempt is None:  # the routes were tried already, and failed
            raise StopAsyncIteration
        attempt, self._attempt = self._attempt, None
        self._events, first = await try_routes(self._ex, attempt, stream=True)
        return first

    async def aclose(self) -> None:
        if self._events is not None:
            await self._events.aclose()


async def first_batch(
    config: ProviderConfig, events: AsyncGenerator[list[bytes], None]
) -> tuple[AsyncGenerator[list[bytes], None], list[bytes]]:
    """Wait for an attempt's first batch (the upstream client's watchdog bounds the wait by
    the provider's first-byte timeout).

    Raises:
        UpstreamError: the attempt failed before its first batch (retryable where another
            route may do better), with `events` closed.
    """
    try:
        # Not `anext(events, None)`: its awaitable calls `__anext__` again at every
        # suspension of the wait (connect, send, the answer's head).
        first = await events.__anext__()
    except StopAsyncIteration:
        await events.aclose()
        raise UpstreamConnectionError(
            f"The upstream provider '{config.name}' ended the stream without events."
        ) from None
    except UpstreamError as exc:
        await events.aclose()
        if type(exc) is UpstreamError:  # an error event, or malformed, before any byte went out
            raise UpstreamUnavailable(exc.message) from exc  # so another route may answer
        raise
    except BaseException:
        await events.aclose()
        raise
    return events, first


def finish(ex: Exchange[Any]) -> None:
    """Account for what the request used: copy usage (or an estimate when the upstream never
    reported it) and its cost into the trace, and settle what the request held.

    For a request that holds nothing of its key's limits or budget (no ticket), only the
    usage row, metrics and log line read what this works out: it is done once the answer is
    out (`RequestTrace.settle`, run first by the request's accounting, before the loop reads
    more input), so its microseconds are not the client's wait. A held request settles at
    once: its x-ratelimit-* headers show what it used, and its slot is freed after. A
    failure of it is logged (`settle_failed`), never the client's: its answer is out or in
    hand, and its hold is given back with what was counted (see `_settle`).

    A stream's account is told here how the stream went (`failover.stream_ended`)."""
    if ex.owed is not None:
        stream_ended(ex)
    call = ex.call
    # Whether the client hung up can only be told in the request's own task (the upstream
    # already has the prompt then, so it is estimated).
    hung_up = call.usage is None and call.first_byte_at is None and ex.sent and _hung_up()
    if ex.ticket is None:
        ex.trace.settle = functools.partial(_settle, ex, hung_up)
        return
    try:
        _settle(ex, hung_up)
    except Exception:  # the answer is in hand: the client gets it, the row and line go out
        log.exception("settle_failed")


def _settle(ex: Exchange[Any], hung_up: bool) -> None:
    """Account for the request (`_account`), then give back its hold (`Gate.give_back`; its
    budget's at its row, `Gate.tally`), or count its use in a budget its key was given while
    it ran (`Gate.count`). The second step runs whatever the
    first raised (a price lookup, a hostile upstream's usage): with what was counted so far,
    so a failure never keeps a key's tokens per minute or budget held."""
    app = ex.request.app
    trace = ex.trace
    try:
        _account(ex, hung_up, app[PRICES_KEY])
    finally:
        used = trace.prompt_tokens + trace.completion_tokens
        gate = app[GATE_KEY]
        if ex.ticket is not None:
            gate.give_back(ex.ticket, used, trace.cost_usd)
            # Its budget counts it with its usage row (queued once the answer is out), so a
            # budget's spending loaded in between has it in the rows (`Gate.tally`).
            trace.settle = functools.partial(gate.tally, ex.ticket)
        elif trace.key_id is not None:
            gate.count(trace.key_id, used, trace.cost_usd)


def _account(ex: Exchange[Any], hung_up: bool, prices: PriceBook) -> None:
    """Copy the request's usage (or an estimate) and its cost into the trace."""
    trace, call = ex.trace, ex.call
    if call.first_byte_at is not None:
        trace.ttft_ms = elapsed_ms(call.started_at, call.first_byte_at)
    usage = call.usage
    so_far = False  # the usage is a count so far (a cut stream's), not the final one
    if usage is not None:
        prompt = trace.prompt_tokens = usage.prompt_tokens
        completion = trace.completion_tokens = usage.completion_tokens
        details = usage.prompt_tokens_details
        if isinstance(details, PromptTokensDetails) and details.cached_tokens:
            prompt += details.cached_tokens
            trace.cache_read_tokens = details.cached_tokens
        write = trace.cache_write_tokens = call.cache_write_tokens
        # Counts no request could have used are bounded (`usage_bounds`); every plausible
        # answer to a client's own body passes these two comparisons.
        body = call.body
        if body is None or prompt + write > len(body) or completion > OUTPUT_FLOOR:
            usage_bounds.bound(call, ex.provider, ex.provider.config.name, trace)
        so_far = call.usage_estimated or (call.is_stream and _so_far(ex, usage))
        if so_far:
            _at_least_estimated(ex)
    elif call.first_byte_at is not None or hung_up:
        trace.estimated = True
        trace.prompt_tokens = call.prompt_estimate()
        trace.completion_tokens = _chunks_charged(ex)
    if trace.estimated and (usage is None or so_far):
        if call.model.reasoning:
            _reasoning_charged(ex)
        if call.server_tools is not None:  # (a forced call the cut did not show)
            call.web_searches += call.server_tools.cut(call.web_searches)
    if ex.unanswered:
        # Attempts the gateway stopped waiting for had the prompt upstream, which may bill it
        # (and be generating still): each is charged the prompt's estimate, and a reasoning
        # model's its output limit too (it may have thought that long, unseen).
        trace.estimated = True
        trace.prompt_tokens += ex.unanswered * call.prompt_estimate()
        trace.completion_tokens += ex.unanswered_output
        if call.server_tools is not None:
            call.web_searches += call.server_tools.given_up(ex.unanswered)
    if any(call.steps):  # (Anthropic's steps beyond the answer's own: billed beside it)
        given, read, written, hour, made = usage_bounds.steps_charged(call)
        trace.prompt_tokens += given + read + written
        trace.cache_read_tokens += read
        trace.cache_write_tokens += written
        call.cache_write_1h_tokens += hour
        trace.completion_tokens += made
    config = ex.provider.config
    price = prices.price(call.model, config, call.upstream_model)
    if price is not None:
        # At the processing tier the answer says, else the one asked for.
        if call.service_tier:
            price = _at_tier(price, call.service_tier, ex.provider, said=True)
        else:
            price = _at_tier(price, call.asked_tier, ex.provider)
        counts = _counts(trace, usage, call.web_searches, call.cache_write_1h_tokens)
        trace.cost_usd = price.cost(counts) + prices.searches_cost(
            counts.web_searches, call.model, config, call.upstream_model, price
        )
        tools = call.server_tools
        if tools is not None:
            trace.cost_usd += tools.cost(prices.image_rate(tools.image_model, config))


def _chunks_charged(ex: Exchange[Any]) -> int:
    """One token a streamed chunk, within the same bound as reported usage: an upstream that
    never reports it cannot charge a key more by sending empty chunks by the million."""
    completion: int = ex.call.chunks
    if completion > OUTPUT_FLOOR:
        completion = min(completion, usage_bounds.completion_charged(ex.call, ex.provider))
    return completion


# The chunks an empty answer streams without content: its role, Azure's filter results (the
# prompt's and the answer's), its finish. A count of 0 output after more than these is none.
_EMPTY_CHUNKS = 4


def _so_far(ex: Exchange[Any], usage: OpenAIUsage) -> bool:
    """Whether a stream's reported usage is only a count so far: no output counted after
    streamed output, or a count read before content that came after it (vLLM's usage on every
    chunk, a usage chunk sent first) on a stream that did not end."""
    call = ex.call
    return (usage.completion_tokens == 0 and call.chunks > _EMPTY_CHUNKS) or (
        call.usage_chunks >= 0
        and call.chunks != call.usage_chunks
        and ex.trace.upstream_ok is not True
    )


def _at_least_estimated(ex: Exchange[Any]) -> None:
    """A stream cut or broken before its final count is charged what its upstream reported so
    far (`Call.usage_estimated`), but never less than the gateway's own estimate of it: an
    upstream that reports its input only at the end (a `message_start` of 0), or its count on
    an early chunk only, still has the prompt and wrote every chunk after."""
    trace, call = ex.trace, ex.call
    trace.estimated = True
    prompt = call.prompt_estimate()
    if trace.prompt_tokens < prompt:  # (cache reads are counted within it)
        trace.prompt_tokens = prompt
    completion = _chunks_charged(ex)
    if trace.completion_tokens < completion:
        trace.completion_tokens = completion


def _reasoning_charged(ex: Exchange[Any]) -> None:
    """A reasoning model's hidden thinking is counted only in the usage its answer ends with:
    a request without it (cut before it, the stream broken, or an upstream that reports none)
    is charged at least the output limit it was sent with (what it held), not what its visible
    text suggests. (Thinking streamed as text is no measure either: redacted or summarised
    thinking is billed whole.)"""
    ceiling = usage_bounds.output_sent(ex.call, ex.provider)
    if ex.trace.completion_tokens < ceiling < UNBOUNDED:
        ex.trace.completion_tokens = ceiling


def _hung_up() -> bool:
    """Whether the client hung up (the request is being cancelled): the upstream already
    has the prompt."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _counts(
    trace: RequestTrace, usage: OpenAIUsage | None, web_searches: int = 0, hour_writes: int = 0
) -> Usage:
    reasoning = audio_in = audio_out = image_out = cached_audio = 0
    if usage is not None:
        done = usage.completion_tokens_details
        if isinstance(done, CompletionTokensDetails):
            reasoning = done.reasoning_tokens or 0
            if done.audio_tokens or done.image_tokens:  # (priced apart: `prices.Usage`)
                audio_out, image_out = _count(done.audio_tokens), _count(done.image_tokens)
        given = usage.prompt_tokens_details
        if isinstance(given, PromptTokensDetails) and (
            given.audio_tokens or given.cached_audio_tokens
        ):
            audio_in = _count(given.audio_tokens)
            cached_audio = _count(given.cached_audio_tokens)
    return Usage(
        trace.prompt_tokens,
        trace.completion_tokens,
        trace.cache_read_tokens,
        trace.cache_write_tokens,
        reasoning,
        audio_in,
        audio_out,
        image_out,
        web_searches,
        hour_writes,
        cached_audio,
    )


def _count(value: object) -> int:
    """A detail of an upstream's usage as a count: what is no count (a negative number, a
    null, unset) is 0."""
    return value if type(value) is int and value > 0 else 0


def release(ex: Exchange[Any]) -> None:
    """End a request that used no tokens (see `open_exchange(free=True)`)."""
    if ex.ticket is not None:
        ex.request.app[GATE_KEY].settle(ex.ticket, 0, 0.0)
