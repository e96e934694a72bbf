"""A hostile client attacks the gateway from outside, through raw sockets and the `openai` SDK,
with requests that try to make admission hold less than the upstream may use or break what it
hands on: output limits past any model's (the Redis-shared limits' scripts), which must be a
400 naming the field and never take the limits down for every other key; and a reasoning
effort whose thinking goes upstream on top of a model's configured limit, and a small
`max_completion_tokens` beside a large `max_tokens`, which must count in the key's limits."""

from __future__ import annotations

from typing import Any

import openai
import pytest
from aiohttp.pytest_plugin import AiohttpClient, AiohttpServer
from structlog.testing import capture_logs

from gateway.settings import ModelConfig, Target
from tests.conftest import (
    MakeSettings,
    create_key,
    fake_provider,
    openai_client,
    start_fakes,
    start_gateway,
)

HI: Any = [{"role": "user", "content": "hi"}]
# Past int64, where Redis's HINCRBY and a Lua number stop being exact.
HUGE = 2**63

# (endpoint, body) with an output limit at `HUGE`, and the field the 400 must name.
OUTPUT_LIMITS = {
    "chat max_tokens": (
        "/v1/chat/completions",
        {"model": "demo", "messages": HI, "max_tokens": HUGE},
        "max_tokens",
    ),
    "chat max_completion_tokens": (
        "/v1/chat/completions",
        {"model": "demo", "messages": HI, "max_completion_tokens": HUGE, "stream": True},
        "max_completion_tokens",
    ),
    "responses max_output_tokens": (
        "/v1/responses",
        {"model": "demo", "input": "hi", "max_output_tokens": HUGE},
        "max_output_tokens",
    ),
    "messages max_tokens": (
        "/v1/messages",
        {"model": "demo", "messages": HI, "max_tokens": HUGE},
        "max_tokens",
    ),
}


@pytest.mark.parametrize("case", OUTPUT_LIMITS)
async def test_an_output_limit_past_any_model_s_is_a_400_not_a_shared_limits_outage(
    aiohttp_client: AiohttpClient, make_settings: MakeSettings, redis_url: str, case: str
) -> None:
    # A key with a USD budget on a free model holds its request's tokens in Redis. A hold
    # past int64 made the script fail; the gate took that for Redis being down and refused
    # every limited key on the replica (503) until its next probe, a second later: one
    # request a second from one key was an outage for all.
    path, body, field = OUTPUT_LIMITS[case]
    gw = await start_gateway(
        aiohttp_client, make_settings(redis_url=redis_url, redis_timeout_seconds=5.0)
    )
    hostile = await create_key(gw, budget_usd=1.0)
    other = await create_key(gw, rpm=100)
    with capture_logs() as logs:
        async with gw.post(path, json=body, headers={"x-api-key": hostile}) as resp:
            assert resp.status == 400, await resp.text()
            error = (await resp.json())["error"]
            assert error["type"] == "invalid_request_error"
            assert field in error["message"]
        async with openai_client(gw, other) as sdk:
            answer = await sdk.chat.completions.create(model="demo", messages=HI)
            assert answer.choices[0].message.content
    assert "redis_unreachable" not in [e["event"] for e in logs]


async def test_the_sdk_gets_a_400_naming_an_output_limit_past_int32(
    aiohttp_client: AiohttpClient, make_settings: MakeSettings
) -> None:
    # The largest output limit taken is 2**31 - 1 (Gemini's maxOutputTokens is an int32; no
    # model produces more), so a larger one never reaches admission or an upstream.
    gw = await start_gateway(aiohttp_client, make_settings())
    async with openai_client(gw, await create_key(gw, budget_usd=1.0)) as sdk:
        answer = await sdk.chat.completions.create(model="demo", messages=HI, max_tokens=2**31 - 1)
        assert answer.choices[0].message.content
        with pytest.raises(openai.BadRequestError) as caught:
            await sdk.chat.completions.create(model="demo", messages=HI, max_tokens=2**31)
    error = caught.value.body
    assert isinstance(error, dict)
    assert error["param"] == "max_tokens"
    assert error["code"] is None


async def test_thinking_on_top_of_a_model_s_default_limit_is_held_too(
    aiohttp_client: AiohttpClient, aiohttp_server: AiohttpServer, make_settings: MakeSettings
) -> None:
    # A reasoning model with a configured `max_tokens` (its answer's default length) gets
    # Anthropic's thinking budget on top of it when the client sets no limit: the upstream
    # may write that much, so admission must hold that much of the key's tokens per minute.
    fake = (await start_fakes(aiohttp_server, "anthropic"))["anthropic"]
    model = ModelConfig(
        name="claude",
        reasoning=True,
        max_tokens=1000,
        targets=(Target(provider="anthropic", model="claude-sonnet-4-5"),),
    )
    settings = make_settings(providers=(fake_provider("anthropic", fake),), models=(model,))
    gw = await start_gateway(aiohttp_client, settings)
    secret = await create_key(gw, tpm=3000)
    async with openai_client(gw, secret) as sdk:
        with pytest.raises(openai.RateLimitError):
            await sdk.chat.completions.create(model="claude", messages=HI, reasoning_effort="xhigh")
        answer = await sdk.chat.completions.create(
            model="claude", messages=HI, reasoning_effort="low"
        )
    assert answer.choices[0].message.content
    (sent,) = [r.json for r in fake.requests if r.path.endswith("/messages")]
    assert sent["max_tokens"] == 1000 + 1024  # the answer's limit and the thinking budget


async def test_both_output_limits_sent_hold_the_larger(
    aiohttp_client: AiohttpClient, aiohttp_server: AiohttpServer, make_settings: MakeSettings
) -> None:
    # An OpenAI-compatible upstream gets the client's fields as sent, both limits included,
    # and which one wins there is the upstream's choice (OpenAI's `max_tokens` is the older
    # name; servers read either). Admission counted only `max_completion_tokens`, so a small
    # one beside a large `max_tokens` let the upstream write past the key's limits.
    fake = (await start_fakes(aiohttp_server, "openai"))["openai"]
    model = ModelConfig(name="gpt", targets=(Target(provider="openai", model="gpt-4o-mini"),))
    settings = make_settings(providers=(fake_provider("openai", fake),), models=(model,))
    gw = await start_gateway(aiohttp_client, settings)
    secret = await create_key(gw, tpm=1000)
    async with openai_client(gw, secret) as sdk:
        with pytest.raises(openai.RateLimitError) as caught:
            await sdk.chat.completions.create(
                model="gpt", messages=HI, max_completion_tokens=10, max_tokens=5000
            )
        assert caught.value.response.headers["x-should-retry"] == "false"
        with pytest.raises(openai.RateLimitError):
            await sdk.chat.completions.create(
                model="gpt", messages=HI, max_completion_tokens=5000, max_tokens=10
            )
        answer = await sdk.chat.completions.create(
            model="gpt", messages=HI, max_completion_tokens=10, max_tokens=20
        )
    assert answer.choices[0].message.content
    (sent,) = [r.json for r in fake.chat_requests]
    assert (sent["max_completion_tokens"], sent["max_tokens"]) == (10, 20)
