"""`POST /v1/embeddings`: OpenAI's embeddings API on the shared pipeline.

The model's routes are narrowed to providers that embed (`Embedder`); a model with none (an
Anthropic one) is a 400. OpenAI-compatible and Azure upstreams get the client's body as it is
(`model` rewritten) and their answer is relayed; Gemini and the demo model answer in OpenAI's
shape, in the `encoding_format` asked for. Limits, budgets (the input priced as prompt
tokens), retries, failover and the usage row are those of chat requests.
"""

from __future__ import annotations

from typing import cast

from aiohttp import web

from gateway import pipeline
from gateway.providers.capabilities import Embedder, EmbeddingCall
from gateway.schemas.codec import decode_body
from gateway.schemas.embeddings import EmbeddingRequest
from gateway.settings import ModelConfig
from gateway.trace import TRACE_KEY

__all__ = ["create_embeddings"]


async def create_embeddings(request: web.Request) -> web.Response:
    """OpenAI Embeddings; `model` and `input` are required."""
    request[TRACE_KEY].metered = True  # every authenticated model request gets a usage row
    body = await request.read()
    req = decode_body(body, EmbeddingRequest)
    req.check()

    def embedding_call(model: ModelConfig) -> EmbeddingCall:
        return EmbeddingCall(request=req, body=body, model=model)

    ex = await pipeline.open_exchange(request, req.model, embedding_call, serves=Embedder)
    try:
        reply = await pipeline.try_routes(
            ex, lambda route: cast(Embedder, route.provider).embeddings(ex.call)
        )
    finally:
        pipeline.finish(ex)
    return web.Response(body=reply.body, content_type="application/json")
