"""OpenAI and every OpenAI-compatible server (vLLM, Ollama, OpenRouter, DeepSeek...): pass-through.

The client's body is forwarded field for field (unknown fields included) with these edits:
`model` becomes the upstream name, the model's default `max_tokens` (or the limit admission
reserved) fills a missing limit, tool-call ids longer than OpenAI's 40 characters are
shortened (`_call_ids`), and streams always ask for `include_usage` so usage can be accounted;
that extra usage chunk is dropped again when the client did not ask for it. Upstream bytes go
back untouched; answers are checked to be what they claim before they are relayed
(`_answers`). A stream the chat or completions handler relays as it is (`Call.sse_out`) is
passed through a read at a time: a read of plain `data: {...}` events with nothing to account
or strip goes out as the upstream's bytes, checked in one decode; any other read is split into
its events and each is looked at. Embeddings (`/embeddings`) and legacy completions
(`/completions`, streams as for chat) pass through the same way.

Upstreams with `responses_api = true` also get `/v1/responses` requests as they are
(`OpenAIResponsesProvider`, which relays them with `gateway.providers.openai_responses`).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator

import aiohttp
import msgspec
import structlog

from gateway.errors import UpstreamError
from gateway.providers._answers import completion_usage, served_at, text_completion_usage
from gateway.providers._call_ids import short_ids
from gateway.providers._embeddings import answer_limit, relayed_embeddings
from gateway.providers._errors import stream_error
from gateway.providers._http import Dialect, UpstreamClient, bearer
from gateway.providers._sse import DONE_EVENT, Framed, Last, data_event
from gateway.providers._stream_check import StreamCheck
from gateway.providers.base import Call, ChatCall, ChatReply
from gateway.providers.capabilities import CompletionCall, EmbeddingCall
from gateway.providers.openai_responses import ResponsesRelay
from gateway.schemas.codec import encode, present, raw_object
from gateway.schemas.common import Usage
from gateway.settings import AzureConfig, OpenAIConfig

__all__ = ["OpenAIProvider", "OpenAIResponsesProvider"]

log = structlog.get_logger(__name__)

_TRUE = msgspec.Raw(b"true")


class _ChunkUsageView(msgspec.Struct):
    """Only what we read from an upstream chunk with usage; the rest is skipped unparsed."""

    usage: Usage | None = None
    choices: list[msgspec.Raw] = []
    service_tier: object = None  # (the tier it was served at: `_answers.served_at`)


_CHUNK_USAGE = msgspec.json.Decoder(_ChunkUsageView)


class _TierView(msgspec.Struct):
    service_tier: object = None


_TIER = msgspec.json.Decoder(_TierView)


def _first_tier(call: Call, data: bytes) -> None:
    """The processing tier a stream's first chunk says it is served at (`served_at`): what a
    stream cut before its usage chunk is charged at."""
    with contextlib.suppress(msgspec.MsgspecError, RecursionError):  # (checked on the way)
        served_at(call, _TIER.decode(data).service_tier)


class OpenAIProvider:
    """Adapter for `type = "openai"` providers (and, with its own URLs and key header, Azure)."""

    dialect = Dialect(auth=bearer)

    def __init__(self, config: OpenAIConfig | AzureConfig, session: aiohttp.ClientSession) -> None:
        self.config = config
        self._http = UpstreamClient(config, session, self.dialect)
        self.stats = self._http.stats  # GET /admin/stats
        self.pool = self._http.pool  # shut when the server stops

    def url(self, call: Call, operation: str) -> str:
        """Where an operation (`chat/completions`, `embeddings`, `completions`) goes (Azure:
        per deployment)."""
        return f"{self.config.url}/{operation}"

    def _body(self, call: ChatCall, *, stream: bool) -> bytes:
        fields = _fields(call)
        if _may_hold_call_ids(call.body):
            messages = short_ids(call.request, fields["messages"])
            if messages is not None:  # ids minted elsewhere, too long for OpenAI
                fields["messages"] = messages
        if call.model.reasoning and "max_tokens" in fields:
            # Reasoning models reject max_tokens; max_completion_tokens means the same there.
            limit = fields.pop("max_tokens")
            fields.setdefault("max_completion_tokens", limit)
        if call.request.token_limit is None and call.max_tokens is not None:
            key = "max_completion_tokens" if call.model.reasoning else "max_tokens"
            fields[key] = msgspec.Raw(encode(call.max_tokens))
        if stream:
            _stream_with_usage(fields, call.raw, call.request.wants_usage)
        return encode(fields)

    async def chat(self, call: ChatCall) -> ChatReply:
        url = self.url(call, "chat/completions")
        body = await self._http.post(url, self._body(call, stream=False), call)
        call.usage = completion_usage(self.config.name, body, call)  # raises unless a completion
        return ChatReply(body=body, usage=call.usage)

    def stream_chat(self, call: ChatCall) -> AsyncGenerator[list[bytes], None]:
        url = self.url(call, "chat/completions")
        body = self._body(call, stream=True)
        return self._stream(url, body, call, keep_usage_chunk=call.request.wants_usage)

    async def embeddings(self, call: EmbeddingCall) -> ChatReply:
        body = encode(_fields(call))
        limit = answer_limit(call, self.config.max_response_bytes)
        answer = await self._http.post(self.url(call, "embeddings"), body, call, limit=limit)
        answer = await relayed_embeddings(self.config.name, answer, call)  # sets call.usage
        return ChatReply(body=answer, usage=call.usage)

    async def completion(self, call: CompletionCall) -> ChatReply:
        body = encode(_completion_fields(call))
        answer = await self._http.post(self.url(call, "completions"), body, call)
        call.usage = text_completion_usage(self.config.name, answer, call)
        return ChatReply(body=answer, usage=call.usage)

    def stream_completion(self, call: CompletionCall) -> AsyncGenerator[list[bytes], None]:
        fields = _completion_fields(call)
        _stream_with_usage(fields, call.raw, call.request.wants_usage)
        url = self.url(call, "completions")
        return self._stream(url, encode(fields), call, keep_usage_chunk=call.request.wants_usage)

    def _stream(
        self, url: str, body: bytes, call: Call, *, keep_usage_chunk: bool
    ) -> AsyncGenerator[list[bytes], None]:
        # The upstream client's own generator, each batch checked and edited by `_ChatRelay`
        # inside it: one generator per stream, not one more of ours around it.
        relay = _ChatRelay(self, call, keep_usage_chunk)
        return self._http.stream(url, body, call, passthrough=call.sse_out, relay=relay)

    def _relay(
        self, call: Call, batch: list[bytes], keep_usage_chunk: bool, check: StreamCheck
    ) -> tuple[list[bytes], bool, UpstreamError | None]:
        """Split a batch of payloads into (events for the client, saw [DONE], upstream error
        event); a `Framed` batch goes to `_relay_run` instead (`_ChatRelay.each`)."""
        out: list[bytes] = []
        for data in batch:
            if data.startswith(b"[DONE]"):  # (as the SDKs read it: `[DONE] ` ends a stream too)
                return out, True, None
            try:
                if check.see(data) and self._keep(call, data, keep_usage_chunk):
                    out.append(data)
            except UpstreamError as exc:
                return out, True, exc
        return out, False, None

    def _relay_run(
        self, call: Call, batch: list[bytes], keep_usage_chunk: bool, check: StreamCheck
    ) -> tuple[list[bytes], bool, UpstreamError | None]:
        """`_relay` for a read of whole events (a `Framed` batch of one run): its leading
        plain chunks go out as the upstream's bytes; what follows them (the usage chunk, an
        error event) is looked at event by event, and a final `[DONE]` ends the stream."""
        run = batch[0]
        done = run.endswith(DONE_EVENT) and (
            len(run) == len(DONE_EVENT) or run[-len(DONE_EVENT) - 2 : -len(DONE_EVENT)] == b"\n\n"
        )
        if done:
            run = run[: -len(DONE_EVENT)]
            if not run:
                return [], True, None
        if call.chunks == 0 and not call.service_tier and run.startswith(b"data: "):
            line = run[6 : run.find(b"\n")]  # (the first event: `_keep` does not see it)
            if line.find(b'"service_tier"') >= 0:
                _first_tier(call, line)
        plain, end = (0, 0) if self._looks_at(run) else check.see_run(run)
        call.chunks += plain
        if end == len(run):
            return (Framed((run,)) if done else batch), done, None  # as the upstream sent it
        rest = run[end:]
        if (
            rest.startswith(b"data: ")
            and rest.find(b"\n") == len(rest) - 2
            and rest.find(b"\r") < 0
        ):
            # One event of one line (an upstream's usage chunk, mostly): its payload as the
            # decoder would read it, without a decoder made for it.
            payloads = [rest[6:-2]] if len(rest) > 8 else []
        else:
            payloads = Framed((rest,)).payloads()
        out, ended, error = self._relay(call, payloads, keep_usage_chunk, check)
        if end:
            out = Framed((run[:end], *[data_event(data) for data in out]))
        return out, done or ended, error

    def _looks_at(self, events: bytes) -> bool:
        """Whether `_keep` must see these events one by one although they are plain chunks
        (a dialect's own kinds of event: Azure's prompt filter results)."""
        return False

    def _keep(self, call: Call, data: bytes, keep_usage_chunk: bool) -> bool:
        """Account for one upstream event; False for events the client must not get.

        An error event ends the stream whatever else it holds; a usage chunk is one whose own
        `usage` is an object (not null, not one nested in a choice or in an error), as
        `StreamCheck.see_run` reads a chunk, so a read gives what its events one by one give.
        """
        if call.chunks == 0 and not call.service_tier and data.find(b'"service_tier"') >= 0:
            _first_tier(call, data)  # (each chunk says it: a cut stream keeps the first's)
        # (`find` for `in`: see `_sse`)
        if data.startswith(b'{"error"') or data.find(b'"error":', 0, 16) >= 0:
            error = stream_error(self.config.name, data)
            if error is not None:
                raise error
        if data.find(b'"usage"') >= 0 and (
            data.find(b'"usage":null') < 0 or data.find(b'"usage":{') >= 0
        ):
            # `"usage"` with any spacing; not decoded for vLLM's `"usage":null` on every chunk
            try:
                view = _CHUNK_USAGE.decode(data)
            except msgspec.ValidationError:
                # Unreadable usage: relay the event, let the usage row be estimated.
                log.warning("upstream_usage_unreadable", provider=self.config.name)
                if data.find(b'"choices":[]') >= 0 or data.find(b'"choices": []') >= 0:
                    return keep_usage_chunk
            except (msgspec.DecodeError, RecursionError):
                raise UpstreamError(
                    f"The upstream provider '{self.config.name}' sent a malformed stream event."
                ) from None
            else:
                if view.usage is not None:
                    call.usage = view.usage
                    call.usage_chunks = call.chunks
                    served_at(call, view.service_tier)
                    if not view.choices:
                        return keep_usage_chunk
        call.chunks += 1
        return True


# The largest body scanned for tool-call ids: past it, the walk over the decoded messages
# (`short_ids`) is the cheaper look (a search for the two bytes `\u` takes about 0.8 ns a
# byte: 94 us over a prompt of 118 KB, where its few messages are walked in a microsecond).
_SCAN_MOST = 4096


def _may_hold_call_ids(body: bytes | None) -> bool:
    """Whether the request may carry a tool-call id: not when the client's own JSON has no
    `"tool_call` (the start of both `tool_call_id` and `tool_calls`) and no escape that could
    spell one. Two scans of a short body, instead of a walk over its messages (most requests);
    `find`, not `in`: on Python 3.11 `in` on bytes first tries its operand as an integer,
    raising and dropping a TypeError each time (about 2,700 instructions)."""
    return (
        body is None
        or len(body) > _SCAN_MOST
        or body.find(b'"tool_call') >= 0
        or body.find(b"\\u") >= 0
    )


class _ChatRelay:
    """A chat or completions stream as the upstream client relays it (`_http.Relay`): each
    batch through the provider's `_relay`, and, closed without `[DONE]`, the stream check's
    verdict on whether the answer had finished."""

    __slots__ = ("_call", "_check", "_keep_usage_chunk", "_provider")

    def __init__(self, provider: OpenAIProvider, call: Call, keep_usage_chunk: bool) -> None:
        self._provider = provider
        self._call = call
        self._keep_usage_chunk = keep_usage_chunk
        # (chat and completions: `n` choices, for each prompt of a completion)
        choices = getattr(getattr(call, "request", None), "streamed_choices", 1)
        self._check = StreamCheck(provider.config.name, choices)

    def each(self, batch: list[bytes]) -> tuple[list[bytes], bool, UpstreamError | None]:
        if type(batch) is Framed:
            out, done, error = self._provider._relay_run(
                self._call, batch, self._keep_usage_chunk, self._check
            )
            if done and error is None and type(out) is Framed:
                out = Last(out)  # the client's response ends with it, in one write
            return out, done, error
        return self._provider._relay(self._call, batch, self._keep_usage_chunk, self._check)

    def end(self) -> None:
        self._check.end()  # an error unless the answer had finished


def _fields(call: Call) -> dict[str, msgspec.Raw]:
    """The client's fields, to be sent with `model` set to the upstream model."""
    fields = dict(call.raw)
    fields["model"] = msgspec.Raw(encode(call.upstream_model))
    return fields


def _completion_fields(call: CompletionCall) -> dict[str, msgspec.Raw]:
    """The client's fields; without a limit of its own, the model's `max_tokens` or the one
    admission reserved (`CompletionCall.cap_output`) is sent as its `max_tokens`."""
    fields = _fields(call)
    limit = call.max_tokens
    if not isinstance(call.request.max_tokens, int) and limit is not None:
        fields["max_tokens"] = msgspec.Raw(encode(limit))
    return fields


def _stream_with_usage(
    fields: dict[str, msgspec.Raw], raw: dict[str, msgspec.Raw], wants_usage: bool
) -> None:
    """Make `fields` a stream that reports usage, keeping the client's other stream options."""
    fields["stream"] = _TRUE
    if not wants_usage:
        options = raw.get("stream_options")
        extra = raw_object(options) if present(options) else {}
        extra["include_usage"] = _TRUE
        fields["stream_options"] = msgspec.Raw(encode(extra))


class OpenAIResponsesProvider(OpenAIProvider):
    """An OpenAI-compatible upstream that also serves `/v1/responses` (`responses_api = true`):
    Responses API requests are relayed to it untranslated (see `openai_responses`)."""

    def __init__(self, config: OpenAIConfig, session: aiohttp.ClientSession) -> None:
        super().__init__(config, session)
        self._responses = ResponsesRelay(self._http, f"{config.url}/responses")

    async def responses(self, call: ChatCall, body: dict[str, msgspec.Raw]) -> ChatReply:
        return await self._responses.create(call, body)

    def stream_responses(
        self, call: ChatCall, body: dict[str, msgspec.Raw]
    ) -> AsyncGenerator[list[bytes], None]:
        return self._responses.stream(call, body)
