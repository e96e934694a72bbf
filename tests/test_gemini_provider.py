"""The Gemini provider end to end: what only Gemini does (the shared contract is elsewhere)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import openai
import pytest
from aiohttp.pytest_plugin import AiohttpClient, AiohttpServer
from aiohttp.test_utils import TestClient

from gateway.providers.base import ChatCall
from gateway.providers.gemini import GeminiProvider
from gateway.schemas.chat import ChatCompletionRequest
from gateway.schemas.codec import decode_body
from gateway.settings import GeminiConfig, ModelConfig, ProviderConfig, Target
from tests.conftest import (
    MakeSettings,
    create_key,
    openai_client,
    sse_events,
    start_gateway,
    usage_rows,
)
from tests.fake_gemini import FakeGemini
from tests.spec import validate_chat_completion, validate_chat_stream

KEY = "gemini-upstream-key"


class Rig:
    def __init__(self, fake: FakeGemini, gateway: TestClient[Any, Any], key: str) -> None:
        self.fake, self.gateway, self.key = fake, gateway, key

    def last(self) -> dict[str, Any]:
        return self.fake.generate_requests[-1].json  # type: ignore[no-any-return]

    def post(self, body: dict[str, Any]) -> Any:
        headers = {"Authorization": f"Bearer {self.key}"}
        return self.gateway.post("/v1/chat/completions", json=body, headers=headers)


@pytest.fixture
async def rig(
    aiohttp_server: AiohttpServer, aiohttp_client: AiohttpClient, make_settings: MakeSettings
) -> Rig:
    fake = FakeGemini(api_key=KEY)
    await fake.start(aiohttp_server)
    provider = GeminiConfig(
        name="gem",
        base_url=fake.base_url,
        api_keys=(KEY,),
        reasoning_models=("gemini-2.5-flash", "gemini-3*"),
    )
    settings = make_settings(
        providers=(provider,),
        models=(
            ModelConfig(name="flash", targets=(Target(provider="gem", model="gemini-2.5-flash"),)),
            ModelConfig(
                name="painter", targets=(Target(provider="gem", model="gemini-2.5-flash-image"),)
            ),
        ),
    )
    gateway = await start_gateway(aiohttp_client, settings)
    return Rig(fake, gateway, await create_key(gateway))


@pytest.fixture
async def client(rig: Rig) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai_client(rig.gateway, rig.key) as client:
        yield client


HI = [{"role": "user", "content": "hi"}]
TOOL = {
    "type": "function",
    "function": {
        "name": "lookup",
        "parameters": {
            "type": "object",
            "properties": {"q": {"type": "string"}},
            "required": ["q"],
            "additionalProperties": False,
            "$schema": "http://json-schema.org/draft-07/schema#",
        },
    },
}


async def test_request_path_and_key_header(rig: Rig, client: openai.AsyncOpenAI) -> None:
    await client.chat.completions.create(model="flash", messages=HI)
    recorded = rig.fake.generate_requests[-1]
    assert recorded.path == "/v1beta/models/gemini-2.5-flash:generateContent"
    assert recorded.headers["x-goog-api-key"] == KEY
    assert "key=" not in recorded.path  # never in the URL, where logs would keep it


async def test_client_model_names_cannot_escape_the_models_path(
    rig: Rig, client: openai.AsyncOpenAI
) -> None:
    await client.chat.completions.create(model="gem/../../v1/files?x=", messages=HI)
    recorded = rig.fake.generate_requests[-1]
    # One path segment, decoded by the server: the name reaches Gemini as a (bad) model name.
    assert recorded.path == "/v1beta/models/../../v1/files?x=:generateContent"
    url = GeminiProvider(rig_config(), None)._url(make_call("../../v1/files?x="), "generateContent")  # type: ignore[arg-type]
    assert url.endswith("/v1beta/models/..%2F..%2Fv1%2Ffiles%3Fx%3D:generateContent")


def rig_config() -> ProviderConfig:
    return GeminiConfig(name="gem", base_url="https://g.test", api_keys=("k",))


def make_call(upstream: str) -> ChatCall:
    raw = b'{"model": "m", "messages": [{"role": "user", "content": "hi"}]}'
    return ChatCall(
        request=decode_body(raw, ChatCompletionRequest),
        body=raw,
        model=ModelConfig(name="m", targets=(Target(provider="gem", model=upstream),)),
        upstream_model=upstream,
    )


async def test_gemini_3_thought_signature_round_trip(client: openai.AsyncOpenAI) -> None:
    first = await client.chat.completions.create(
        model="gem/gemini-3-pro-preview",
        messages=[{"role": "user", "content": "find x"}],
        tools=[TOOL],
    )
    call = first.choices[0].message.tool_calls[0]  # type: ignore[index]
    assert "__thought__" in call.id  # the signature rides in the id
    second = await client.chat.completions.create(
        model="gem/gemini-3-pro-preview",
        messages=[
            {"role": "user", "content": "find x"},
            first.choices[0].message.model_dump(exclude_none=True),  # type: ignore[list-item]
            {"role": "tool", "tool_call_id": call.id, "content": "found"},
        ],
        tools=[TOOL],
    )
    assert second.choices[0].finish_reason == "stop"
    assert second.choices[0].message.content == 'tool said: "found"'


async def test_image_output_appears_as_message_images(rig: Rig) -> None:
    body = {
        "model": "painter",
        "messages": [{"role": "user", "content": "draw a cat"}],
        "modalities": ["image", "text"],
    }
    async with rig.post(body) as resp:
        reply = await resp.json()
    validate_chat_completion(reply)
    message = reply["choices"][0]["message"]
    assert message["content"] == "echo: draw a cat"
    [image] = message["images"]
    assert image["type"] == "image_url"
    assert image["image_url"]["url"].startswith("data:image/png;base64,")
    assert rig.last()["generationConfig"]["responseModalities"] == ["TEXT", "IMAGE"]
    async with rig.post(body | {"stream": True}) as resp:
        events = sse_events(await resp.read())
    validate_chat_stream(events)
    streamed = [i for e in events for c in e["choices"] for i in c["delta"].get("images", [])]
    assert streamed == [image]


async def test_blocked_prompt(rig: Rig, client: openai.AsyncOpenAI) -> None:
    rig.fake.script(blocked=True)
    reply = await client.chat.completions.create(model="flash", messages=HI)
    assert reply.choices[0].finish_reason == "content_filter"
    assert reply.choices[0].message.content is None


async def test_several_choices(client: openai.AsyncOpenAI) -> None:
    reply = await client.chat.completions.create(model="flash", messages=HI, n=2)
    assert [c.index for c in reply.choices] == [0, 1]
    assert all(c.message.content == "echo: hi" for c in reply.choices)


async def test_rate_limit_retry_delay_becomes_retry_after(
    rig: Rig, client: openai.AsyncOpenAI
) -> None:
    rig.fake.script(status=429, retry_delay="33s")
    with pytest.raises(openai.RateLimitError) as err:
        await client.chat.completions.create(model="flash", messages=HI)
    assert err.value.response.headers["retry-after"] == "33"


async def test_thinking_appears_as_reasoning_content(rig: Rig, client: openai.AsyncOpenAI) -> None:
    reply = await client.chat.completions.create(
        model="gem/gemini-2.5-flash", messages=HI, reasoning_effort="medium"
    )
    assert rig.last()["generationConfig"]["thinkingConfig"] == {
        "includeThoughts": True,
        "thinkingBudget": 2048,
    }
    assert reply.choices[0].message.reasoning_content  # type: ignore[attr-defined]
    assert reply.choices[0].message.content == "echo: hi"


async def test_tool_schema_is_cleaned_for_gemini(rig: Rig, client: openai.AsyncOpenAI) -> None:
    reply = await client.chat.completions.create(model="flash", messages=HI, tools=[TOOL])
    assert reply.choices[0].finish_reason == "tool_calls"
    declared = rig.last()["tools"][0]["functionDeclarations"][0]["parameters"]
    assert declared == {
        "type": "OBJECT",
        "properties": {"q": {"type": "STRING"}},
        "required": ["q"],
    }


async def test_stream_ends_with_usage_after_the_upstream_closes(rig: Rig) -> None:
    body = {
        "model": "flash",
        "messages": HI,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    async with rig.post(body) as resp:
        events = sse_events(await resp.read())
    validate_chat_stream(events, include_usage=True)
    assert rig.fake.generate_requests[-1].path.endswith(":streamGenerateContent")
    assert events[-1]["usage"]["total_tokens"] > 0
    assert json.dumps(events).count('"finish_reason": "stop"') == 1


# A proxy in front of Gemini may end its stream OpenAI's way. What follows the `[DONE]` is not
# read: here an event that is no JSON (read, it would end the stream as malformed) and text.
AFTER_DONE = b'data: {"candidates": oops\r\n\r\ndata: {"candidates": [{"content": {"parts": [{"text": " late"}]}, "index": 0}]}\r\n\r\n'  # noqa: E501


async def test_a_stray_done_after_the_finish_ends_the_stream(rig: Rig) -> None:
    # `[DONE]` was read as a malformed Gemini chunk: a finished answer ended with an error.
    rig.fake.script(content="one two three", done_after=3, after_done=AFTER_DONE)
    async with openai_client(rig.gateway, rig.key) as client:
        chunks = await client.chat.completions.create(
            model="flash", messages=HI, stream=True, stream_options={"include_usage": True}
        )
        seen = [chunk async for chunk in chunks]
    deltas = [(c.delta.content, c.finish_reason) for chunk in seen for c in chunk.choices]
    assert "".join(text or "" for text, _ in deltas) == "one two three"
    assert [finish for _, finish in deltas if finish] == ["stop"]
    assert seen[-1].usage is not None and seen[-1].usage.total_tokens > 0
    [row] = await usage_rows(rig.gateway)
    assert row["status"] == 200


async def test_a_stray_done_before_the_finish_ends_an_incomplete_stream(rig: Rig) -> None:
    # As a Gemini stream that stops without a finishReason: the text before it, then an error.
    # (The fake holds the rest until the first text is through: in the same read as the end,
    # it would be held back, and the error a status, as for any stream that stops so early.)
    hold = asyncio.Event()
    rig.fake.script(
        content="one two three", done_after=1, after_done=AFTER_DONE, hold=hold, hold_after=1
    )
    texts: list[str | None] = []
    async with openai_client(rig.gateway, rig.key) as client:
        chunks = await client.chat.completions.create(model="flash", messages=HI, stream=True)
        with pytest.raises(openai.APIError) as failed:
            async for chunk in chunks:
                texts += [c.delta.content for c in chunk.choices]
                hold.set()
    assert "".join(text or "" for text in texts) == "one"
    assert failed.value.message == (
        "The upstream provider 'gem' ended the stream before it was complete."
    )
    [row] = await usage_rows(rig.gateway)
    assert row["status"] == 502
