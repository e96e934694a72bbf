"""`POST /v1/completions`: OpenAI's legacy completions, passed through to upstreams serving them.

Only OpenAI-compatible and Azure providers do (`CompletionsPassThrough`); other models get a
400. The body goes upstream as the client sent it (`model` rewritten, the model's
`max_tokens` filling a missing limit, else for a key with a budget or tokens per minute the
provider's `default_max_tokens`, as for chat); a stream always asks for usage, and that usage
chunk is dropped again unless the client asked for it, as for chat. Limits, budgets, retries,
failover and the usage row are those of chat requests.
"""

from __future__ import annotations

import contextlib
from typing import cast

from aiohttp import web

from gateway import pipeline
from gateway.providers.capabilities import CompletionCall, CompletionsPassThrough
from gateway.router import Route
from gateway.schemas.codec import decode_body
from gateway.schemas.completions import CompletionRequest
from gateway.settings import ModelConfig
from gateway.sse import relay
from gateway.trace import TRACE_KEY

__all__ = ["create_completion"]


def _upstream(route: Route) -> CompletionsPassThrough:
    # The routes were narrowed to such providers by open_exchange(serves=...).
    return cast(CompletionsPassThrough, route.provider)


async def create_completion(request: web.Request) -> web.StreamResponse:
    """OpenAI Completions; `model` and `prompt` are required."""
    request[TRACE_KEY].metered = True  # every authenticated model request gets a usage row
    body = await request.read()
    req = decode_body(body, CompletionRequest)

    def completion_call(model: ModelConfig) -> CompletionCall:
        return CompletionCall(request=req, body=body, model=model)

    ex = await pipeline.open_exchange(
        request, req.model, completion_call, serves=CompletionsPassThrough
    )
    try:
        if req.is_stream:
            ex.call.sse_out = True  # relayed event for event: upstream bytes may pass as they are
            events = pipeline.stream(ex, lambda route: _upstream(route).stream_completion(ex.call))
            async with contextlib.aclosing(events) as batches:
                return await relay(request, batches)
        reply = await pipeline.try_routes(ex, lambda route: _upstream(route).completion(ex.call))
        if reply.usage is None:
            pipeline.unreported(ex, reply)
        return web.Response(body=reply.body, content_type="application/json")
    finally:
        pipeline.finish(ex)
