"""The closed registry of provider types, keyed by the config's `type` tag."""

from __future__ import annotations

from collections.abc import Callable

import aiohttp

from gateway.providers.anthropic import AnthropicProvider
from gateway.providers.base import ChatCall, ChatReply, Provider
from gateway.providers.demo import DemoProvider
from gateway.providers.gemini import GeminiProvider
from gateway.providers.openai import OpenAIProvider, OpenAIResponsesProvider
from gateway.settings import ProviderConfig

__all__ = ["PROVIDER_TYPES", "ChatCall", "ChatReply", "Provider", "build_provider"]

PROVIDER_TYPES: dict[str, Callable[[ProviderConfig, aiohttp.ClientSession], Provider]] = {
    "openai": OpenAIProvider,
    "anthropic": AnthropicProvider,
    "gemini": GeminiProvider,
    "demo": DemoProvider,
}


def build_provider(config: ProviderConfig, session: aiohttp.ClientSession) -> Provider:
    """Instantiate the adapter for `config.type` (settings already refused unknown types)."""
    if config.responses_api:
        return OpenAIResponsesProvider(config, session)
    return PROVIDER_TYPES[config.type](config, session)
