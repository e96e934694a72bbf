"""OpenAI's embeddings answer: written by the providers that make it themselves (Gemini, demo),
and checked (`relayed_embeddings`) where an OpenAI-compatible upstream wrote it, in one decode
that also classifies the answer and reads its usage.

OpenAI-compatible upstreams answer in this shape already; the others get vectors from their
own API (or compute them) and this writes them the way OpenAI does, including
`encoding_format: "base64"`, which the `openai` SDK asks for by default: each vector as
little-endian float32s, base64-encoded, which is how the SDK decodes it.

Whoever made them, the vectors a client gets are one per input, all of one non-zero length,
of finite float32 numbers, in the encoding it asked for (`check_vectors`): an upstream's
vectors that are not are a 502, not an answer that quietly pairs the wrong vector with an
input or breaks the client's arithmetic.
"""

from __future__ import annotations

import array
import base64
import binascii
import sys
from typing import Annotated

import msgspec
from msgspec import UNSET, UnsetType

from gateway.errors import UpstreamBadResponse
from gateway.providers._answers import answer_error, read_usage
from gateway.providers.capabilities import EmbeddingCall
from gateway.schemas.codec import encode
from gateway.schemas.common import Usage
from gateway.schemas.embeddings import Embedding, EmbeddingList, EmbeddingUsage

__all__ = ["Float32", "check_vectors", "embedding_list", "float32_base64", "relayed_embeddings"]

FLOAT32_MAX = 3.4028234663852886e38
# A number a float32 holds, finite: the bounds also refuse NaN (no comparison holds for it).
Float32 = Annotated[float, msgspec.Meta(ge=-FLOAT32_MAX, le=FLOAT32_MAX)]


class _Item(msgspec.Struct):
    index: int
    embedding: list[Float32] | str


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


_ANSWER = msgspec.json.Decoder(_Answer)
_SHAPE = msgspec.json.Decoder(_Shape)
_USAGE = msgspec.json.Decoder(Usage | None)
_FIELDS = msgspec.json.Decoder(dict[str, msgspec.Raw])


def float32_base64(values: list[float]) -> str:
    """A vector as base64 of its little-endian float32s."""
    packed = array.array("f", values)
    if sys.byteorder != "little":
        packed.byteswap()
    return base64.b64encode(packed.tobytes()).decode("ascii")


def _from_base64(text: str) -> list[float] | None:
    """The float32s of a base64 vector, or None if it is not one (or holds NaN or inf)."""
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None
    if len(raw) % 4:
        return None
    packed = array.array("f", raw)
    if sys.byteorder != "little":
        packed.byteswap()
    try:
        return msgspec.convert(packed.tolist(), list[Float32])
    except msgspec.ValidationError:
        return None


def check_vectors(provider: str, vectors: list[list[float]], inputs: int) -> None:
    """Raises UpstreamBadResponse unless there is one vector per input, all of one non-zero
    length (the numbers' types are the decoder's to check)."""
    problem = None
    if len(vectors) != inputs:
        problem = f"{len(vectors)} embeddings for {inputs} inputs"
    elif len({len(v) for v in vectors}) > 1:
        problem = "embeddings of different lengths"
    elif vectors and not vectors[0]:
        problem = "empty embeddings"
    if problem is not None:
        raise UpstreamBadResponse(f"The upstream provider '{provider}' answered {problem}.")


def relayed_embeddings(provider: str, body: bytes, call: EmbeddingCall) -> bytes:
    """An OpenAI-compatible upstream's embeddings `list`, checked, as the client gets it: the
    upstream's bytes, or, when its vectors are in the other encoding than the one asked for
    (servers that ignore `encoding_format`), the same with `data` rewritten in that one.

    One decode serves it all: whether the body is an embeddings list at all, its usage and
    its vectors. The usage goes into `call.usage` as soon as the body is known to be a list,
    before its vectors are checked (an upstream that answered counted the input).

    Raises:
        UpstreamError: the body is not an embeddings list (`answer_error`: the error it
            carries, classified, or a bad response).
        UpstreamBadResponse: the vectors are not what `check_vectors` and `Float32` require,
            or their indexes are not those of the inputs.
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
        call.usage = read_usage(provider, _shape(provider, body).usage, _USAGE)
        raise bad from None
    items = answer.data
    if items is UNSET:
        raise answer_error(provider, body, "embeddings list")
    call.usage = read_usage(provider, answer.usage, _USAGE)
    inputs, as_base64 = call.request.input_count(), call.request.base64
    vectors: list[list[float]] = []
    for item in items:
        vector = _from_base64(item.embedding) if isinstance(item.embedding, str) else item.embedding
        if vector is None:
            raise bad
        vectors.append(vector)
    check_vectors(provider, vectors, inputs)
    if sorted(item.index for item in items) != list(range(inputs)):
        raise UpstreamBadResponse(
            f"The upstream provider '{provider}' answered embeddings whose indexes are not "
            "those of the inputs."
        )
    if all(isinstance(item.embedding, str) == as_base64 for item in items):
        return body
    fields = _FIELDS.decode(body)
    data = [
        Embedding(index=item.index, embedding=float32_base64(v) if as_base64 else v)
        for item, v in zip(items, vectors, strict=True)
    ]
    fields["data"] = msgspec.Raw(encode(data))
    return encode(fields)


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
    data = [
        Embedding(index=i, embedding=float32_base64(v) if as_base64 else v)
        for i, v in enumerate(vectors)
    ]
    usage = EmbeddingUsage(prompt_tokens=prompt_tokens, total_tokens=prompt_tokens)
    return encode(EmbeddingList(data=data, model=model, usage=usage))
