"""What the fakes answer on OpenAI's embeddings and legacy completions endpoints (and Gemini's
``batchEmbedContents``), checking requests the way the real APIs do.

OpenAI ``POST /v1/embeddings`` (``openai_embeddings``): ``model`` and ``input`` required;
``input`` a non-empty string, or a non-empty list (at most 2048) of non-empty strings, of token
ids, or of non-empty token-id lists, never mixed; ``encoding_format`` ``float`` or ``base64``
(little-endian float32s); ``dimensions`` only on ``text-embedding-3*`` models, at most their
native size; a bad request is OpenAI's 400 ``'$.input' is invalid...``. Vectors are made from
a hash of each input, so the same input always gets the same vector; ``usage`` counts words
(or tokens).

OpenAI ``POST /v1/completions`` (``completion_reply``/``completion_chunks``): ``prompt``
required; answers "echo: <prompt>" cut to ``max_tokens`` words (default 16, as OpenAI's), as a
``text_completion`` or its chunk stream (a usage chunk last with ``include_usage``).

Gemini ``batchEmbedContents`` (``gemini_embeddings``): at most 100 requests, each naming the
URL's model as ``models/<name>``, with text parts; ``outputDimensionality`` cuts the vector.
"""

from __future__ import annotations

import base64
import hashlib
import math
import struct
import time
from typing import Any

Json = dict[str, Any]

NATIVE_DIMENSIONS = {"text-embedding-3-large": 3072, "text-embedding-ada-002": 1536}
DEFAULT_DIMENSIONS = 1536
GEMINI_DIMENSIONS = {"gemini-embedding-001": 3072}
BAD_INPUT = (
    "'$.input' is invalid. Please check the API reference: "
    "https://platform.openai.com/docs/api-reference."
)


class Refused(Exception):
    """A request the real API answers with 400; ``str(self)`` is its message."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


def vector(seed: str, dims: int) -> list[float]:
    """A deterministic unit vector for ``seed`` (float32-exact, as the APIs send them)."""
    values: list[float] = []
    counter = 0
    while len(values) < dims:
        digest = hashlib.sha256(f"{seed}:{counter}".encode()).digest()
        values.extend(b / 255 - 0.5 for b in digest)
        counter += 1
    values = values[:dims]
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    return [struct.unpack("<f", struct.pack("<f", v / norm))[0] for v in values]


def _inputs(body: Json) -> list[Any]:
    value = body.get("input")
    if isinstance(value, str):
        if not value:
            raise Refused(BAD_INPUT, "input")
        return [value]
    if not isinstance(value, list) or not value or len(value) > 2048:
        raise Refused(BAD_INPUT, "input")
    if all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return [value]  # one token list
    if all(isinstance(v, str) and v for v in value):
        return value
    if all(isinstance(v, list) and v and all(isinstance(t, int) for t in v) for v in value):
        return value
    raise Refused(BAD_INPUT, "input")


def openai_embeddings(body: Json, model: str) -> Json:
    """The ``list`` answering an embeddings request to ``model``, or ``Refused``."""
    inputs = _inputs(body)
    fmt = body.get("encoding_format") or "float"
    if fmt not in ("float", "base64"):
        raise Refused(f"Invalid value for 'encoding_format': '{fmt}'.", "encoding_format")
    native = NATIVE_DIMENSIONS.get(model, DEFAULT_DIMENSIONS)
    dims = body.get("dimensions")
    if dims is not None:
        if not model.startswith("text-embedding-3"):
            raise Refused("This model does not support specifying dimensions.", "dimensions")
        if not isinstance(dims, int) or not 1 <= dims <= native:
            raise Refused(f"Invalid value for 'dimensions': {dims}.", "dimensions")
    data = []
    for index, item in enumerate(inputs):
        values = vector(str(item), dims or native)
        embedding: Any = values
        if fmt == "base64":
            embedding = base64.b64encode(struct.pack(f"<{len(values)}f", *values)).decode()
        data.append({"object": "embedding", "index": index, "embedding": embedding})
    tokens = sum(len(i.split()) if isinstance(i, str) else len(i) for i in inputs)
    return {
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


def completion_reply(body: Json, model: str, reply_id: str) -> Json:
    """The ``text_completion`` answering a legacy completions request, or ``Refused``."""
    prompt = body.get("prompt")
    if prompt is None:
        raise Refused("You must provide a prompt.", "prompt")
    text = prompt if isinstance(prompt, str) else " ".join(map(str, prompt))
    limit = body.get("max_tokens", 16)
    words = f"echo: {text}".split(" ")
    finish = "stop"
    if limit is not None and len(words) > limit:
        words, finish = words[:limit], "length"
    choice = {"text": " ".join(words), "index": 0, "logprobs": None, "finish_reason": finish}
    prompt_tokens = len(text.split())
    return {
        "id": reply_id,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": len(words),
            "total_tokens": prompt_tokens + len(words),
        },
        "system_fingerprint": "fp_fake0001",
    }


def completion_chunks(body: Json, reply: Json) -> list[Json]:
    """The chunk stream of ``reply``: the text word by word, then the finish, then usage."""
    head = {k: reply[k] for k in ("id", "object", "created", "model")}
    choice = reply["choices"][0]
    words = choice["text"].split(" ")
    chunks = [
        head | {"choices": [{"text": w if i == 0 else " " + w, "index": 0, "logprobs": None}]}
        for i, w in enumerate(words)
    ]
    for chunk in chunks:
        chunk["choices"][0]["finish_reason"] = None
    last = {"text": "", "index": 0, "logprobs": None, "finish_reason": choice["finish_reason"]}
    chunks.append(head | {"choices": [last]})
    if (body.get("stream_options") or {}).get("include_usage"):
        chunks.append(head | {"choices": [], "usage": reply["usage"]})
    return chunks


def gemini_embeddings(body: Any, model: str) -> Json:
    """The ``batchEmbedContents`` answer for ``model``, or ``Refused`` with Google's message."""
    if not isinstance(body, dict) or set(body) - {"requests"}:
        extra = next(iter(set(body) - {"requests"})) if isinstance(body, dict) else ""
        raise Refused(f'Invalid JSON payload received. Unknown name "{extra}": Cannot find field.')
    requests = body.get("requests")
    if not isinstance(requests, list) or not requests:
        raise Refused("* BatchEmbedContentsRequest.requests: requests is not specified")
    if len(requests) > 100:
        raise Refused(
            "* BatchEmbedContentsRequest.requests: at most 100 requests can be in one batch"
        )
    known = {"model", "content", "taskType", "title", "outputDimensionality"}
    vectors = []
    for i, req in enumerate(requests):
        where = f"requests[{i}]"
        unknown = set(req) - known
        if unknown:
            name = next(iter(unknown))
            raise Refused(
                f"Invalid JSON payload received. Unknown name \"{name}\" at '{where}': "
                "Cannot find field."
            )
        if req.get("model") != f"models/{model}":
            raise Refused(
                f"* BatchEmbedContentsRequest.{where}.model: model must be the model of the "
                f"batch request (models/{model})."
            )
        parts = (req.get("content") or {}).get("parts") or []
        texts = [p.get("text") for p in parts]
        if not parts or not all(isinstance(t, str) for t in texts):
            raise Refused(f"* BatchEmbedContentsRequest.{where}.content: only text is supported.")
        dims = req.get("outputDimensionality") or GEMINI_DIMENSIONS.get(model, 768)
        if not isinstance(dims, int) or dims < 1:
            raise Refused(f"* {where}.output_dimensionality: must be positive.")
        values = vector(" ".join(texts), GEMINI_DIMENSIONS.get(model, 768))[:dims]
        vectors.append({"values": values})
    return {"embeddings": vectors}


__all__ = [
    "Refused",
    "completion_chunks",
    "completion_reply",
    "gemini_embeddings",
    "openai_embeddings",
    "vector",
]
