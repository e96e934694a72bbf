"""A gateway in front of one fake upstream of a given provider type, for suites that run the same
scenarios against every type (`test_contract`, `test_embeddings`, `test_completions`,
`test_messages`)."""

from __future__ import annotations

from typing import Any

from aiohttp.pytest_plugin import AiohttpClient, AiohttpServer
from aiohttp.test_utils import TestClient

from gateway.settings import ModelConfig, Target
from tests.conftest import MakeSettings, create_key, provider_config, start_gateway
from tests.fake_anthropic import FakeAnthropic
from tests.fake_azure import FakeAzure
from tests.fake_gemini import FakeGemini
from tests.fakes import FakeOpenAI

UPSTREAM_KEY = "upstream-secret-key"
AZURE_VERSION = "2024-10-21"
Fake = FakeOpenAI | FakeAzure | FakeAnthropic | FakeGemini


def fake_for(kind: str, **fields: Any) -> Fake:
    """The fake upstream of provider type `kind`; it requires the gateway's `UPSTREAM_KEY`."""
    if kind == "openai":
        return FakeOpenAI(api_key=UPSTREAM_KEY, **fields)
    if kind == "azure":
        return FakeAzure(api_key=UPSTREAM_KEY, **fields)
    if kind == "anthropic":
        return FakeAnthropic(api_key=UPSTREAM_KEY, **fields)
    return FakeGemini(api_key=UPSTREAM_KEY, **fields)


async def serve(
    kind: str,
    fake: Fake | None,
    aiohttp_server: AiohttpServer,
    aiohttp_client: AiohttpClient,
    make_settings: MakeSettings,
    model: ModelConfig,
) -> tuple[TestClient[Any, Any], str]:
    """Start `fake` (None: the demo provider serves `model`) and a gateway whose provider `up`
    of type `kind` reaches it; return the gateway and a key for it."""
    providers = ()
    if fake is not None:
        await fake.start(aiohttp_server)
        extra = {"api_version": AZURE_VERSION} if kind == "azure" else {}
        providers = (
            provider_config(
                kind, name="up", base_url=fake.base_url, api_keys=(UPSTREAM_KEY,), **extra
            ),
        )
    gateway = await start_gateway(
        aiohttp_client, make_settings(providers=providers, models=(model,))
    )
    return gateway, await create_key(gateway)


def model_on(name: str, provider: str, upstream: str, **fields: Any) -> ModelConfig:
    """A model with one target."""
    return ModelConfig(name=name, targets=(Target(provider=provider, model=upstream),), **fields)
