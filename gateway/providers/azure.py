"""Azure OpenAI (`type = "azure"`): OpenAI's chat API on a resource of one's own.

The wire format is OpenAI's, so the OpenAI adapter does the work; only the address and the
key differ. A target's `model` names a deployment, which is part of the URL
(`/openai/deployments/{deployment}/chat/completions?api-version=...`, and `/embeddings` or
`/completions` for those APIs), and the key goes in an `api-key` header. Azure's content
filter answers as OpenAI-shaped errors (HTTP 400 with code `content_filter`) and
`finish_reason: "content_filter"`, both relayed as they are; the chunk a stream opens with
to report the prompt's filter results (empty `choices`, blank `id` and `object`) is not an
OpenAI chunk, so it is not relayed.
"""

from __future__ import annotations

import urllib.parse

import aiohttp
import msgspec

from gateway.errors import UpstreamBadRequest
from gateway.providers._errors import DECODE_ERRORS
from gateway.providers._http import Dialect, key_header
from gateway.providers.base import Call
from gateway.providers.openai import OpenAIProvider
from gateway.settings import AzureConfig

__all__ = ["AzureProvider"]


class _FilterChunkView(msgspec.Struct):
    object: str = ""
    choices: list[msgspec.Raw] = []


_FILTER_CHUNK = msgspec.json.Decoder(_FilterChunkView)


class AzureProvider(OpenAIProvider):
    """Adapter for `type = "azure"` providers."""

    dialect = Dialect(auth=key_header("api-key"))

    def __init__(self, config: AzureConfig, session: aiohttp.ClientSession) -> None:
        super().__init__(config, session)
        self._root = f"{config.url}/openai/deployments/"
        self._query = urllib.parse.urlencode({"api-version": config.api_version})

    def url(self, call: Call, operation: str) -> str:
        """The deployment's URL of an operation.

        Raises:
            UpstreamBadRequest: 404, the name cannot be a deployment's (as Azure would say).
        """
        # The deployment may come from the client ("<provider>/<deployment>" ids): quoted, so
        # it can only ever name a deployment, never another path; "." and ".." would still be
        # resolved as path segments by URL normalisation, and no deployment has those names.
        name = call.upstream_model
        if name in (".", ".."):
            err = UpstreamBadRequest(
                f"The API deployment '{name}' does not exist.",
                param="model",
                code="DeploymentNotFound",
                status=404,
            )
            err.type = "not_found_error"
            raise err
        deployment = urllib.parse.quote(name, safe="")
        return f"{self._root}{deployment}/{operation}?{self._query}"

    def _looks_at(self, events: bytes) -> bool:
        return b'"prompt_filter_results"' in events

    def _keep(self, call: Call, data: bytes, keep_usage_chunk: bool) -> bool:
        if b'"prompt_filter_results"' in data:
            try:
                view = _FILTER_CHUNK.decode(data)
            except DECODE_ERRORS:
                pass  # not ours to judge: the OpenAI rules below decide
            else:
                if not view.choices and view.object != "chat.completion.chunk":
                    return False
        return super()._keep(call, data, keep_usage_chunk)
