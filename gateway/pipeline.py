"""The request path every model endpoint shares, whatever its wire format.

`begin()` resolves the model, checks the key may use it, and picks the upstream; `complete()`
and `stream()` call it; `finish()` accounts for what was used, in a `finally`, so a failed,
refused or abandoned request is accounted too. Chat completions and the Responses API both
run on this, so limits, budgets, usage rows and routing apply alike.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import TypeVar

from aiohttp import web
from msgspec import UNSET

from gateway.admission import Gate, Ticket
from gateway.errors import (
    InvalidRequest,
    PermissionDenied,
    UpstreamConnectionError,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from gateway.failover import Exchange, attempt_each
from gateway.media import Estimate, image_tokens
from gateway.prices import PriceBook, Usage
from gateway.providers import ChatCall, ChatReply
from gateway.records import model_allowed
from gateway.router import Route
from gateway.schemas.chat import ChatCompletionRequest
from gateway.schemas.codec import present
from gateway.schemas.common import (
    CompletionTokensDetails,
    PromptTokensDetails,
    Usage as OpenAIUsage,
)
from gateway.settings import ProviderConfig
from gateway.state import GATE_KEY, PRICES_KEY, PRINCIPAL_KEY, SNAPSHOT_KEY, TICKET_KEY
from gateway.tokens import estimate_prompt_tokens, prompt_size
from gateway.trace import TRACE_KEY, RequestTrace

__all__ = [
    "MAX_MODEL_ID",
    "begin",
    "complete",
    "finish",
    "first_batch",
    "stream",
    "try_routes",
]

MAX_MODEL_ID = 256

T = TypeVar("T")


def begin(
    request: web.Request,
    req: ChatCompletionRequest,
    body: bytes | None,
    model_id: str | None,
) -> Exchange:
    """Check a decoded chat request against the key and the config, and choose its upstream.

    `body` is the client's JSON when `req` is the client's own chat request (see `ChatCall`).

    Raises:
        InvalidRequest: no model, a parameter the model does not take.
        NotFound: the model does not exist.
        PermissionDenied: the key may not use the model, or it has a USD budget and the
            model has no known price.
        RateLimited, QuotaExceeded: the request does not fit the key's limits or budget.
        UpstreamError: no account of the model may be tried now (`Router.routes`).
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
    if not model_allowed(principal.key.models, model_id, router.providers_of(model)):
        raise PermissionDenied(
            f"This API key is not allowed to use the model '{model_id}'.", param="model"
        )
    _check_reasoning(req, model_id, model.reasoning)
    if req.stream_options not in (UNSET, None) and not req.is_stream:
        raise InvalidRequest(
            "The 'stream_options' parameter is only allowed when 'stream' is true.",
            param="stream_options",
        )
    routes = router.routes(model)
    route = routes[0]
    trace.model_id = model_id
    trace.provider = route.provider.config.name
    trace.upstream_model = route.upstream_model
    trace.stream = req.is_stream
    call = ChatCall(
        request=req,
        body=body,
        model=model,
        upstream_model=route.upstream_model,
        api_key=route.api_key,
        request_id=trace.request_id,
    )
    ex = Exchange(request=request, trace=trace, call=call, provider=route.provider, routes=routes)
    key = principal.key
    if key.budget_usd is not None:
        _require_prices(request.app[PRICES_KEY], model_id, routes)
    ex.ticket = request.get(TICKET_KEY)
    if ex.ticket is not None:
        _charge(request.app[GATE_KEY], request.app[PRICES_KEY], ex.ticket, call, routes)
    return ex


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


def _charge(
    gate: Gate, prices: PriceBook, ticket: Ticket, call: ChatCall, routes: list[Route]
) -> None:
    """Hold what the request may use at most: everything its prompt holds (see
    `tokens.prompt_size`) and its output limit (without one of its own, the largest default
    of the providers it may be routed to, which is then sent upstream as its limit), on the
    costliest of its routes."""
    targets = {(r.provider.config.type, r.upstream_model) for r in routes}

    def image_cost(url: str, detail: str | None) -> Estimate:
        costs = [image_tokens(kind, model, url, detail) for kind, model in targets]
        return Estimate(max(c.likely for c in costs), max(c.most for c in costs))

    prompt = prompt_size(call.request, image_cost)
    if call.max_tokens is None:
        call.output_cap = max(r.provider.config.default_max_tokens for r in routes)
    limit = call.max_tokens or 0
    output = limit * (call.request.n if isinstance(call.request.n, int) else 1)
    costs = [
        (price.cost(Usage(prompt.likely, output)), price.cost(Usage(prompt.most, output)))
        for r in routes
        if (price := prices.price(r.model, r.provider.config, r.upstream_model)) is not None
    ]
    likely_usd = max((c[0] for c in costs), default=0.0)
    most_usd = max((c[1] for c in costs), default=0.0)
    gate.charge(ticket, (prompt.likely + output, likely_usd), (prompt.most + output, most_usd))


def _check_reasoning(req: ChatCompletionRequest, model_id: str, reasoning: bool) -> None:
    if reasoning:
        return
    sent = {
        "reasoning_effort": req.reasoning_effort not in (UNSET, None),
        "thinking": present(req.thinking),
    }
    for name, value in sent.items():
        if value:
            raise InvalidRequest(
                f"The '{name}' parameter is not supported by the model '{model_id}'; "
                "it is only accepted for models marked as reasoning models.",
                param=name,
                code="unsupported_parameter",
            )


async def try_routes(ex: Exchange, attempt: Callable[[Route], Awaitable[T]]) -> T:
    """`failover.attempt_each` over the request's routes, with the breakers and routing
    settings of the config the request runs on.

    Raises:
        UpstreamError: as `attempt_each` does.
    """
    router = ex.request[SNAPSHOT_KEY].router
    return await attempt_each(
        ex, attempt, breakers=router.breakers, routing=router.settings.routing
    )


async def complete(ex: Exchange) -> ChatReply:
    """The whole answer of a non-streaming request, from the first route that gives one.

    Raises:
        UpstreamError: the upstream refused the request, or every attempt failed.
    """
    return await try_routes(ex, lambda route: route.provider.chat(ex.call))


async def stream(ex: Exchange) -> AsyncGenerator[list[bytes], None]:
    """Batches of OpenAI chunk payloads; routes are tried until one sends its first batch.

    Raises:
        UpstreamError: before the first batch (the caller can still answer with a status)
            or during the stream (the caller ends it with an error event; no retry then).
    """
    events, first = await try_routes(ex, lambda route: _first_batch(ex, route))
    try:
        yield first
        async for batch in events:
            yield batch
    finally:
        await events.aclose()


async def _first_batch(
    ex: Exchange, route: Route
) -> tuple[AsyncGenerator[list[bytes], None], list[bytes]]:
    return await first_batch(route.provider.config, route.provider.stream_chat(ex.call))


async def first_batch(
    config: ProviderConfig, events: AsyncGenerator[list[bytes], None]
) -> tuple[AsyncGenerator[list[bytes], None], list[bytes]]:
    """Wait (bounded by the provider's first-byte timeout) for an attempt's first batch.

    Raises:
        UpstreamError: the attempt failed before its first batch (retryable where another
            route may do better), with `events` closed.
    """
    # Without a first-byte timeout of its own, read_timeout bounds every wait for the upstream
    # (the client's per-read timer), and an extra timer here would only cost time.
    limit = config.first_byte_timeout or config.read_timeout
    try:
        if config.first_byte_timeout is None:
            first = await anext(events, None)
        else:
            async with asyncio.timeout(config.first_byte_timeout):
                first = await anext(events, None)
    except TimeoutError:
        await events.aclose()
        raise UpstreamTimeout(
            f"The upstream provider '{config.name}' sent nothing within {limit:g} s."
        ) from None
    except UpstreamError as exc:
        await events.aclose()
        if type(exc) is UpstreamError:  # an error event, or malformed, before any byte went out
            raise UpstreamUnavailable(exc.message) from exc  # so another route may answer
        raise
    except BaseException:
        await events.aclose()
        raise
    if first is None:
        await events.aclose()
        raise UpstreamConnectionError(
            f"The upstream provider '{config.name}' ended the stream without events."
        )
    return events, first


def finish(ex: Exchange) -> None:
    """Copy usage (or an estimate when the upstream never reported it) and its cost into the
    trace, and settle what the request held."""
    trace, call = ex.trace, ex.call
    if call.first_byte_at is not None:
        trace.ttft_ms = round((call.first_byte_at - call.started_at) * 1000, 3)
    task = asyncio.current_task()
    hung_up = task is not None and task.cancelling() > 0  # the upstream already has the prompt
    usage = call.usage
    if usage is not None:
        trace.prompt_tokens = usage.prompt_tokens
        trace.completion_tokens = usage.completion_tokens
    elif call.first_byte_at is not None or hung_up:
        trace.estimated = True
        trace.prompt_tokens = estimate_prompt_tokens(call.request)
        trace.completion_tokens = call.chunks
    price = ex.request.app[PRICES_KEY].price(call.model, ex.provider.config, call.upstream_model)
    if price is not None:
        trace.cost_usd = price.cost(_counts(trace, usage, call.cache_write_tokens))
    if ex.ticket is not None:
        used = trace.prompt_tokens + trace.completion_tokens
        ex.request.app[GATE_KEY].settle(ex.ticket, used, trace.cost_usd)


def _counts(trace: RequestTrace, usage: OpenAIUsage | None, cache_writes: int) -> Usage:
    prompt, completion = trace.prompt_tokens, trace.completion_tokens
    if usage is None:
        return Usage(prompt, completion)
    cached = reasoning = 0
    details = usage.prompt_tokens_details
    if isinstance(details, PromptTokensDetails) and details.cached_tokens:
        cached = details.cached_tokens
    done = usage.completion_tokens_details
    if isinstance(done, CompletionTokensDetails) and done.reasoning_tokens:
        reasoning = done.reasoning_tokens
    return Usage(prompt, completion, cached=cached, cache_write=cache_writes, reasoning=reasoning)
