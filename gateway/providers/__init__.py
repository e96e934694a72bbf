"""The closed registry of provider types: the config's `type` tag picks the adapter."""

from __future__ import annotations

from typing import assert_never

import aiohttp

from gateway.providers.anthropic import AnthropicProvider
from gateway.providers.azure import AzureProvider
from gateway.providers.base import ChatCall, ChatReply, Provider
from gateway.providers.demo import DemoProvider
from gateway.providers.gemini import GeminiProvider
from gateway.providers.openai import OpenAIProvider, OpenAIResponsesProvider
from gateway.settings import (
    AnthropicConfig,
    AzureConfig,
    DemoConfig,
    GeminiConfig,
    OpenAIConfig,
    ProviderConfig,
)

__all__ = ["ChatCall", "ChatReply", "Provider", "build_provider"]


def build_provider(config: ProviderConfig, session: aiohttp.ClientSession | None) -> Provider:
    """The adapter for `config` (its type was checked when the config was decoded).

    `session` is the provider's own HTTP session; only the demo provider has none.
    """
    if isinstance(config, DemoConfig):
        return DemoProvider(config)
    if session is None:
        raise ValueError(f"the {config.type} provider {config.name!r} needs an HTTP session")
    match config:
        case OpenAIConfig(responses_api=True):
            return OpenAIResponsesProvider(config, session)
        case OpenAIConfig():
            return OpenAIProvider(config, session)
        case AzureConfig():
            return AzureProvider(config, session)
        case AnthropicConfig():
            return AnthropicProvider(config, session)
        case GeminiConfig():
            return GeminiProvider(config, session)
        case _:
            assert_never(config)
