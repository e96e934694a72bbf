"""OpenAI embeddings requests → Gemini's `batchEmbedContents`, and its vectors back.

Each input text becomes one `EmbedContentRequest` (`model` naming the same model as the URL,
as Google requires), `dimensions` becomes `outputDimensionality`, and the shortened vectors
that come back are scaled to unit length (OpenAI's always have it; Gemini's only at full
size). Google takes at most 100
requests per call, so larger inputs are sent in batches of 100, one after the other. Gemini
embeds text only: token-id inputs are a 400. It reports no token usage for embeddings, so the
usage is the gateway's estimate (and the usage row says it was estimated).
"""

from __future__ import annotations

import math

from msgspec import UNSET

from gateway.providers._embeddings import check_vectors, written_embeddings
from gateway.providers._http import UpstreamClient
from gateway.providers.base import ChatReply
from gateway.providers.capabilities import EmbeddingCall
from gateway.providers.gemini.request import PROVIDER
from gateway.providers.gemini.wire import (
    BATCH_EMBED_DECODER,
    GeminiBatchEmbedRequest,
    GeminiContent,
    GeminiEmbedRequest,
    GeminiPart,
)
from gateway.schemas.codec import encode
from gateway.schemas.embeddings import text_inputs

__all__ = ["BATCH_LIMIT", "embed"]

BATCH_LIMIT = 100  # Google's most requests in one batchEmbedContents call


async def embed(http: UpstreamClient, url: str, model: str, call: EmbeddingCall) -> ChatReply:
    """Embed the call's texts through `url` (the model's `:batchEmbedContents`).

    Raises:
        InvalidRequest: the input is token ids.
        UpstreamError: the upstream failed, or its vectors are not what `check_vectors`
            requires.
    """
    req = call.request
    texts = text_inputs(req, PROVIDER)
    dims = req.dimensions if isinstance(req.dimensions, int) else UNSET
    vectors: list[list[float]] = []
    for start in range(0, len(texts), BATCH_LIMIT):
        batch = texts[start : start + BATCH_LIMIT]
        body = GeminiBatchEmbedRequest(
            requests=[
                GeminiEmbedRequest(
                    model=model,
                    content=GeminiContent(parts=[GeminiPart(text=text)]),
                    output_dimensionality=dims,
                )
                for text in batch
            ]
        )
        answer = http.decode(
            BATCH_EMBED_DECODER,
            await http.post(url, encode(body), call),
            "batchEmbedContents answer",
        )
        batch_vectors = [e.values for e in answer.embeddings]
        asked = None if dims is UNSET else dims  # (an upstream that ignored it: a 502)
        check_vectors(http.config.name, batch_vectors, len(batch), asked)  # each batch's count
        vectors.extend(batch_vectors if dims is UNSET else map(_unit, batch_vectors))
    check_vectors(http.config.name, vectors, len(texts))  # one length across batches
    prompt = req.prompt_estimate()
    body_out = await written_embeddings(
        vectors, model=req.model, prompt_tokens=prompt, as_base64=req.base64
    )
    return ChatReply(body=body_out, usage=None)


def _unit(values: list[float]) -> list[float]:
    """`values` scaled to length 1 (a zero vector stays as it is)."""
    length = math.sqrt(math.fsum(v * v for v in values))
    return [v / length for v in values] if length else values
