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
is an upstream that serves the Responses API itself, so `/v1/responses` relays to it untranslated;
`OutputOnTop` is one that lets the model write more than the request's output limit.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator
from typing import Protocol, runtime_checkable

import msgspec

from gateway.prices import Usage as Counts
from gateway.schemas.chat import ChatCompletionRequest, InputAudioPart
from gateway.schemas.codec import may_spell, raw_fields, raw_object
from gateway.schemas.common import Usage
from gateway.settings import ModelConfig, ProviderConfig
from gateway.stored import Shown
from gateway.tokens import Estimate, ImageCost, estimate_prompt_tokens, prompt_size
from gateway.tool_fees import ServerTools

__all__ = [
    "UNBOUNDED",
    "Call",
    "ChatCall",
    "ChatReply",
    "OutputOnTop",
    "Provider",
    "ResponsesPassThrough",
    "has_capability",
]

# An output ceiling for a request that sent no limit: above any count an upstream is
# believed (2**40).
UNBOUNDED = 2**62


class Call(msgspec.Struct, kw_only=True):
    """One request on its way to one upstream target, whatever its endpoint. (A Struct, not
    a dataclass: one is made per request, its fields set in C rather than by a Python
    `__init__`.)

    The pipeline and the failover loop read and reset these fields; the endpoint's call type
    (`ChatCall`, `EmbeddingCall`, `CompletionCall`) adds its request and says what it may use.

    Attributes:
        model: the model config the request resolved to (prices, defaults, reasoning flag).
        upstream_model: the model name to send upstream (set by the route being tried).
        api_key: the upstream account to use, chosen by the router (None for keyless servers).
        request_id: the gateway's request id, forwarded upstream as `x-request-id`.
        body: the client's JSON body, when the upstream may be sent its fields as they are.
        usage: filled by the provider when the upstream reports usage.
        cache_write_tokens: prompt tokens the upstream wrote to its prompt cache (Anthropic
            reports them; reads are `usage.prompt_tokens_details.cached_tokens`).
        chunks: stream chunks with content seen so far (a completion-token estimate when the
            upstream never reports usage, e.g. because the client hung up).
        usage_estimated: `usage` is partly the gateway's estimate: a stream cut before the
            upstream's final count, whose counts so far were kept (Gemini, Anthropic); the usage
            row is marked `estimated`. Set only as a stream is cut or broken, and cleared when
            its attempt failed before its first batch (`failover.attempt_each`).
        usage_chunks: `chunks` when an OpenAI-compatible stream's usage was last read: content
            after it (vLLM's usage on every chunk, a usage chunk sent first) makes it a count
            so far, should the stream not end (`pipeline._account`).
        web_searches: web searches the upstream's built-in tools made for it, billed a call
            each (`prices.Usage`).
        held_searches: the web searches admission holds beyond `web_searches` (a Responses or
            Messages server tool's limit), on the routes with capability `searches_on` (the
            pass-through that runs such tools: translated, the request is refused).
        service_tier: the processing tier the answer says it was served at (an
            OpenAI-compatible `service_tier`, Anthropic's `usage.speed` as `speed=<value>`:
            `_answers.served_at`), charged at its rates where the price list has them; ""
            when it said none.
        steps: input (uncached, cache reads, cache writes, of which kept an hour) and output
            tokens of sampling steps the upstream ran beyond the answer's own and bills
            beside its counts (Anthropic's `usage.iterations`: a server-side compaction, an
            advisor's sub-inference), charged at the model's rates within their own bounds
            (`usage_bounds.steps_charged`).
        server_tools: a Responses request's built-in tools that bill beyond tokens and
            searches (file search, code interpreter, image generation), and the calls of
            them its answer made (`tool_fees`); held and charged as `held_searches` are.
        first_byte_at: monotonic time the first upstream event arrived (for ttft).
        sse_out: the stream goes to the client as SSE events of the same payloads (chat and
            completions streams), so a provider may yield `_sse.Framed` batches of upstream
            events as they are; other endpoints translate the payloads, and get payloads.
    """

    model: ModelConfig
    upstream_model: str = ""
    api_key: str | None = None
    request_id: str = ""
    body: bytes | None = None
    usage: Usage | None = None
    cache_write_tokens: int = 0
    cache_write_1h_tokens: int = 0  # (of `cache_write_tokens`, those kept an hour: Anthropic)
    chunks: int = 0
    usage_estimated: bool = False
    usage_chunks: int = -1  # `chunks` when a stream's usage was last read (-1: not tracked)
    web_searches: int = 0
    held_searches: int = 0
    searches_on: type | None = None
    server_tools: ServerTools | None = None
    service_tier: str = ""
    steps: tuple[int, int, int, int, int] = (0, 0, 0, 0, 0)
    first_byte_at: float | None = None
    sse_out: bool = False
    started_at: float = msgspec.field(default_factory=time.monotonic)
    _raw: dict[str, msgspec.Raw] | None = None

    @property
    def raw(self) -> dict[str, msgspec.Raw]:
        """The request's top-level JSON fields as raw bytes, so pass-through can forward the
        fields the typed request does not model. Made on first use: only providers that
        forward the body need it, and the body is decoded at most once more."""
        if self._raw is None:
            self._raw = raw_object(self.body) if self.body else self._fields()
        return self._raw

    def _fields(self) -> dict[str, msgspec.Raw]:
        return {}

    @property
    def is_stream(self) -> bool:
        return False

    def prompt_estimate(self) -> int:
        """The prompt's tokens, estimated (for admission, and usage the upstream never told)."""
        return 0

    @property
    def unseen_output(self) -> bool:
        """Whether the upstream bills output its answer does not show (a legacy completion's
        `best_of` candidates): without a usage, the output limit is charged."""
        return False

    @property
    def asked_tier(self) -> str:
        """The processing tier the request asks for (OpenAI's `service_tier`, some billed at
        rates of their own), "" for none."""
        return ""

    def held(self, prompt: int, output: int) -> Counts:
        """What admission prices a hold of `prompt` and `output` tokens as: text, unless the
        request asks for more costly kinds (`ChatCall.held`)."""
        return Counts(prompt, output)

    def prompt_size(self, image_cost: ImageCost) -> Estimate:
        """The prompt's likely tokens and the most it can be (a token is at least a byte of
        the client's JSON); `image_cost` prices an image on the upstreams at hand."""
        likely = self.prompt_estimate()
        return Estimate(likely, max(likely, len(self.body or b"")))

    def output_bound(self, default: int) -> int:
        """The most output tokens the request may produce; `default` is the largest output
        limit of the providers it may be routed to, for requests that set none."""
        return 0

    def cap_output(self, default: int) -> None:
        """A request of a key with a budget or tokens per minute gets an output limit sent
        upstream when it sets none (so that `output_bound` holds); by default it has one."""

    def output_ceiling(self) -> int:
        """The most output tokens the upstream was asked for (the limit sent times the
        choices; `UNBOUNDED` when none was sent): what `usage_bounds` checks usage against."""
        return UNBOUNDED


class ChatCall(Call, kw_only=True):
    """One chat request on its way to one upstream target.

    Attributes:
        request: the validated client request.
        body: the client's JSON body when `request` is the client's own chat request (None
            when it was translated, e.g. from the Responses API).
        output_cap: the output limit admission reserved for a request that sets none (keys
            with a budget or tokens per minute); providers send it upstream as its limit.
        stored_prompt: the prompt an upstream stores for the request and bills it again (a
            Responses conversation it continues: `gateway.stored`), which it does not hold.
        response_id: the id of the response a Responses pass-through upstream answered with.
        shown: the other ids its answer held, of what the upstream stores (output items,
            containers, a conversation: `gateway.stored`).
        held_writes: the prompt-cache writes admission holds the prompt as ("5m", "1h": a
            Messages request that marks blocks `cache_control`; "": none).
        speed: a Messages request's `speed` (Anthropic's "fast" mode, billed at rates of its
            own on its pass-through: `asked_tier`); "" none.
    """

    request: ChatCompletionRequest
    output_cap: int | None = None
    stored_prompt: Estimate | None = None
    response_id: str | None = None
    shown: Shown | None = None  # (made by the first: chat requests have none)
    held_writes: str = ""
    speed: str = ""

    def _fields(self) -> dict[str, msgspec.Raw]:
        return raw_fields(self.request)

    def showing(self) -> Shown:
        """What the answer showed so far of what the upstream stores (`shown`, made at the
        first id)."""
        if self.shown is None:
            self.shown = Shown()
        return self.shown

    @property
    def is_stream(self) -> bool:
        return self.request.is_stream

    @property
    def max_tokens(self) -> int | None:
        """The client's output limit, else the model's configured default, else the one
        admission reserved."""
        return self.request.token_limit or self.model.max_tokens or self.output_cap

    def prompt_estimate(self) -> int:
        stored = self.stored_prompt
        tokens = estimate_prompt_tokens(self.request)
        return tokens if stored is None else tokens + stored.likely

    def prompt_size(self, image_cost: ImageCost) -> Estimate:
        stored = self.stored_prompt
        size = prompt_size(self.request, image_cost)
        return size if stored is None else size + stored

    @property
    def asked_tier(self) -> str:
        if self.speed:  # (Anthropic's fast mode: `prices.SPEED`)
            return f"speed={self.speed}"
        tier = self.request.service_tier
        return tier if isinstance(tier, str) else ""

    def held(self, prompt: int, output: int) -> Counts:
        """Audio asked for out (`modalities`) holds the whole output limit at the audio rate,
        anything else at the image rate (only image models have one above their text rate:
        Gemini's answer with images unasked); audio sent in, the whole prompt at the audio
        rate; `web_search_options` one search (a server tool's, `held_searches`, are added
        per route by `pipeline._charge`); a prompt marked for the cache at the cache-write
        rate."""
        req = self.request
        modalities = req.modalities
        audio_out = output if modalities and "audio" in modalities else 0
        writes = self.held_writes
        return Counts(
            prompt,
            output,
            cache_write=prompt if writes else 0,
            audio_input=prompt if _sends_audio(self.body, req) else 0,
            audio_output=audio_out,
            image_output=output - audio_out,
            web_searches=self.web_searches,
            cache_write_1h=prompt if writes == "1h" else 0,
        )

    def cap_output(self, default: int) -> None:
        if self.max_tokens is None:
            self.output_cap = default

    def output_bound(self, default: int) -> int:
        choices = self.request.n if isinstance(self.request.n, int) else 1
        return (self.request.largest_token_limit or self.max_tokens or default) * choices

    def output_ceiling(self) -> int:
        req = self.request
        limit, old = req.max_completion_tokens, req.max_tokens
        if isinstance(old, int) and not (isinstance(limit, int) and limit >= old):
            limit = old
        if not isinstance(limit, int):
            limit = self.model.max_tokens or self.output_cap
            if limit is None:
                return UNBOUNDED
        n = req.n
        return limit * n if isinstance(n, int) and n > 1 else limit


class ChatReply(msgspec.Struct, frozen=True):
    """A whole answer: its JSON body (a `chat.completion`, an embeddings `list`, a `response`
    or a `message` from a pass-through upstream) and the usage read from it. (A Struct: a
    frozen dataclass sets each field through `object.__setattr__`, on every answer.)"""

    body: bytes
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


@runtime_checkable
class OutputOnTop(Protocol):
    """An upstream that may be sent a larger output limit than the request's (Anthropic adds a
    reasoning model's thinking budget to it): admission holds that much more."""

    def output_on_top(self, call: ChatCall) -> int:
        """The tokens the upstream request adds to `call.output_bound` (0: none)."""
        ...


def has_capability(provider: object, capability: type) -> bool:
    """Whether `provider` implements the optional `capability` Protocol."""
    key = (type(provider), capability)
    found = _CAPABLE.get(key)
    if found is None:
        # Once per provider class: a protocol check costs far more than this lookup.
        found = _CAPABLE[key] = issubclass(key[0], capability)
    return found


_CAPABLE: dict[tuple[type, type], bool] = {}


def _sends_audio(body: bytes | None, req: ChatCompletionRequest) -> bool:
    """Whether a message of `req` holds an `input_audio` part: looked for only when the body
    may spell "audio", most requests in two searches."""
    if body is not None and not may_spell(body, b"audio"):
        return False
    return any(
        isinstance(part, InputAudioPart)
        for message in req.messages
        if isinstance(message.content, list)
        for part in message.content
    )
