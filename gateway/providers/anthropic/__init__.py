"""Anthropic's Messages API behind the OpenAI chat interface (`type = "anthropic"`).

`request` translates what clients send, `response` what Anthropic answers (whole or streamed),
`wire` holds the Messages API structs; this module is the adapter that moves the bytes. Clients
of the Messages API itself (`/v1/messages`) are relayed untranslated by `passthrough`.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, Mapping

import aiohttp
import msgspec

from gateway.providers._answers import answer_error
from gateway.providers._http import Dialect, UpstreamClient, key_header
from gateway.providers._translate import translated_stream
from gateway.providers.anthropic.passthrough import MessagesRelay
from gateway.providers.anthropic.request import JsonTool, thinking_on_top, to_anthropic
from gateway.providers.anthropic.response import AnthropicStream, UsageTally, from_anthropic
from gateway.providers.anthropic.wire import API_VERSION, RESPONSE_DECODER
from gateway.providers.base import ChatCall, ChatReply
from gateway.schemas.codec import encode
from gateway.settings import AnthropicConfig

__all__ = ["AnthropicProvider"]

_DIALECT = Dialect(auth=key_header("x-api-key"), headers={"anthropic-version": API_VERSION})


class AnthropicProvider:
    """Adapter for `type = "anthropic"` providers."""

    def __init__(self, config: AnthropicConfig, session: aiohttp.ClientSession) -> None:
        self.config = config
        self._http = UpstreamClient(config, session, _DIALECT)
        self.stats = self._http.stats  # GET /admin/stats
        self.pool = self._http.pool  # shut when the server stops
        self._url = f"{config.url}/v1/messages"
        self._relay = MessagesRelay(self._http, config.url)

    def output_on_top(self, call: ChatCall) -> int:
        """(`OutputOnTop`: a reasoning model's thinking budget.)"""
        return thinking_on_top(call)

    def _body(self, call: ChatCall, *, stream: bool) -> tuple[bytes, JsonTool | None]:
        request, json_tool = to_anthropic(call, self.config.default_max_tokens, stream=stream)
        call.speed = ""  # (the translation sends no `speed`: served, and charged, standard)
        return encode(request), json_tool

    async def chat(self, call: ChatCall) -> ChatReply:
        body, json_tool = self._body(call, stream=False)
        data = await self._http.post(self._url, body, call)
        resp = self._http.decode(RESPONSE_DECODER, data, "message")
        if resp.type != "message":  # e.g. an error envelope with a 200
            raise answer_error(self.config.name, data, "message")
        tally = UsageTally(self.config.name)
        tally.merge(resp.usage)
        out, call.usage = from_anthropic(resp, json_tool, tally.counts())
        tally.billed(call)
        # (text blocks are joined into one content: a key cut over two is whole only now)
        return ChatReply(body=self._http.redact(out, call), usage=call.usage)

    async def stream_chat(self, call: ChatCall) -> AsyncGenerator[list[bytes], None]:
        body, json_tool = self._body(call, stream=True)
        state = AnthropicStream(call, self.config.name, json_tool, self.config.max_response_bytes)
        events = self._http.stream(self._url, body, call)
        async with contextlib.aclosing(
            translated_stream(call, events, state, self.config.max_response_bytes)
        ) as chunks:
            async for batch in chunks:
                yield batch

    async def messages(
        self, call: ChatCall, body: dict[str, msgspec.Raw], headers: Mapping[str, str]
    ) -> ChatReply:
        return await self._relay.create(call, body, headers)

    def stream_messages(
        self, call: ChatCall, body: dict[str, msgspec.Raw], headers: Mapping[str, str]
    ) -> AsyncGenerator[list[bytes], None]:
        return self._relay.stream(call, body, headers)

    async def count_tokens(
        self, call: ChatCall, body: dict[str, msgspec.Raw], headers: Mapping[str, str]
    ) -> bytes:
        return await self._relay.count(call, body, headers)
