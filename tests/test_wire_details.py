"""Wire details real clients meet (issue #12): stored responses the gateway does not keep, and
`top_k` for the upstreams that take it. All with the real `openai` client.
"""

from __future__ import annotations

from typing import Any

import openai
import pytest
from aiohttp.pytest_plugin import AiohttpClient, AiohttpServer

from gateway.settings import ModelConfig, Target
from tests.conftest import (
    MakeSettings,
    create_key,
    fake_provider,
    openai_client,
    start_fakes,
    start_gateway,
)
from tests.spec import validate_error

HELLO = [{"role": "user", "content": "hello"}]


async def test_stored_responses_are_a_clear_404(oai: openai.AsyncOpenAI) -> None:
    """Was "Unknown route": now the SDK's NotFoundError says why."""
    calls = (
        oai.responses.retrieve("resp_123"),
        oai.responses.delete("resp_123"),
        oai.responses.cancel("resp_123"),
        oai.responses.input_items.list("resp_123"),
    )
    for call in calls:
        with pytest.raises(openai.NotFoundError) as err:
            await call
        body = err.value.response.json()
        validate_error(body)
        assert "does not store responses" in body["error"]["message"]
        assert body["error"]["code"] == "response_not_found"
        assert "resp_123" in body["error"]["message"]


async def test_stored_responses_still_need_a_key(oai: openai.AsyncOpenAI) -> None:
    anonymous = oai.with_options(api_key="sk-wrong")
    with pytest.raises(openai.AuthenticationError):
        await anonymous.responses.retrieve("resp_123")


@pytest.fixture
async def upstreams(
    aiohttp_server: AiohttpServer, aiohttp_client: AiohttpClient, make_settings: MakeSettings
) -> Any:
    fakes = await start_fakes(aiohttp_server, "openai", "anthropic", "gemini")
    providers = tuple(
        fake_provider(kind, fake, reasoning_models=["claude-sonnet-4*"])
        for kind, fake in fakes.items()
    )
    models = tuple(
        ModelConfig(name=kind, targets=(Target(provider=kind, model=model),))
        for kind, model in (
            ("openai", "gpt-4o-mini"),
            ("anthropic", "claude-sonnet-4-5"),
            ("gemini", "gemini-2.5-flash"),
        )
    )
    gw = await start_gateway(aiohttp_client, make_settings(providers=providers, models=models))
    async with openai_client(gw, await create_key(gw)) as client:
        yield client, fakes


async def test_top_k_reaches_every_upstream_that_takes_it(upstreams: Any) -> None:
    client, fakes = upstreams
    for model in ("openai", "anthropic", "gemini"):
        await client.chat.completions.create(model=model, messages=HELLO, extra_body={"top_k": 40})
    assert fakes["openai"].requests[-1].json["top_k"] == 40  # passed through as sent
    assert fakes["anthropic"].requests[-1].json["top_k"] == 40
    assert fakes["gemini"].requests[-1].json["generationConfig"]["topK"] == 40


async def test_top_k_that_limits_nothing_is_not_sent(upstreams: Any) -> None:
    """vLLM reads -1 (and 0) as "no limit"; Anthropic and Gemini would refuse them."""
    client, fakes = upstreams
    for model in ("anthropic", "gemini"):
        for value in (-1, 0, None):
            await client.chat.completions.create(
                model=model, messages=HELLO, extra_body={"top_k": value}
            )
            body = fakes[model].requests[-1].json
            assert "top_k" not in body and "topK" not in body.get("generationConfig", {})


async def test_top_k_is_not_sent_to_anthropic_with_thinking(upstreams: Any) -> None:
    client, fakes = upstreams
    await client.chat.completions.create(
        model="anthropic/claude-sonnet-4-5",
        messages=HELLO,
        reasoning_effort="low",
        extra_body={"top_k": 40},
    )
    body = fakes["anthropic"].requests[-1].json
    assert body["thinking"]["type"] == "enabled" and "top_k" not in body
