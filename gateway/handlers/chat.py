"""`POST /v1/chat/completions` and `POST /api/v1/chat`: decode, then the shared pipeline.

Everything that can fail with a status (body, model, permissions, the upstream's first
response) happens before the first byte goes out; after that, failures are SSE error events.
"""

from __future__ import annotations

import functools

from aiohttp import web
from msgspec import UNSET

from gateway import pipeline
from gateway.schemas.chat import ChatCompletionRequest
from gateway.schemas.codec import decode_body
from gateway.sse import relay
from gateway.state import SNAPSHOT_KEY

__all__ = ["create_chat", "create_chat_completion"]


async def create_chat(request: web.Request) -> web.StreamResponse:
    """The simple chat API: like chat completions, but `model` falls back to the default."""
    return await _chat(request, default_model=request[SNAPSHOT_KEY].settings.server.default_model)


async def _chat(request: web.Request, default_model: str | None) -> web.StreamResponse:
    # (Metered already: intake meters every POST with a key, so a refusal here is counted.)
    body = await request.read()
    req = decode_body(body, ChatCompletionRequest)
    model_id = req.model if req.model is not UNSET else default_model
    ex = await pipeline.begin(request, req, body, model_id)
    try:
        if req.is_stream:
            ex.call.sse_out = True  # relayed event for event: upstream bytes may pass as they are
            events = pipeline.stream(ex)
            try:
                return await relay(request, events)
            finally:  # (not `contextlib.aclosing`: two coroutines more per stream)
                await events.aclose()
        reply = await pipeline.complete(ex)
        if reply.usage is None:
            pipeline.unreported(ex, reply)
        return web.Response(body=reply.body, content_type="application/json")
    finally:
        pipeline.finish(ex)


# OpenAI Chat Completions; `model` is required. `_chat` itself is the route's handler (a
# partial is no coroutine of its own): no frame of a wrapper stays in every chat request's
# await chain.
create_chat_completion = functools.partial(_chat, default_model=None)
