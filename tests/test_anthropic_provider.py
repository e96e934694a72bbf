"""The Anthropic provider end to end: what only Anthropic does (the rest is the contract)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import openai
import pytest
from aiohttp.pytest_plugin import AiohttpClient, AiohttpServer
from aiohttp.test_utils import TestClient

from gateway.settings import AnthropicConfig, ModelConfig, Target
from tests.conftest import (
    MakeSettings,
    create_key,
    openai_client,
    sse_events,
    start_gateway,
    usage_rows,
)
from tests.fake_anthropic import FakeAnthropic
from tests.spec import validate_chat_stream

KEY = "sk-ant-upstream"


class Rig:
    def __init__(self, fake: FakeAnthropic, gateway: TestClient[Any, Any], key: str) -> None:
        self.fake, self.gateway, self.key = fake, gateway, key

    def last(self) -> dict[str, Any]:
        return self.fake.messages_requests[-1].json  # type: ignore[no-any-return]


@pytest.fixture
async def rig(
    aiohttp_server: AiohttpServer, aiohttp_client: AiohttpClient, make_settings: MakeSettings
) -> Rig:
    fake = FakeAnthropic(api_key=KEY)
    await fake.start(aiohttp_server)
    provider = AnthropicConfig(
        name="ant",
        base_url=fake.base_url,
        api_keys=(KEY,),
        default_max_tokens=1000,
        reasoning_models=("claude-sonnet-4*",),
    )
    settings = make_settings(
        providers=(provider,),
        models=(
            ModelConfig(name="claude", targets=(Target(provider="ant", model="claude-haiku-3-5"),)),
        ),
    )
    gateway = await start_gateway(aiohttp_client, settings)
    return Rig(fake, gateway, await create_key(gateway))


@pytest.fixture
async def client(rig: Rig) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai_client(rig.gateway, rig.key) as client:
        yield client


HI = [{"role": "user", "content": "hi"}]


async def test_request_headers_and_defaults(rig: Rig, client: openai.AsyncOpenAI) -> None:
    await client.chat.completions.create(model="claude", messages=HI)
    recorded = rig.fake.messages_requests[-1]
    assert recorded.headers["x-api-key"] == KEY
    assert recorded.headers["anthropic-version"] == "2023-06-01"
    assert "authorization" not in recorded.headers
    assert rig.last()["model"] == "claude-haiku-3-5"
    assert rig.last()["max_tokens"] == 1000


@pytest.mark.parametrize(("upstream", "seen"), [(529, 503), (413, 413), (500, 503), (403, 502)])
async def test_status_mapping(
    rig: Rig, client: openai.AsyncOpenAI, upstream: int, seen: int
) -> None:
    rig.fake.script(status=upstream)
    with pytest.raises(openai.APIStatusError) as err:
        await client.chat.completions.create(model="claude", messages=HI)
    assert err.value.status_code == seen


async def test_upstream_400_keeps_its_message(rig: Rig, client: openai.AsyncOpenAI) -> None:
    rig.fake.script(
        status=400,
        error={
            "type": "error",
            "error": {
                "type": "invalid_request_error",
                "message": "prompt is too long: 210000 tokens > 200000 maximum",
            },
        },
    )
    with pytest.raises(openai.BadRequestError) as err:
        await client.chat.completions.create(model="claude", messages=HI)
    assert "prompt is too long" in err.value.message


async def test_overloaded_mid_stream(rig: Rig) -> None:
    rig.fake.script(error_after=4)  # after the first text delta
    headers = {"Authorization": f"Bearer {rig.key}"}
    body = {"model": "claude", "messages": HI, "stream": True}
    async with rig.gateway.post("/v1/chat/completions", json=body, headers=headers) as resp:
        raw = await resp.read()
    assert resp.status == 200
    last = [b for b in raw.split(b"\n\n") if b.startswith(b"data: {")][-1]
    error = json.loads(last[6:])["error"]
    assert "Overloaded" in error["message"]
    assert b"[DONE]" not in raw


async def test_parallel_tool_calls_stream_with_their_own_indices(rig: Rig) -> None:
    rig.fake.script(parallel=True)
    tools = [
        {
            "type": "function",
            "function": {
                "name": "a",
                "parameters": {
                    "type": "object",
                    "properties": {"x": {"type": "string"}},
                    "required": ["x"],
                },
            },
        },
        {"type": "function", "function": {"name": "b"}},
    ]
    headers = {"Authorization": f"Bearer {rig.key}"}
    body = {"model": "claude", "messages": HI, "tools": tools, "stream": True}
    async with rig.gateway.post("/v1/chat/completions", json=body, headers=headers) as resp:
        events = sse_events(await resp.read())
    validate_chat_stream(events)
    firsts = [
        tc
        for e in events
        for c in e["choices"]
        for tc in c["delta"].get("tool_calls", [])
        if "id" in tc
    ]
    assert [(f["index"], f["function"]["name"]) for f in firsts] == [(0, "a"), (1, "b")]


async def test_reasoning_model_returns_thinking_as_reasoning_content(
    rig: Rig, client: openai.AsyncOpenAI
) -> None:
    reply = await client.chat.completions.create(
        model="ant/claude-sonnet-4-5", messages=HI, reasoning_effort="low"
    )
    assert rig.last()["thinking"] == {"type": "enabled", "budget_tokens": 1024}
    assert reply.choices[0].message.content == "echo: hi"
    assert reply.choices[0].message.reasoning_content  # type: ignore[attr-defined]


async def test_reasoning_effort_is_refused_for_other_models(client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        await client.chat.completions.create(model="claude", messages=HI, reasoning_effort="low")
    assert err.value.param == "reasoning_effort"  # type: ignore[attr-defined]


async def test_cache_tokens_reach_usage(rig: Rig, client: openai.AsyncOpenAI) -> None:
    rig.fake.script(input_tokens=5, cache_read_input_tokens=50, cache_creation_input_tokens=10)
    reply = await client.chat.completions.create(model="claude", messages=HI)
    assert reply.usage is not None
    assert reply.usage.prompt_tokens == 65
    assert reply.usage.prompt_tokens_details is not None
    assert reply.usage.prompt_tokens_details.cached_tokens == 50
    rig.fake.script(input_tokens=5, cache_read_input_tokens=7, cache_creation_input_tokens=3)
    stream = await client.chat.completions.create(model="claude", messages=HI, stream=True)
    _ = [c async for c in stream]
    rows = await usage_rows(rig.gateway)
    cache = [(r["prompt_tokens"], r["cache_read_tokens"], r["cache_write_tokens"]) for r in rows]
    assert cache == [(65, 50, 10), (15, 7, 3)]  # both ways, the usage row has the cache


async def test_unsupported_field_never_reaches_the_upstream(
    rig: Rig, client: openai.AsyncOpenAI
) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        await client.chat.completions.create(model="claude", messages=HI, n=3)
    assert err.value.param == "n"  # type: ignore[attr-defined]
    assert rig.fake.messages_requests == []


async def test_max_tokens_cut_is_length(rig: Rig, client: openai.AsyncOpenAI) -> None:
    reply = await client.chat.completions.create(
        model="claude",
        messages=[{"role": "user", "content": "one two three four five"}],
        max_tokens=2,
    )
    assert reply.choices[0].finish_reason == "length"
    assert rig.last()["max_tokens"] == 2


async def test_stop_sequence(rig: Rig, client: openai.AsyncOpenAI) -> None:
    reply = await client.chat.completions.create(
        model="claude", messages=[{"role": "user", "content": "alpha STOP beta"}], stop="STOP"
    )
    assert reply.choices[0].finish_reason == "stop"
    assert reply.choices[0].message.content == "echo: alpha "


async def test_overloaded_before_any_content_is_a_503_status(rig: Rig) -> None:
    rig.fake.script(error_after=1)  # message_start, then the overloaded error event
    headers = {"Authorization": f"Bearer {rig.key}"}
    body = {"model": "claude", "messages": HI, "stream": True}
    async with rig.gateway.post("/v1/chat/completions", json=body, headers=headers) as resp:
        error = await resp.json()
    assert resp.status == 503
    assert "Overloaded" in error["error"]["message"]
