"""Google's Gemini API (`generateContent`, streamed or not) behind the OpenAI chat interface.

`request` translates what clients send (with `schema` for JSON Schemas), `response` what
Gemini answers, `embeddings` embedding requests, `wire` holds the API's structs; this module
is the adapter (`type = "gemini"`).
"""

from __future__ import annotations

import contextlib
import urllib.parse
from collections.abc import AsyncGenerator

import aiohttp

from gateway.providers._answers import answer_error
from gateway.providers._http import Dialect, UpstreamClient, key_header
from gateway.providers._translate import translated_stream
from gateway.providers.base import Call, ChatCall, ChatReply
from gateway.providers.capabilities import EmbeddingCall
from gateway.providers.gemini.embeddings import embed
from gateway.providers.gemini.request import to_gemini
from gateway.providers.gemini.response import (
    GeminiStream,
    choice_count,
    from_gemini,
    has_usage,
)
from gateway.providers.gemini.wire import RESPONSE_DECODER
from gateway.schemas.codec import encode
from gateway.settings import GeminiConfig

__all__ = ["GeminiProvider"]

_DIALECT = Dialect(auth=key_header("x-goog-api-key"))


class GeminiProvider:
    """Adapter for `type = "gemini"` providers."""

    def __init__(self, config: GeminiConfig, session: aiohttp.ClientSession) -> None:
        self.config = config
        self._http = UpstreamClient(config, session, _DIALECT)
        self.stats = self._http.stats  # GET /admin/stats
        self.pool = self._http.pool  # shut when the server stops

    def _url(self, call: Call, action: str) -> str:
        # The model name comes from the client for "<provider>/<model>" ids: quote it so it
        # can only ever name a model, never another path.
        model = urllib.parse.quote(call.upstream_model.removeprefix("models/"), safe="")
        return f"{self.config.url}/v1beta/models/{model}:{action}"

    async def chat(self, call: ChatCall) -> ChatReply:
        body = encode(to_gemini(call))
        url = self._url(call, "generateContent")
        data = await self._http.post(url, body, call)
        resp = self._http.decode(RESPONSE_DECODER, data, "generateContent answer")
        if (
            not resp.candidates
            and resp.prompt_feedback is None
            and not has_usage(resp.usage_metadata)
        ):
            # Every answer has candidates, or a prompt's blocking feedback, and usage.
            raise answer_error(self.config.name, data, "generateContent answer")
        out, call.usage = from_gemini(
            resp, call.upstream_model, self.config.name, choice_count=choice_count(call)
        )
        # (parts are joined into one content: a key cut over two is whole only now)
        return ChatReply(body=self._http.redact(out, call), usage=call.usage)

    async def stream_chat(self, call: ChatCall) -> AsyncGenerator[list[bytes], None]:
        body = encode(to_gemini(call))
        state = GeminiStream(call, self.config.name)
        url = self._url(call, "streamGenerateContent?alt=sse")
        events = self._http.stream(url, body, call)
        async with contextlib.aclosing(
            translated_stream(call, events, state, self.config.max_response_bytes)
        ) as chunks:
            async for batch in chunks:
                yield batch

    async def embeddings(self, call: EmbeddingCall) -> ChatReply:
        model = f"models/{call.upstream_model.removeprefix('models/')}"
        return await embed(self._http, self._url(call, "batchEmbedContents"), model, call)
