"""Google's Gemini API (`generateContent`, streamed or not) behind the OpenAI chat interface.

`request` translates what clients send (with `schema` for JSON Schemas), `response` what
Gemini answers, `wire` holds the API's structs; this module is the adapter (`type = "gemini"`).
"""

from __future__ import annotations

import time
import urllib.parse
from collections.abc import AsyncGenerator

import aiohttp
import msgspec

from gateway.errors import UpstreamError
from gateway.providers._http import UpstreamClient
from gateway.providers.base import ChatCall, ChatReply
from gateway.providers.gemini.request import (
    DUMMY_SIGNATURE,
    join_call_id,
    split_call_id,
    to_gemini,
)
from gateway.providers.gemini.response import GeminiStream, from_gemini
from gateway.providers.gemini.wire import RESPONSE_DECODER, GeminiResponse
from gateway.settings import ProviderConfig

__all__ = [
    "DUMMY_SIGNATURE",
    "GeminiProvider",
    "GeminiResponse",
    "GeminiStream",
    "from_gemini",
    "join_call_id",
    "split_call_id",
    "to_gemini",
]

_ENCODER = msgspec.json.Encoder()


class GeminiProvider:
    """Adapter for `type = "gemini"` providers."""

    def __init__(self, config: ProviderConfig, session: aiohttp.ClientSession) -> None:
        self.config = config
        self._http = UpstreamClient(config, session)
        self._headers: dict[str | None, dict[str, str]] = {}

    def _url(self, call: ChatCall, *, stream: bool) -> str:
        # The model name comes from the client for "<provider>/<model>" ids: quote it so it
        # can only ever name a model, never another path.
        model = urllib.parse.quote(call.upstream_model.removeprefix("models/"), safe="")
        action = "streamGenerateContent?alt=sse" if stream else "generateContent"
        return f"{self.config.url}/v1beta/models/{model}:{action}"

    def _headers_for(self, call: ChatCall) -> dict[str, str]:
        headers = self._headers.get(call.api_key)
        if headers is None:
            headers = {"content-type": "application/json", **self.config.headers}
            if call.api_key:
                headers["x-goog-api-key"] = call.api_key
            self._headers[call.api_key] = headers
        return headers

    async def chat(self, call: ChatCall) -> ChatReply:
        body = _ENCODER.encode(to_gemini(call))
        data = await self._http.post(self._url(call, stream=False), body, self._headers_for(call))
        call.first_byte_at = call.first_byte_at or time.monotonic()
        try:
            resp = RESPONSE_DECODER.decode(data)
        except msgspec.MsgspecError:
            raise UpstreamError(
                f"The upstream provider '{self.config.name}' returned a malformed response."
            ) from None
        out, call.usage = from_gemini(resp, call.upstream_model)
        return ChatReply(body=out, usage=call.usage)

    async def stream_chat(self, call: ChatCall) -> AsyncGenerator[list[bytes], None]:
        body = _ENCODER.encode(to_gemini(call))
        state = GeminiStream(call, self.config.name)
        url = self._url(call, stream=True)
        async for batch in self._http.stream(url, body, self._headers_for(call)):
            if call.first_byte_at is None:
                call.first_byte_at = time.monotonic()
            out: list[bytes] = []
            try:
                for data in batch:
                    out.extend(state.feed(data))
            except UpstreamError:
                if out:
                    yield out
                raise
            if out:
                yield out
        last = state.end()
        if last:
            yield last
