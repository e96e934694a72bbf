"""OpenAI and every OpenAI-compatible server (vLLM, Ollama, OpenRouter, DeepSeek...): pass-through.

The client's body is forwarded field for field (unknown fields included) with three edits:
`model` becomes the upstream name, the model's default `max_tokens` fills a missing limit,
and streams always ask for `include_usage` so usage can be accounted; that extra usage chunk
is dropped again when the client did not ask for it. Upstream bytes go back untouched.

Upstreams with `responses_api = true` also get `/v1/responses` requests as they are: see
`gateway.providers.openai_responses`, whose methods this adapter mixes in.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator
from contextlib import AbstractAsyncContextManager

import aiohttp
import msgspec
import structlog

from gateway.errors import UpstreamError
from gateway.providers._http import (
    error_from_status,
    iter_sse_batches,
    read_usage,
    stream_error,
    stream_timeout,
    unary_timeout,
    upstream_failure,
)
from gateway.providers.base import ChatCall, ChatReply
from gateway.providers.openai_responses import ResponsesMixin
from gateway.schemas.codec import RAW_OBJECT, encode, present
from gateway.schemas.common import Usage
from gateway.settings import ProviderConfig

__all__ = ["OpenAIProvider"]

log = structlog.get_logger(__name__)

_TRUE = msgspec.Raw(b"true")


class _UsageView(msgspec.Struct):
    """Only what we read from an upstream completion; the rest is skipped unparsed."""

    usage: Usage | None = None


class _ChunkUsageView(_UsageView):
    choices: list[msgspec.Raw] = []


_USAGE = msgspec.json.Decoder(_UsageView)
_CHUNK_USAGE = msgspec.json.Decoder(_ChunkUsageView)


class OpenAIProvider(ResponsesMixin):
    """Adapter for `type = "openai"` providers (and their Responses pass-through)."""

    def __init__(self, config: ProviderConfig, session: aiohttp.ClientSession) -> None:
        self.config = config
        self._session = session
        self._url = f"{config.url}/chat/completions"
        self._responses_url = f"{config.url}/responses"
        self._unary_timeout = unary_timeout(config)
        self._stream_timeout = stream_timeout(config)
        # Per upstream account: the headers every request to it carries.
        self._base_headers: dict[str | None, dict[str, str]] = {}

    def _headers(self, call: ChatCall) -> dict[str, str]:
        base = self._base_headers.get(call.api_key)
        if base is None:
            base = {"Content-Type": "application/json", **self.config.headers}
            if call.api_key:
                base["Authorization"] = f"Bearer {call.api_key}"
            self._base_headers[call.api_key] = base
        return {**base, "X-Request-ID": call.request_id} if call.request_id else base

    def _body(self, call: ChatCall, *, stream: bool) -> bytes:
        fields = dict(call.raw)
        fields["model"] = msgspec.Raw(encode(call.upstream_model))
        if call.model.reasoning and "max_tokens" in fields:
            # Reasoning models reject max_tokens; max_completion_tokens means the same there.
            limit = fields.pop("max_tokens")
            fields.setdefault("max_completion_tokens", limit)
        if call.request.token_limit is None and call.model.max_tokens is not None:
            key = "max_completion_tokens" if call.model.reasoning else "max_tokens"
            fields[key] = msgspec.Raw(encode(call.model.max_tokens))
        if stream:
            fields["stream"] = _TRUE
            if not call.request.wants_usage:
                # Ask for usage, keeping any other stream option the client (or server) uses.
                options = call.raw.get("stream_options")
                extra = RAW_OBJECT.decode(options) if present(options) else {}
                extra["include_usage"] = _TRUE
                fields["stream_options"] = msgspec.Raw(encode(extra))
        return encode(fields)

    def _post(
        self, call: ChatCall, *, stream: bool, body: bytes | None = None, url: str | None = None
    ) -> AbstractAsyncContextManager[aiohttp.ClientResponse]:
        return self._session.post(
            url or self._url,
            data=body if body is not None else self._body(call, stream=stream),
            headers=self._headers(call),
            timeout=self._stream_timeout if stream else self._unary_timeout,
        )

    def _failed(self, resp: aiohttp.ClientResponse, body: bytes) -> UpstreamError:
        return error_from_status(
            self.config.name, resp.status, body, resp.headers.get("retry-after")
        )

    async def _send(
        self, call: ChatCall, body: bytes | None = None, url: str | None = None
    ) -> bytes:
        """POST a non-streaming request and return the upstream's 2xx answer."""
        try:
            async with self._post(call, stream=False, body=body, url=url) as resp:
                answer = await resp.read()
                if resp.status >= 400:
                    raise self._failed(resp, answer)
                # Only an answer counts: a refused call must not be charged as if it ran.
                call.first_byte_at = call.first_byte_at or time.monotonic()
                return answer
        except UpstreamError:
            raise
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise upstream_failure(self.config.name, exc) from exc

    async def chat(self, call: ChatCall) -> ChatReply:
        body = await self._send(call)
        view = read_usage(self.config.name, _USAGE, body, "completion")
        if view is not None:
            call.usage = view.usage
        return ChatReply(body=body, usage=call.usage)

    async def stream_chat(self, call: ChatCall) -> AsyncGenerator[list[bytes], None]:
        keep_usage_chunk = call.request.wants_usage
        try:
            async with self._post(call, stream=True) as resp:
                if resp.status >= 400:
                    raise self._failed(resp, await resp.read())
                async for batch in iter_sse_batches(resp):
                    if call.first_byte_at is None:
                        call.first_byte_at = time.monotonic()
                    out, done, error = self._relay(call, batch, keep_usage_chunk)
                    if out:
                        yield out  # chunks before an error event still reach the client
                    if error is not None:
                        raise error
                    if done:
                        return
        except UpstreamError:
            raise
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise upstream_failure(self.config.name, exc) from exc

    def _relay(
        self, call: ChatCall, batch: list[bytes], keep_usage_chunk: bool
    ) -> tuple[list[bytes], bool, UpstreamError | None]:
        """Split one batch into (events for the client, saw [DONE], upstream error event)."""
        out: list[bytes] = []
        for data in batch:
            if data == b"[DONE]":
                return out, True, None
            try:
                if self._keep(call, data, keep_usage_chunk):
                    out.append(data)
            except UpstreamError as exc:
                return out, True, exc
        return out, False, None

    def _keep(self, call: ChatCall, data: bytes, keep_usage_chunk: bool) -> bool:
        """Account for one upstream event; False for events the client must not get."""
        if b'"usage":{' in data or b'"usage": {' in data:
            try:
                view = _CHUNK_USAGE.decode(data)
            except msgspec.ValidationError:
                # Unreadable usage: relay the event, let the usage row be estimated.
                log.warning("upstream_usage_unreadable", provider=self.config.name)
                usage_only = b'"choices":[]' in data or b'"choices": []' in data
            except msgspec.DecodeError:
                raise UpstreamError(
                    f"The upstream provider '{self.config.name}' sent a malformed stream event."
                ) from None
            else:
                call.usage = view.usage
                usage_only = not view.choices
            if usage_only:
                return keep_usage_chunk
        elif data.startswith(b'{"error"') or b'"error":' in data[:16]:
            error = stream_error(self.config.name, data)
            if error is not None:
                raise error
        call.chunks += 1
        return True
