"""Anthropic's Messages API behind the OpenAI chat interface (`type = "anthropic"`).

`request` translates what clients send, `response` what Anthropic answers (whole or streamed),
`wire` holds the Messages API structs; this module is the adapter that moves the bytes.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncGenerator

import aiohttp

from gateway.providers._http import UpstreamClient
from gateway.providers._translate import translated_stream
from gateway.providers.anthropic.request import JsonTool, to_anthropic
from gateway.providers.anthropic.response import AnthropicStream, from_anthropic
from gateway.providers.anthropic.wire import API_VERSION, RESPONSE_DECODER
from gateway.providers.base import ChatCall, ChatReply
from gateway.schemas.codec import encode
from gateway.settings import ProviderConfig

__all__ = ["AnthropicProvider"]


class AnthropicProvider:
    """Adapter for `type = "anthropic"` providers."""

    def __init__(self, config: ProviderConfig, session: aiohttp.ClientSession) -> None:
        self.config = config
        self._http = UpstreamClient(
            config, session, auth_header="x-api-key", headers={"anthropic-version": API_VERSION}
        )
        self._url = f"{config.url}/v1/messages"

    def _body(self, call: ChatCall, *, stream: bool) -> tuple[bytes, JsonTool | None]:
        request, json_tool = to_anthropic(call, self.config.default_max_tokens, stream=stream)
        return encode(request), json_tool

    async def chat(self, call: ChatCall) -> ChatReply:
        body, json_tool = self._body(call, stream=False)
        data = await self._http.post(self._url, body, self._http.headers(call.api_key))
        call.first_byte_at = call.first_byte_at or time.monotonic()
        resp = self._http.decode(RESPONSE_DECODER, data)
        out, call.usage = from_anthropic(resp, json_tool)
        return ChatReply(body=out, usage=call.usage)

    async def stream_chat(self, call: ChatCall) -> AsyncGenerator[list[bytes], None]:
        body, json_tool = self._body(call, stream=True)
        state = AnthropicStream(call, self.config.name, json_tool)
        events = self._http.stream(self._url, body, self._http.headers(call.api_key))
        async with contextlib.aclosing(translated_stream(call, events, state)) as chunks:
            async for batch in chunks:
                yield batch
