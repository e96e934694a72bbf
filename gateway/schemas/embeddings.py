"""OpenAI Embeddings wire structs: the request we accept and the `list` object we answer with.

`input` is a string, a list of strings, a list of token ids, or a list of token-id lists, as
OpenAI takes it (non-empty, at most 2048 items); the request is checked before any upstream is
called, so a bad body is a 400 naming the field.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import UNSET, UnsetType

from gateway.errors import InvalidRequest
from gateway.tokens import estimate_input_tokens

__all__ = [
    "MAX_INPUTS",
    "Embedding",
    "EmbeddingList",
    "EmbeddingRequest",
    "EmbeddingUsage",
    "text_inputs",
]

MAX_INPUTS = 2048  # OpenAI's limit on the items of one request
Token = Annotated[int, msgspec.Meta(ge=0, le=2**31 - 1)]


class EmbeddingRequest(msgspec.Struct, omit_defaults=True):
    """`POST /v1/embeddings` body (unknown fields tolerated: pass-through upstreams get them)."""

    model: Annotated[str, msgspec.Meta(min_length=1)]
    # One list type per union is all msgspec decodes, so the items are checked in __post_init__.
    input: str | Annotated[list[str | Token | list[Token]], msgspec.Meta(max_length=MAX_INPUTS)]
    encoding_format: Literal["float", "base64"] | UnsetType | None = UNSET
    dimensions: Annotated[int, msgspec.Meta(ge=1)] | UnsetType | None = UNSET
    user: str | UnsetType | None = UNSET

    def check(self) -> None:
        """What the types cannot say: no empty input, one kind of item.

        Raises:
            InvalidRequest: naming `input`.
        """
        value = self.input
        problem = None
        if not value:
            problem = "it must not be empty"
        elif isinstance(value, list):
            if len({type(item) for item in value}) > 1:
                problem = "expected an array of strings, of tokens, or of token arrays"
            elif not isinstance(value[0], int) and not all(value):
                problem = "its items must not be empty"
        if problem is not None:
            raise InvalidRequest(f"Invalid value for 'input': {problem}.", param="input")

    @property
    def base64(self) -> bool:
        return self.encoding_format == "base64"

    def texts(self) -> list[str] | None:
        """The inputs as strings, or None when they are token ids."""
        if isinstance(self.input, str):
            return [self.input]
        if isinstance(self.input[0], str):
            return [str(item) for item in self.input]
        return None

    def token_lists(self) -> list[list[int]]:
        """The inputs as token-id lists (for inputs given as tokens)."""
        if isinstance(self.input[0], int):
            return [[int(t) for t in self.input if isinstance(t, int)]]
        return [item for item in self.input if isinstance(item, list)]

    def input_count(self) -> int:
        """How many inputs there are: one vector is owed for each."""
        if isinstance(self.input, str) or isinstance(self.input[0], int):
            return 1
        return len(self.input)

    def prompt_estimate(self) -> int:
        """The input's tokens: counted for token ids, about four characters a token for text."""
        return estimate_input_tokens(self.input)


def text_inputs(req: EmbeddingRequest, provider_type: str) -> list[str]:
    """The texts of a request for an upstream that takes text only.

    Raises:
        InvalidRequest: the input is token ids.
    """
    texts = req.texts()
    if texts is None:
        raise InvalidRequest(
            f"The 'input' parameter must be text for {provider_type} models: token ids "
            "cannot be sent to them.",
            param="input",
            code="unsupported_parameter",
        )
    return texts


class Embedding(msgspec.Struct):
    index: int
    embedding: list[float] | str  # base64: little-endian float32s
    object: Literal["embedding"] = "embedding"


class EmbeddingUsage(msgspec.Struct):
    prompt_tokens: int
    total_tokens: int


class EmbeddingList(msgspec.Struct):
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage
    object: Literal["list"] = "list"
