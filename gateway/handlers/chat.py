"""`POST /v1/chat/completions` and `POST /api/v1/chat`: decode, check, route, answer as JSON or SSE.

Everything that can fail with a status (body, model, permissions, the upstream's first
response) happens before the first byte goes out; after that, failures are SSE error events.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable

import structlog
from aiohttp import web
from msgspec import UNSET

from gateway.errors import (
    GatewayError,
    InvalidRequest,
    PermissionDenied,
    UpstreamError,
    UpstreamUnavailable,
)
from gateway.middleware import CLIENT_CLOSED, TRACE_KEY, RequestTrace
from gateway.providers import ChatCall, Provider
from gateway.records import model_allowed
from gateway.router import Router
from gateway.schemas.chat import ChatCompletionRequest
from gateway.schemas.codec import RAW_OBJECT, decode_body, present
from gateway.sse import SSEStream
from gateway.state import PRINCIPAL_KEY, ROUTER_KEY, SETTINGS_KEY, SHUTTING_DOWN_KEY
from gateway.tokens import estimate_prompt_tokens

__all__ = ["create_chat", "create_chat_completion"]

log = structlog.get_logger(__name__)

MAX_MODEL_ID = 256


async def create_chat_completion(request: web.Request) -> web.StreamResponse:
    """OpenAI Chat Completions; `model` is required."""
    return await _chat(request, default_model=None)


async def create_chat(request: web.Request) -> web.StreamResponse:
    """The simple chat API: like chat completions, but `model` falls back to the default."""
    return await _chat(request, default_model=request.app[SETTINGS_KEY].server.default_model)


async def _chat(request: web.Request, default_model: str | None) -> web.StreamResponse:
    trace = request[TRACE_KEY]
    trace.metered = True  # every authenticated model request gets a usage row, refusals too
    body = await request.read()
    req = decode_body(body, ChatCompletionRequest)
    model_id = req.model if req.model is not UNSET else default_model
    if not model_id:
        raise InvalidRequest("You must provide a model parameter.", param="model")
    if len(model_id) > MAX_MODEL_ID:
        raise InvalidRequest(
            f"The model id is longer than {MAX_MODEL_ID} characters.", param="model"
        )
    router: Router = request.app[ROUTER_KEY]
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
    route = router.pick(model)
    trace.model = model
    trace.model_id = model_id
    trace.provider = route.provider.config.name
    trace.upstream_model = route.upstream_model
    trace.stream = req.is_stream
    call = ChatCall(
        request=req,
        raw=RAW_OBJECT.decode(body),
        model=model,
        upstream_model=route.upstream_model,
        api_key=route.api_key,
        request_id=trace.request_id,
    )
    try:
        if req.is_stream:
            return await _stream(request, route.provider, call, trace)
        reply = await route.provider.chat(call)
        return web.Response(body=reply.body, content_type="application/json")
    finally:
        _account(trace, call)


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


async def _stream(
    request: web.Request, provider: Provider, call: ChatCall, trace: RequestTrace
) -> web.StreamResponse:
    events = provider.stream_chat(call)
    try:
        # Wait for the upstream's first event before committing to a 200.
        first = await anext(events, None)
        if first is None:
            raise UpstreamError(
                f"The upstream provider '{provider.config.name}' ended the stream without events."
            )
    except BaseException:
        await events.aclose()
        raise
    sse = SSEStream(request)
    try:
        await sse.start()
        await sse.send_batch(first)
        async for batch in events:
            await sse.send_batch(batch)
        await sse.done()
    except GatewayError as exc:
        trace.status = exc.status
        await _try(sse.error(exc))
    except ConnectionError:
        trace.status = CLIENT_CLOSED  # the client hung up; the upstream is closed below
    except asyncio.CancelledError:
        if request.app[SHUTTING_DOWN_KEY].is_set():
            trace.status = 503
            await _try(sse.error(UpstreamUnavailable("The gateway is shutting down.")))
        raise
    except Exception:
        # The 200 is out: a bug must still end the stream with an error the SDK raises.
        log.exception("stream_failed")
        trace.status = 500
        await _try(sse.error(GatewayError("The gateway failed while streaming the response.")))
    finally:
        await events.aclose()
        await sse.close()
    return sse.response


async def _try(aw: Awaitable[None]) -> None:
    with contextlib.suppress(ConnectionError):
        await aw


def _account(trace: RequestTrace, call: ChatCall) -> None:
    """Copy usage (or an estimate when the upstream never reported it) into the trace."""
    if call.first_byte_at is not None:
        trace.ttft_ms = round((call.first_byte_at - call.started_at) * 1000, 3)
    task = asyncio.current_task()
    hung_up = task is not None and task.cancelling() > 0  # the upstream already has the prompt
    if call.usage is not None:
        trace.prompt_tokens = call.usage.prompt_tokens
        trace.completion_tokens = call.usage.completion_tokens
    elif call.first_byte_at is not None or hung_up:
        trace.estimated = True
        trace.prompt_tokens = estimate_prompt_tokens(call.request)
        trace.completion_tokens = call.chunks
