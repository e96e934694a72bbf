"""OpenAI's embeddings answer: written by the providers that make it themselves (Gemini, demo),
and checked (`relayed_embeddings`) where an OpenAI-compatible upstream wrote it, in one read
of the body that also classifies the answer and reads its usage.

OpenAI-compatible upstreams answer in this shape already; the others get vectors from their
own API (or compute them) and this writes them the way OpenAI does, including
`encoding_format: "base64"`, which the `openai` SDK asks for by default: each vector as
little-endian float32s, base64-encoded, which is how the SDK decodes it.

Whoever made them, the vectors a client gets are one per input, in input order, all of one
non-zero length (the `dimensions` asked for, if any), of finite float32 numbers, in the
encoding it asked for (`check_vectors`): an upstream's vectors that are not are a 502, not
an answer that quietly pairs the wrong vector with an input or breaks the client's arithmetic.
"""

from __future__ import annotations

import array
import asyncio
import base64
import binascii
import math
import sys
from collections.abc import Iterator, Sequence, Sized
from typing import Annotated

import msgspec
import structlog
from msgspec import UNSET, UnsetType

from gateway.errors import UpstreamBadResponse
from gateway.providers._answers import answer_error, read_usage
from gateway.providers.capabilities import EmbeddingCall
from gateway.schemas.codec import encode
from gateway.schemas.common import Usage
from gateway.schemas.embeddings import Embedding, EmbeddingList, EmbeddingUsage

__all__ = [
    "Float32",
    "answer_limit",
    "check_vectors",
    "embedding_list",
    "float32_base64",
    "relayed_embeddings",
    "written_embeddings",
]

log = structlog.get_logger(__name__)

FLOAT32_MAX = 3.4028234663852886e38
# A number a float32 holds, finite: the bounds also refuse NaN (no comparison holds for it).
Float32 = Annotated[float, msgspec.Meta(ge=-FLOAT32_MAX, le=FLOAT32_MAX)]


class _Item(msgspec.Struct):
    index: int
    # Read one vector at a time (`_VECTOR`), so that a large answer lets other requests run
    # between its vectors (`relayed_embeddings`).
    embedding: msgspec.Raw


Vector = list[Float32] | str


_NULL = msgspec.Raw(b"null")


class _Answer(msgspec.Struct):
    """An OpenAI embeddings `list`, read once: its vectors checked by type, its usage kept raw
    (an unreadable usage must not cost the client its vectors: `read_usage`)."""

    data: list[_Item] | UnsetType = UNSET
    usage: msgspec.Raw = _NULL  # (a Raw cannot be in a union)


class _Shape(msgspec.Struct):
    """What makes a body an embeddings `list` at all (its `data` items, unread), read only
    when `_Answer` failed, to tell a body that is no list from one whose vectors are bad."""

    data: list[msgspec.Raw] | UnsetType = UNSET
    usage: msgspec.Raw = _NULL


# The largest answer an embeddings request can legally get, so that the largest one (2,048
# inputs of 3,072 floats, 80 MB to 200 MB of JSON by how the upstream writes a float) is not
# refused for being over `max_response_bytes` (64 MiB), while the bound still holds: per
# float, 32 bytes (a float64's 21 digits of a float32 on its own line, indented, as a pretty
# printer writes it; base64 takes 6, and an upstream may answer floats whatever was asked);
# per vector, its object; `DIMENSIONS` floats when the request does not say (the widest of
# OpenAI's models), at most `MAX_DIMENSIONS`.
FLOAT_BYTES = 32
VECTOR_BYTES = 256
FRAME_BYTES = 64 * 1024
DIMENSIONS = 3072
MAX_DIMENSIONS = 8192


def answer_limit(call: EmbeddingCall, configured: int) -> int:
    """The most bytes an answer to `call` may have: the larger of `configured` (the provider's
    `max_response_bytes`) and what its inputs and dimensions can legally take."""
    req = call.request
    inputs = len(req.input) if isinstance(req.input, list) else 1
    width = req.dimensions if isinstance(req.dimensions, int) else DIMENSIONS
    legal = inputs * (min(width, MAX_DIMENSIONS) * FLOAT_BYTES + VECTOR_BYTES) + FRAME_BYTES
    return max(configured, legal)


_ANSWER = msgspec.json.Decoder(_Answer)
_VECTOR = msgspec.json.Decoder(Vector)
# Bytes of vectors checked between two chances for other requests to run: about a
# millisecond's work, so a 60 MB answer does not hold up the worker's other requests.
SLICE_BYTES = 256 * 1024
_SHAPE = msgspec.json.Decoder(_Shape)
_USAGE = msgspec.json.Decoder(Usage | None)
_FIELDS = msgspec.json.Decoder(dict[str, msgspec.Raw])


def float32_base64(values: Sequence[float]) -> str:
    """A vector as base64 of its little-endian float32s."""
    packed = values if isinstance(values, array.array) else array.array("f", values)
    if sys.byteorder != "little":
        packed = array.array("f", packed)
        packed.byteswap()
    return base64.b64encode(packed.tobytes()).decode("ascii")


# Byte 3 of a little-endian float32 holds its sign and the exponent's top seven bits: all set
# only in numbers past 2**127, inf and NaN (no embedding is near that, so one scan clears it).
_TOP_EXPONENT = bytes(1 if b & 0x7F == 0x7F else 0 for b in range(256))


def _from_base64(text: str) -> array.array[float] | None:
    """The float32s of a base64 vector, or None if it is not one (or holds NaN or inf).

    Looked at without a Python float per number (a 2,048-input answer holds six million):
    the finite check is a byte scan, and only a vector that fails it is summed (NaN and inf
    make any sum non-finite, and finite float32s cannot overflow a double's)."""
    try:
        raw = binascii.a2b_base64(text, strict_mode=True)
    except (binascii.Error, ValueError):
        return None
    if len(raw) % 4:
        return None
    packed = array.array("f", raw)
    if sys.byteorder != "little":
        packed.byteswap()
    if 1 in raw[3::4].translate(_TOP_EXPONENT) and not math.isfinite(sum(packed)):
        return None
    return packed


def check_vectors(
    provider: str, vectors: Sequence[Sized], inputs: int, dimensions: int | None = None
) -> None:
    """Raises UpstreamBadResponse unless there is one vector per input, all of one non-zero
    length, and that the `dimensions` asked for, if any (the numbers' types are the
    decoder's to check)."""
    problem = None
    if len(vectors) != inputs:
        problem = f"{len(vectors)} embeddings for {inputs} inputs"
    elif len({len(v) for v in vectors}) > 1:
        problem = "embeddings of different lengths"
    elif vectors and not len(vectors[0]):
        problem = "empty embeddings"
    elif vectors and dimensions is not None and len(vectors[0]) != dimensions:
        problem = f"embeddings of {len(vectors[0])} dimensions where {dimensions} were asked for"
    if problem is not None:
        raise UpstreamBadResponse(f"The upstream provider '{provider}' answered {problem}.")


async def relayed_embeddings(provider: str, body: bytes, call: EmbeddingCall) -> bytes:
    """An OpenAI-compatible upstream's embeddings `list`, checked, as the client gets it: the
    upstream's bytes, or, when its vectors are in the other encoding than the one asked for
    (servers that ignore `encoding_format`) or not in input order, the same with `data`
    rewritten in that encoding and order.

    One read of the body serves it all: whether it is an embeddings list at all, its usage
    and its vectors (each decoded where the list's decode left it raw, `SLICE_BYTES` of them
    between two chances for the worker's other requests to run). The usage goes into
    `call.usage` as soon as the body is known to be a list, before its vectors are checked
    (an upstream that answered counted the input), unless it cannot be true (`_usage`).

    Raises:
        UpstreamError: the body is not an embeddings list (`answer_error`: the error it
            carries, classified, or a bad response).
        UpstreamBadResponse: the vectors are not what `check_vectors` (with the request's
            `dimensions`) and `Float32` require, or their indexes are not those of the inputs.
    """
    bad = UpstreamBadResponse(
        f"The upstream provider '{provider}' answered embeddings that are not vectors of "
        "finite float32 numbers."
    )
    try:
        answer = _ANSWER.decode(body)
    except (msgspec.MsgspecError, RecursionError):
        # The common case never gets here: only now is it worth a second look, to tell a body
        # that is no embeddings list (an error carried in a 200) from bad vectors.
        call.usage = _usage(provider, _shape(provider, body).usage, call)
        raise bad from None
    items = answer.data
    if items is UNSET:
        raise answer_error(provider, body, "embeddings list")
    call.usage = _usage(provider, answer.usage, call)
    req = call.request
    inputs, as_base64 = req.input_count(), req.base64
    sent: list[Vector] = []
    vectors: list[Sequence[float]] = []
    checked = 0
    for item in items:
        try:
            value = _VECTOR.decode(item.embedding)
        except (msgspec.MsgspecError, RecursionError):
            raise bad from None
        vector = _from_base64(value) if isinstance(value, str) else value
        if vector is None:
            raise bad
        sent.append(value)
        vectors.append(vector)
        checked += len(item.embedding)
        if checked >= SLICE_BYTES:  # (only answers of many or long vectors get here)
            checked = 0
            await asyncio.sleep(0)
    dims = req.dimensions if isinstance(req.dimensions, int) else None
    check_vectors(provider, vectors, inputs, dims)
    in_order = all(item.index == i for i, item in enumerate(items))
    if not in_order and sorted(item.index for item in items) != list(range(inputs)):
        raise UpstreamBadResponse(
            f"The upstream provider '{provider}' answered embeddings whose indexes are not "
            "those of the inputs."
        )
    if in_order and all(isinstance(value, str) == as_base64 for value in sent):
        return body  # (nearly every answer: relayed as it came)
    # In input order (clients pair vectors with inputs by position, and OpenAI answers in
    # that order), and in the encoding asked for (servers that ignore `encoding_format`).
    data = [
        Embedding(index=index, embedding=_encoded(value, v, as_base64))
        for index, value, v in sorted(
            zip((item.index for item in items), sent, vectors, strict=True),
            key=lambda triple: triple[0],
        )
    ]
    fields = _FIELDS.decode(body)
    fields["data"] = msgspec.Raw(encode(data))
    return encode(fields)


def _encoded(
    sent: list[float] | str, vector: Sequence[float], as_base64: bool
) -> list[float] | str:
    """A vector as the client asked for it: as the upstream sent it if that is so."""
    if isinstance(sent, str) == as_base64:
        return sent
    if as_base64:
        return float32_base64(vector)
    return vector.tolist() if isinstance(vector, array.array) else list(vector)


def _usage(provider: str, raw: msgspec.Raw, call: EmbeddingCall) -> Usage | None:
    """The usage of an answer, or None (the row is estimated, with a warning) for one that
    cannot be true: output tokens (an embedding has none), or more prompt tokens than the
    request has bytes (a token is at least a byte of text, or an id written in one)."""
    usage = read_usage(provider, raw, _USAGE)
    if usage is None or (
        not usage.completion_tokens and usage.prompt_tokens <= len(call.body or b"")
    ):
        return usage
    log.warning(
        "upstream_usage_implausible",
        provider=provider,
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
    )
    return None


def _shape(provider: str, body: bytes) -> _Shape:
    """The body as an embeddings list of unread items.

    Raises:
        UpstreamError: it is not one (`answer_error`).
    """
    try:
        shape = _SHAPE.decode(body)
    except (msgspec.MsgspecError, RecursionError):
        raise answer_error(provider, body, "embeddings list") from None
    if shape.data is UNSET:
        raise answer_error(provider, body, "embeddings list")
    return shape


def embedding_list(
    vectors: list[list[float]], *, model: str, prompt_tokens: int, as_base64: bool
) -> bytes:
    """The encoded `list` object of `vectors`, in request order."""
    return _framed(list(_items(vectors, as_base64)), model, prompt_tokens)


async def written_embeddings(
    vectors: list[list[float]], *, model: str, prompt_tokens: int, as_base64: bool
) -> bytes:
    """`embedding_list`, written on the event loop `SLICE_BYTES` at a time, with a chance for
    the worker's other requests to run between two slices (2,048 vectors of 3,072 floats
    take a third of a second to write)."""
    items: list[bytes] = []
    written = total = 0
    for item in _items(vectors, as_base64):
        items.append(item)
        written += len(item)
        if written >= SLICE_BYTES:
            total += written
            written = 0
            await asyncio.sleep(0)
    if total:  # a large list: its one copy into the answer is a slice of its own
        await asyncio.sleep(0)
    return _framed(items, model, prompt_tokens)


def _items(vectors: list[list[float]], as_base64: bool) -> Iterator[bytes]:
    for i, v in enumerate(vectors):
        yield encode(Embedding(index=i, embedding=float32_base64(v) if as_base64 else v))


_DATA_START = b'{"data":['


def _framed(items: list[bytes], model: str, prompt_tokens: int) -> bytes:
    """The `list` object around its encoded items (`data` is the struct's first field), in
    one copy of them."""
    usage = EmbeddingUsage(prompt_tokens=prompt_tokens, total_tokens=prompt_tokens)
    rest = encode(EmbeddingList(data=[], model=model, usage=usage))  # b'{"data":[],...}'
    parts = [_DATA_START]
    for i, item in enumerate(items):
        if i:
            parts.append(b",")
        parts.append(item)
    parts.append(rest[len(_DATA_START) :])
    return b"".join(parts)
