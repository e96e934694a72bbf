"""The narrow interface every upstream provider implements, and the call it receives.

A provider has two methods: `chat()` returns a whole OpenAI `chat.completion` as JSON bytes,
`stream_chat()` yields batches of OpenAI `chat.completion.chunk` JSON payloads (no SSE
framing, no `[DONE]`): a batch is what one upstream read produced, so a burst of events
reaches the client in one write. Both speak bytes, not structs, so the OpenAI pass-through
relays upstream bytes without re-encoding; translating providers encode their structs once.
Usage seen on the way is written into the `ChatCall` so the handler can account for it, even
when a stream is cut.
Errors are raised as `gateway.errors.UpstreamError` subclasses.

Optional capabilities are separate Protocols, checked with `isinstance`: `ResponsesPassThrough`
is an upstream that serves the Responses API itself, so `/v1/responses` relays to it untranslated.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import msgspec

from gateway.schemas.chat import ChatCompletionRequest
from gateway.schemas.codec import RAW_OBJECT, raw_fields
from gateway.schemas.common import Usage
from gateway.settings import ModelConfig, ProviderConfig

__all__ = ["ChatCall", "ChatReply", "Provider", "ResponsesPassThrough"]


@dataclass(slots=True)
class ChatCall:
    """One chat request on its way to one upstream target.

    Attributes:
        request: the validated client request.
        body: the client's JSON body when `request` is the client's own chat request (None
            when it was translated, e.g. from the Responses API).
        model: the model config the request resolved to (prices, defaults, reasoning flag).
        upstream_model: the model name to send upstream.
        api_key: the upstream account to use, chosen by the router (None for keyless servers).
        request_id: the gateway's request id, forwarded upstream as `x-request-id`.
        usage: filled by the provider when the upstream reports usage.
        chunks: stream chunks with content seen so far (a completion-token estimate when the
            upstream never reports usage, e.g. because the client hung up).
        first_byte_at: monotonic time the first upstream event arrived (for ttft).
        output_cap: the output limit admission reserved for a request that sets none (keys
            with a budget or tokens per minute); providers send it upstream as its limit.
        cache_write_tokens: prompt tokens the upstream wrote to its cache (Anthropic), which
            OpenAI's usage has no field for.
    """

    request: ChatCompletionRequest
    body: bytes | None
    model: ModelConfig
    upstream_model: str
    api_key: str | None = None
    request_id: str = ""
    usage: Usage | None = None
    chunks: int = 0
    first_byte_at: float | None = None
    output_cap: int | None = None
    cache_write_tokens: int = 0
    started_at: float = field(default_factory=time.monotonic)
    _raw: dict[str, msgspec.Raw] | None = None

    @property
    def raw(self) -> dict[str, msgspec.Raw]:
        """The request's top-level JSON fields as raw bytes, so pass-through can forward the
        fields the typed request does not model. Made on first use: only providers that
        forward the body need it, and the body is decoded at most once more."""
        if self._raw is None:
            self._raw = RAW_OBJECT.decode(self.body) if self.body else raw_fields(self.request)
        return self._raw

    @property
    def max_tokens(self) -> int | None:
        """The client's output limit, else the model's configured default, else the one
        admission reserved."""
        return self.request.token_limit or self.model.max_tokens or self.output_cap


@dataclass(slots=True, frozen=True)
class ChatReply:
    body: bytes  # an OpenAI chat.completion object (a `response` from pass-through), JSON
    usage: Usage | None


class Provider(Protocol):
    """An upstream that answers OpenAI chat requests. Implementations live one per module."""

    @property
    def config(self) -> ProviderConfig:
        """Its settings (read-only here, so each adapter may hold its own config type)."""
        ...

    async def chat(self, call: ChatCall) -> ChatReply:
        """Send a non-streaming request and return the whole completion.

        Raises:
            UpstreamError: the upstream failed, timed out or refused the request.
        """
        ...

    def stream_chat(self, call: ChatCall) -> AsyncGenerator[list[bytes], None]:
        """Yield non-empty batches of chunk payloads as they arrive.

        The first `__anext__()` performs the request, so an upstream that fails before its
        first event raises there and the handler can still answer with a proper status.

        Raises:
            UpstreamError: before or during the stream.
        """
        ...


@runtime_checkable
class ResponsesPassThrough(Protocol):
    """An upstream that serves `POST /v1/responses` itself (OpenAI, some compatible servers).

    Both methods take the client's top-level fields as raw JSON and send them on with `model`
    set to `call.upstream_model`; usage is read from the `response`'s `usage` into `call.usage`
    in chat terms, so accounting is the same as for chat requests. (Methods only, so that
    `issubclass()` can answer for a provider class once.)
    """

    async def responses(self, call: ChatCall, body: dict[str, msgspec.Raw]) -> ChatReply:
        """Send a non-streaming request; the reply's body is the upstream `response` object.

        Raises:
            UpstreamError: the upstream failed, timed out or refused the request.
        """
        ...

    def stream_responses(
        self, call: ChatCall, body: dict[str, msgspec.Raw]
    ) -> AsyncGenerator[list[bytes], None]:
        """Yield non-empty batches of complete SSE events (`event:` and `data:` lines).

        As with `stream_chat`, the first `__anext__()` performs the request.

        Raises:
            UpstreamError: before or during the stream, including an upstream `error` event
                and a stream that ends before its terminal `response.*` event.
        """
        ...
