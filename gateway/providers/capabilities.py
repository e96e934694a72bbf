"""Optional provider capabilities beyond chat, each a Protocol of its own, and their calls.

A provider type has a capability when its adapter class has the Protocol's methods; the
endpoint that needs it narrows a model's routes to such providers (`has_capability`), and
refuses a model none of whose providers has it with a 400. So:

- `Embedder`: `POST /v1/embeddings` (OpenAI-compatible, Azure, Gemini, demo).
- `CompletionsPassThrough`: `POST /v1/completions`, the legacy API (OpenAI-compatible, Azure).
- `MessagesPassThrough`: `POST /v1/messages` and its token count, relayed to an upstream that
  speaks Anthropic's Messages API itself (Anthropic); others get it translated to chat.

(Methods only, so that `issubclass()` can answer for a provider class once.)
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Mapping
from typing import Protocol, runtime_checkable

import msgspec

from gateway.providers.base import UNBOUNDED, Call, ChatCall, ChatReply
from gateway.schemas.completions import CompletionRequest
from gateway.schemas.embeddings import EmbeddingRequest
from gateway.tokens import estimate_input_tokens, estimate_text_tokens

__all__ = [
    "CompletionCall",
    "CompletionsPassThrough",
    "Embedder",
    "EmbeddingCall",
    "MessagesPassThrough",
]


class EmbeddingCall(Call, kw_only=True):
    """An embeddings request on its way upstream (`body`: the client's JSON)."""

    request: EmbeddingRequest

    def prompt_estimate(self) -> int:
        return self.request.prompt_estimate()


class CompletionCall(Call, kw_only=True):
    """A legacy completions request on its way upstream (`body`: the client's JSON).

    Attributes:
        output_cap: the output limit admission reserved for a request that sets none (keys
            with a budget or tokens per minute), sent upstream as its `max_tokens` (as
            `ChatCall.output_cap`).
    """

    request: CompletionRequest
    output_cap: int | None = None

    @property
    def is_stream(self) -> bool:
        return self.request.is_stream

    @property
    def max_tokens(self) -> int | None:
        """The client's output limit, else the model's configured default, else the one
        admission reserved (None: no limit goes upstream)."""
        limit = self.request.max_tokens
        if isinstance(limit, int):
            return limit
        return self.model.max_tokens or self.output_cap

    def prompt_estimate(self) -> int:
        """The prompts and, after each, the `suffix` (fill-in-the-middle: input too)."""
        req = self.request
        tokens = estimate_input_tokens(req.prompt)
        if isinstance(req.suffix, str):
            tokens += estimate_text_tokens(req.suffix) * req.prompts
        return tokens

    @property
    def unseen_output(self) -> bool:
        return self.request.unseen_choices

    @property
    def asked_tier(self) -> str:
        tier = self.request.service_tier
        return tier if isinstance(tier, str) else ""

    def cap_output(self, default: int) -> None:
        if self.max_tokens is None:
            self.output_cap = default

    def output_bound(self, default: int) -> int:
        limit = self.max_tokens
        return (default if limit is None else limit) * self.request.choices

    def output_ceiling(self) -> int:
        limit = self.max_tokens
        return UNBOUNDED if limit is None else limit * self.request.choices


@runtime_checkable
class Embedder(Protocol):
    """An upstream that turns text (or token ids) into vectors."""

    async def embeddings(self, call: EmbeddingCall) -> ChatReply:
        """The OpenAI embeddings `list` for the call's request, in the encoding it asked for.

        Raises:
            UpstreamError: the upstream failed or refused the request.
            InvalidRequest: the request asks for what this upstream cannot do (token ids).
        """
        ...


@runtime_checkable
class CompletionsPassThrough(Protocol):
    """An upstream that serves OpenAI's legacy `/v1/completions` itself."""

    async def completion(self, call: CompletionCall) -> ChatReply:
        """Send a non-streaming request; the reply is the upstream's `text_completion`.

        Raises:
            UpstreamError: the upstream failed, timed out or refused the request.
        """
        ...

    def stream_completion(self, call: CompletionCall) -> AsyncGenerator[list[bytes], None]:
        """Yield non-empty batches of `text_completion` chunk payloads (as `stream_chat`).

        Raises:
            UpstreamError: before or during the stream.
        """
        ...


@runtime_checkable
class MessagesPassThrough(Protocol):
    """An upstream that speaks Anthropic's Messages API: requests are relayed untranslated.

    Each method takes the client's top-level fields as raw JSON (sent on with `model` set to
    `call.upstream_model`) and the client's `anthropic-version`/`anthropic-beta` headers.
    Usage is read in chat terms into `call.usage` (cache writes into
    `call.cache_write_tokens`), so accounting is the same as for chat requests.
    """

    async def messages(
        self, call: ChatCall, body: dict[str, msgspec.Raw], headers: Mapping[str, str]
    ) -> ChatReply:
        """Send a non-streaming request; the reply's body is the upstream `message`.

        Raises:
            UpstreamError: the upstream failed, timed out or refused the request.
        """
        ...

    def stream_messages(
        self, call: ChatCall, body: dict[str, msgspec.Raw], headers: Mapping[str, str]
    ) -> AsyncGenerator[list[bytes], None]:
        """Yield non-empty batches of framed SSE events (`event:` and `data:` lines).

        Raises:
            UpstreamError: before or during the stream, including an `error` event and a
                stream that ends before `message_stop`.
        """
        ...

    async def count_tokens(
        self, call: ChatCall, body: dict[str, msgspec.Raw], headers: Mapping[str, str]
    ) -> bytes:
        """The upstream's `{"input_tokens": N}` for the request.

        Raises:
            UpstreamError: the upstream failed or refused the request.
        """
        ...
