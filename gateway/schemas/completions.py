"""OpenAI's legacy Completions request (`POST /v1/completions`), as far as the gateway reads it.

Completions are passed through to OpenAI-compatible upstreams as the client sent them; the
struct names what the gateway needs (the model, streaming, limits for admission, the prompt
for estimates) and checks those fields' types, tolerating every other field.
"""

from __future__ import annotations

from typing import Annotated

import msgspec
from msgspec import UNSET, UnsetType

from gateway.schemas.chat import MAX_OUTPUT_TOKENS, StreamOptions, wants_usage

__all__ = ["CompletionRequest"]

Token = Annotated[int, msgspec.Meta(ge=0, le=2**31 - 1)]


class CompletionRequest(msgspec.Struct, omit_defaults=True):
    """`POST /v1/completions` body (unknown fields tolerated and forwarded)."""

    model: Annotated[str, msgspec.Meta(min_length=1)]
    prompt: str | list[str | Token | list[Token]]
    stream: bool | UnsetType | None = UNSET
    stream_options: StreamOptions | UnsetType | None = UNSET
    max_tokens: Annotated[int, msgspec.Meta(ge=0, le=MAX_OUTPUT_TOKENS)] | UnsetType | None = UNSET
    n: Annotated[int, msgspec.Meta(ge=1, le=128)] | UnsetType | None = UNSET
    best_of: Annotated[int, msgspec.Meta(ge=1, le=20)] | UnsetType | None = UNSET
    suffix: str | UnsetType | None = UNSET  # (after each prompt: input the upstream bills)
    service_tier: str | UnsetType | None = UNSET  # (some tiers billed at rates of their own)

    @property
    def is_stream(self) -> bool:
        return self.stream is True

    @property
    def wants_usage(self) -> bool:
        return wants_usage(self.stream_options)

    @property
    def prompts(self) -> int:
        """How many prompts the request holds, each answered on its own: a list of strings or
        of token lists is several; a string or a list of tokens, one."""
        prompt = self.prompt
        if isinstance(prompt, list) and any(not isinstance(p, int) for p in prompt):
            return len(prompt)
        return 1

    @property
    def streamed_choices(self) -> int:
        """The choices a stream of this request answers with (indexes 0 to this - 1): `n` for
        each prompt."""
        return (self.n if isinstance(self.n, int) else 1) * self.prompts

    @property
    def unseen_choices(self) -> bool:
        """Whether the upstream generates completions the answer does not hold (`best_of`
        past `n`: each is billed)."""
        n = self.n if isinstance(self.n, int) else 1
        return isinstance(self.best_of, int) and self.best_of > n

    @property
    def choices(self) -> int:
        """Completions generated upstream: `n` (`best_of` when set: each is billed) for each
        prompt."""
        n = self.n if isinstance(self.n, int) else 1
        if isinstance(self.best_of, int):
            n = max(n, self.best_of)
        return n * self.prompts
