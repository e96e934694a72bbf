"""Anthropic's Messages API behind the OpenAI chat interface (`type = "anthropic"`).

`request` translates what clients send, `response` what Anthropic answers (whole or streamed),
`wire` holds the Messages API structs; this module is the adapter that moves the bytes.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator

import aiohttp
import msgspec

from gateway.errors import UpstreamError
from gateway.providers._http import UpstreamClient
from gateway.providers.anthropic.request import JSON_TOOL, to_anthropic, tool_id
from gateway.providers.anthropic.response import AnthropicStream, from_anthropic
from gateway.providers.anthropic.wire import API_VERSION, RESPONSE_DECODER, AnthropicResponse
from gateway.providers.base import ChatCall, ChatReply
from gateway.settings import ProviderConfig

__all__ = [
    "JSON_TOOL",
    "AnthropicProvider",
    "AnthropicResponse",
    "AnthropicStream",
    "from_anthropic",
    "to_anthropic",
    "tool_id",
]

_ENCODER = msgspec.json.Encoder()


class AnthropicProvider:
    """Adapter for `type = "anthropic"` providers."""

    def __init__(self, config: ProviderConfig, session: aiohttp.ClientSession) -> None:
        self.config = config
        self._http = UpstreamClient(config, session)
        self._url = f"{config.url}/v1/messages"
        self._headers: dict[str | None, dict[str, str]] = {}

    def _headers_for(self, call: ChatCall) -> dict[str, str]:
        headers = self._headers.get(call.api_key)
        if headers is None:
            headers = {
                "content-type": "application/json",
                "anthropic-version": API_VERSION,
                **self.config.headers,
            }
            if call.api_key:
                headers["x-api-key"] = call.api_key
            self._headers[call.api_key] = headers
        return headers

    def _body(self, call: ChatCall, *, stream: bool) -> tuple[bytes, bool]:
        request, json_tool = to_anthropic(call, self.config.default_max_tokens, stream=stream)
        return _ENCODER.encode(request), json_tool

    async def chat(self, call: ChatCall) -> ChatReply:
        body, json_tool = self._body(call, stream=False)
        data = await self._http.post(self._url, body, self._headers_for(call))
        call.first_byte_at = call.first_byte_at or time.monotonic()
        try:
            resp = RESPONSE_DECODER.decode(data)
        except msgspec.MsgspecError:
            raise UpstreamError(
                f"The upstream provider '{self.config.name}' returned a malformed message."
            ) from None
        out, call.usage = from_anthropic(resp, json_tool)
        return ChatReply(body=out, usage=call.usage)

    async def stream_chat(self, call: ChatCall) -> AsyncGenerator[list[bytes], None]:
        body, json_tool = self._body(call, stream=True)
        state = AnthropicStream(call, self.config.name, json_tool)
        # Chunks are held back until the answer has content: Anthropic reports overload as
        # an `error` event right after `message_start`, and with nothing sent yet that error
        # can still be a proper HTTP status (and a retry) instead of a broken stream.
        out: list[bytes] = []
        async for batch in self._http.stream(self._url, body, self._headers_for(call)):
            if call.first_byte_at is None:
                call.first_byte_at = time.monotonic()
            try:
                for data in batch:
                    out.extend(state.feed(data))
                    if state.done:
                        break
            except UpstreamError:
                if out and call.chunks:
                    yield out  # what arrived before the error still reaches the client
                raise
            if out and (call.chunks or state.done):
                yield out
                out = []
            if state.done:
                return
        raise UpstreamError(
            f"The upstream provider '{self.config.name}' ended the stream before it was complete."
        )
