"""Azure OpenAI end to end: the official client, the gateway, and a fake Azure resource that
checks URLs, API versions and keys the way Azure does."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import openai
import pytest
from aiohttp.pytest_plugin import AiohttpClient, AiohttpServer
from aiohttp.test_utils import TestClient

from gateway.config import load_settings
from gateway.settings import AzureConfig, ConfigError, ModelConfig, Target
from tests.conftest import MakeSettings, create_key, openai_client, start_gateway
from tests.fake_azure import FakeAzure
from tests.spec import validate_chat_completion, validate_chat_stream, validate_error

AZURE_KEY = "azure-resource-key-1"
HI = [{"role": "user", "content": "hello there"}]


class Rig:
    def __init__(self, fake: FakeAzure, gateway: TestClient[Any, Any], key: str) -> None:
        self.fake, self.gateway, self.key = fake, gateway, key


async def make_rig(
    aiohttp_server: AiohttpServer,
    aiohttp_client: AiohttpClient,
    make_settings: MakeSettings,
    *,
    api_key: str = AZURE_KEY,
    api_version: str = "2024-10-21",
) -> Rig:
    fake = FakeAzure(api_key=AZURE_KEY, deployments=("gpt4o-prod", "mini"))
    await fake.start(aiohttp_server)
    provider = AzureConfig(
        name="azure", base_url=fake.base_url, api_keys=(api_key,), api_version=api_version
    )
    model = ModelConfig(
        name="gpt-4o",
        targets=(Target(provider="azure", model="gpt4o-prod"),),
        input_price_per_mtok=2.5,
        output_price_per_mtok=10,
    )
    gateway = await start_gateway(
        aiohttp_client, make_settings(providers=(provider,), models=(model,))
    )
    return Rig(fake, gateway, await create_key(gateway))


@pytest.fixture
async def rig(
    aiohttp_server: AiohttpServer, aiohttp_client: AiohttpClient, make_settings: MakeSettings
) -> Rig:
    return await make_rig(aiohttp_server, aiohttp_client, make_settings)


@pytest.fixture
async def client(rig: Rig) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai_client(rig.gateway, rig.key) as found:
        yield found


async def test_chat_goes_to_the_deployment_with_the_api_key_header(
    rig: Rig, client: openai.AsyncOpenAI
) -> None:
    raw = await client.chat.completions.with_raw_response.create(model="gpt-4o", messages=HI)  # type: ignore[arg-type]
    completion = raw.parse()
    assert completion.choices[0].message.content == "echo: hello there"
    validate_chat_completion(completion.model_dump(exclude_unset=True))
    seen = rig.fake.chat_requests[-1]
    assert seen.path == "/openai/deployments/gpt4o-prod/chat/completions"
    assert seen.headers["api-key"] == AZURE_KEY
    assert "authorization" not in seen.headers
    assert seen.headers["x-request-id"] == raw.headers["x-request-id"]
    assert raw.headers["x-gateway-provider"] == "azure"


async def test_streams_relay_azures_filter_chunks_and_usage(
    rig: Rig, client: openai.AsyncOpenAI
) -> None:
    stream = await client.chat.completions.create(
        model="gpt-4o",
        messages=HI,
        stream=True,
        stream_options={"include_usage": True},  # type: ignore[arg-type]
    )
    chunks = [c async for c in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "echo: hello there"
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens > 0
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"


async def test_a_filtered_prompt_is_the_clients_400(rig: Rig, client: openai.AsyncOpenAI) -> None:
    rig.fake.script(content_filter="prompt")
    with pytest.raises(openai.BadRequestError) as caught:
        await client.chat.completions.create(model="gpt-4o", messages=HI)  # type: ignore[arg-type]
    error = caught.value.body
    assert isinstance(error, dict)
    assert caught.value.code == "content_filter"
    assert error["param"] == "prompt" and error["type"] == "invalid_request_error"
    assert "content management policy" in error["message"]
    validate_error({"error": error})


@pytest.mark.parametrize("stream", [False, True])
async def test_a_filtered_completion_ends_with_content_filter(
    rig: Rig, client: openai.AsyncOpenAI, stream: bool
) -> None:
    rig.fake.script(content_filter="completion")
    if not stream:
        completion = await client.chat.completions.create(model="gpt-4o", messages=HI)  # type: ignore[arg-type]
        assert completion.choices[0].finish_reason == "content_filter"
        validate_chat_completion(completion.model_dump(exclude_unset=True))
        return
    chunks = [
        c
        async for c in await client.chat.completions.create(
            model="gpt-4o",
            messages=HI,  # type: ignore[arg-type]
            stream=True,
        )
    ]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "content_filter"
    validate_chat_stream([c.model_dump(exclude_unset=True) for c in chunks if c.choices])


async def test_deployments_by_prefixed_id_are_quoted_into_the_path(
    rig: Rig, client: openai.AsyncOpenAI
) -> None:
    completion = await client.chat.completions.create(model="azure/mini", messages=HI)  # type: ignore[arg-type]
    assert completion.choices[0].message.content
    assert rig.fake.chat_requests[-1].path == "/openai/deployments/mini/chat/completions"
    with pytest.raises(openai.NotFoundError) as caught:
        await client.chat.completions.create(model="azure/../../steal?x=", messages=HI)  # type: ignore[arg-type]
    assert "deployment" in caught.value.message
    assert rig.fake.chat_requests[-1].path.startswith("/openai/deployments/")
    seen = len(rig.fake.requests)
    for name in (".", ".."):  # URL normalisation would resolve these as path segments
        with pytest.raises(openai.NotFoundError):
            await client.chat.completions.create(model=f"azure/{name}", messages=HI)  # type: ignore[arg-type]
    assert len(rig.fake.requests) == seen


async def test_a_refused_azure_key_is_a_gateway_fault(
    aiohttp_server: AiohttpServer, aiohttp_client: AiohttpClient, make_settings: MakeSettings
) -> None:
    rig = await make_rig(aiohttp_server, aiohttp_client, make_settings, api_key="wrong")
    async with openai_client(rig.gateway, rig.key) as client:
        with pytest.raises(openai.APIStatusError) as caught:
            await client.chat.completions.create(model="gpt-4o", messages=HI)  # type: ignore[arg-type]
    assert caught.value.status_code == 502
    assert caught.value.code == "upstream_auth_failed"


async def test_rate_limits_keep_azures_retry_after_ms(rig: Rig, client: openai.AsyncOpenAI) -> None:
    rig.fake.script(status=429, headers={"retry-after-ms": "1500", "retry-after": "2"})
    with pytest.raises(openai.RateLimitError) as caught:
        await client.chat.completions.create(model="gpt-4o", messages=HI)  # type: ignore[arg-type]
    # The wait left on the cooled account when the answer goes out: 1500 ms less the time
    # the gateway took to answer (a few ms, more on a loaded machine), never more.
    assert 1400 <= int(caught.value.response.headers["retry-after-ms"]) <= 1500


def test_config_azure_needs_its_version_and_endpoint(tmp_path: Path) -> None:
    def load(provider: str) -> None:
        path = tmp_path / "gateway.toml"
        path.write_text(f"[[providers]]\nname = 'az'\n{provider}\n")
        load_settings(path, {"AZ": "k"})

    load(
        "type = 'azure'\nbase_url = 'https://r.openai.azure.com'\napi_keys = ['env:AZ']\n"
        "api_version = '2024-10-21'"
    )
    with pytest.raises(ConfigError, match=r"api_version"):
        load("type = 'azure'\nbase_url = 'https://r.openai.azure.com'\napi_keys = ['env:AZ']")
    with pytest.raises(ConfigError, match=r"base_url: azure providers need"):
        load("type = 'azure'\napi_keys = ['env:AZ']\napi_version = '2024-10-21'")
    with pytest.raises(ConfigError, match=r"base_url: give the API root"):
        load(
            "type = 'azure'\nbase_url = 'https://r.openai.azure.com/openai'\n"
            "api_keys = ['env:AZ']\napi_version = '2024-10-21'"
        )
    with pytest.raises(ConfigError, match=r"api_version"):
        load(
            "type = 'azure'\nbase_url = 'https://r.openai.azure.com'\napi_keys = ['env:AZ']\n"
            "api_version = '2024-10-21&x=1'"
        )


@pytest.mark.parametrize(
    ("provider", "field"),
    [
        ("type = 'anthropic'\napi_keys = ['k']\nresponses_api = true", "responses_api"),
        ("type = 'gemini'\napi_keys = ['k']\napi_version = 'v1'", "api_version"),
        ("type = 'demo'\nbase_url = 'http://x'", "base_url"),
        ("type = 'demo'\nread_timeout = 5", "read_timeout"),
    ],
)
def test_settings_of_another_provider_type_are_config_errors(
    tmp_path: Path, provider: str, field: str
) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text(f"[[providers]]\nname = 'p'\n{provider}\n")
    with pytest.raises(
        ConfigError, match=rf"providers\[0\]\.{field}: Object contains unknown field `{field}`"
    ):
        load_settings(path, {})
