"""OpenAI's embeddings answer, written by the providers that make it themselves (Gemini, demo).

OpenAI-compatible upstreams answer in this shape already; the others get vectors from their
own API (or compute them) and this writes them the way OpenAI does, including
`encoding_format: "base64"`, which the `openai` SDK asks for by default: each vector as
little-endian float32s, base64-encoded, which is how the SDK decodes it.
"""

from __future__ import annotations

import array
import base64
import sys

from gateway.schemas.codec import encode
from gateway.schemas.embeddings import Embedding, EmbeddingList, EmbeddingUsage

__all__ = ["embedding_list", "float32_base64"]


def float32_base64(values: list[float]) -> str:
    """A vector as base64 of its little-endian float32s."""
    packed = array.array("f", values)
    if sys.byteorder != "little":
        packed.byteswap()
    return base64.b64encode(packed.tobytes()).decode("ascii")


def embedding_list(
    vectors: list[list[float]], *, model: str, prompt_tokens: int, as_base64: bool
) -> bytes:
    """The encoded `list` object of `vectors`, in request order."""
    data = [
        Embedding(index=i, embedding=float32_base64(v) if as_base64 else v)
        for i, v in enumerate(vectors)
    ]
    usage = EmbeddingUsage(prompt_tokens=prompt_tokens, total_tokens=prompt_tokens)
    return encode(EmbeddingList(data=data, model=model, usage=usage))
