"""`POST /v1/messages` with the official `anthropic` client, in front of an Anthropic upstream
(passed through), an OpenAI-compatible one and a Gemini one (both translated).

Every answer, stream event and error is validated against the SDK's own types (generated from
Anthropic's published API), and the stream's event sequence against the one Anthropic sends.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import anthropic
import pydantic
import pytest
from aiohttp.pytest_plugin import AiohttpClient, AiohttpServer
from aiohttp.test_utils import TestClient
from anthropic.types import Message, MessageTokensCount, RawMessageStreamEvent

from gateway.state import USAGE_KEY
from tests.conftest import (
    NEVER_HANG,
    MakeSettings,
    app_of,
    sdk_tls,
    usage_rows,
)
from tests.fake_anthropic import FakeAnthropic
from tests.fake_gemini import FakeGemini
from tests.fakes import FakeOpenAI
from tests.rigs import UPSTREAM_KEY, fake_for, model_on, serve
from tests.test_contract import PNG

KEY = UPSTREAM_KEY
KINDS = ("anthropic", "openai", "gemini")
UPSTREAM = {
    "anthropic": "claude-sonnet-4-5",
    "openai": "gpt-4o-mini",
    "gemini": "gemini-2.5-flash",
}
WEATHER = {
    "name": "get_weather",
    "description": "Current weather for a city.",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
}
HELLO = [{"role": "user", "content": "hello there"}]
MESSAGE = pydantic.TypeAdapter(Message)
EVENT = pydantic.TypeAdapter(RawMessageStreamEvent)
Fake = FakeAnthropic | FakeOpenAI | FakeGemini


@dataclass
class Rig:
    kind: str
    fake: Fake
    gateway: TestClient[Any, Any]
    key: str
    client: anthropic.AsyncAnthropic

    def last(self) -> dict[str, Any]:
        """The body of the last model request the upstream got."""
        ends = ("/v1/messages", "/chat/completions", "generateContent")
        body: dict[str, Any] = [r for r in self.fake.requests if r.path.endswith(ends)][-1].json
        return body

    def sent_text(self) -> str:
        """Everything the upstream got as text, in its own format (to check what arrived)."""
        return json.dumps(self.last())


def anthropic_client(gateway: TestClient[Any, Any], key: str) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(
        base_url=str(gateway.make_url("")).rstrip("/"),
        api_key=key,
        max_retries=0,
        timeout=10,
        http_client=anthropic.DefaultAsyncHttpxClient(verify=sdk_tls()),
    )


async def build(
    kind: str,
    aiohttp_server: AiohttpServer,
    aiohttp_client: AiohttpClient,
    make_settings: MakeSettings,
    **model: Any,
) -> Rig:
    fake = fake_for(kind)
    config = model_on("claude", "up", UPSTREAM[kind], **model)
    gateway, key = await serve(kind, fake, aiohttp_server, aiohttp_client, make_settings, config)
    return Rig(kind, fake, gateway, key, anthropic_client(gateway, key))


@pytest.fixture(params=KINDS)
async def rig(
    request: pytest.FixtureRequest,
    aiohttp_server: AiohttpServer,
    aiohttp_client: AiohttpClient,
    make_settings: MakeSettings,
) -> AsyncIterator[Rig]:
    built = await build(
        request.param, aiohttp_server, aiohttp_client, make_settings, reasoning=True
    )
    async with built.client:
        yield built


async def raw_events(rig: Rig, **body: Any) -> list[dict[str, Any]]:
    """A stream's events over raw HTTP, its framing checked: each `event:` names its data."""
    fields = {"model": "claude", "max_tokens": 200, "messages": HELLO, "stream": True} | body
    headers = {"x-api-key": rig.key, "anthropic-version": "2023-06-01"}
    async with rig.gateway.post("/v1/messages", json=fields, headers=headers) as resp:
        assert resp.status == 200, await resp.text()
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        raw = await resp.read()
    events = []
    for block in raw.decode().split("\n\n"):
        if not block.strip() or block.startswith(":"):
            continue
        name, data = block.split("\n", 1)
        assert name.startswith("event: ") and data.startswith("data: "), block
        event = json.loads(data[6:])
        assert event["type"] == name[7:]
        if event["type"] == "ping":
            assert event == {"type": "ping"}
        else:
            EVENT.validate_python(event)
        events.append(event)
    return events


async def test_create(rig: Rig) -> None:
    raw = await rig.client.messages.with_raw_response.create(
        model="claude", max_tokens=100, system="Be terse.", messages=HELLO
    )
    body = json.loads(raw.http_response.text)
    MESSAGE.validate_python(body)
    reply = await raw.parse()
    assert reply.type == "message" and reply.role == "assistant" and reply.id.startswith("msg_")
    assert [b.type for b in reply.content] == ["text"]
    assert reply.content[0].text == "echo: hello there"  # type: ignore[union-attr]
    assert reply.stop_reason == "end_turn" and reply.stop_sequence is None
    assert reply.usage.input_tokens > 0 and reply.usage.output_tokens > 0
    assert "Be terse." in rig.sent_text()
    row = (await usage_rows(rig.gateway))[-1]
    assert row["endpoint"] == "/v1/messages" and row["status"] == 200
    assert row["completion_tokens"] == reply.usage.output_tokens
    assert row["prompt_tokens"] == reply.usage.input_tokens


async def test_stream_has_anthropics_event_sequence(rig: Rig) -> None:
    events = await raw_events(rig)
    kinds = [e["type"] for e in events]
    assert kinds[:3] == ["message_start", "content_block_start", "ping"]
    assert kinds[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(kinds[3:-3]) == {"content_block_delta"}
    text = "".join(e["delta"]["text"] for e in events if e["type"] == "content_block_delta")
    assert text == "echo: hello there"
    delta = events[-2]
    assert delta["delta"]["stop_reason"] == "end_turn" and delta["usage"]["output_tokens"] > 0

    async with rig.client.messages.stream(model="claude", max_tokens=50, messages=HELLO) as stream:
        assert "".join([t async for t in stream.text_stream]) == "echo: hello there"
        final = await stream.get_final_message()
    assert final.stop_reason == "end_turn" and final.usage.output_tokens > 0
    row = (await usage_rows(rig.gateway))[-1]
    assert row["stream"] == 1 and row["completion_tokens"] == final.usage.output_tokens


async def tool_call(rig: Rig, *, stream: bool) -> Any:
    params: dict[str, Any] = {
        "model": "claude",
        "max_tokens": 200,
        "messages": [{"role": "user", "content": "Weather in Paris?"}],
        "tools": [WEATHER],
    }
    if not stream:
        return await rig.client.messages.create(**params)
    async with rig.client.messages.stream(**params) as events:
        return await events.get_final_message()


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
async def test_tool_round_trip(rig: Rig, stream: bool) -> None:
    reply = await tool_call(rig, stream=stream)
    assert reply.stop_reason == "tool_use"
    (use,) = [b for b in reply.content if b.type == "tool_use"]
    assert use.name == "get_weather" and isinstance(use.input["city"], str)
    assert use.id
    follow = await rig.client.messages.create(
        model="claude",
        max_tokens=200,
        tools=[WEATHER],  # type: ignore[list-item]
        tool_choice={"type": "none"},
        messages=[
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "content": [b.model_dump(exclude_none=True) for b in reply.content],
            },  # type: ignore[misc]
            {
                "role": "user",
                "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "21C"}],
            },
        ],
    )
    assert follow.stop_reason == "end_turn" and follow.content[-1].type == "text"
    sent = rig.last()
    if rig.kind == "openai":  # a tool message answering the call by its id
        assert sent["messages"][-1] == {"role": "tool", "tool_call_id": use.id, "content": "21C"}
    else:
        assert "21C" in rig.sent_text()


async def test_image_reaches_the_upstream(rig: Rig) -> None:
    content = [
        {"type": "text", "text": "What is this?"},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}},
    ]
    reply = await rig.client.messages.create(
        model="claude",
        max_tokens=50,
        messages=[{"role": "user", "content": content}],  # type: ignore[list-item]
    )
    assert reply.content[0].text == "echo: What is this?"  # type: ignore[union-attr]
    assert PNG in rig.sent_text()


async def test_thinking(rig: Rig) -> None:
    thinking = {"type": "enabled", "budget_tokens": 1024}
    reply = await rig.client.messages.create(
        model="claude",
        max_tokens=2048,
        thinking=thinking,
        messages=HELLO,  # type: ignore[arg-type]
    )
    sent = rig.last()
    if rig.kind == "anthropic":  # passed through: the signature comes back, and is accepted back
        assert sent["thinking"] == thinking
        block = reply.content[0]
        assert block.type == "thinking" and block.signature
        history = [
            *HELLO,
            {"role": "assistant", "content": [b.model_dump() for b in reply.content]},
        ]
        again = await rig.client.messages.create(
            model="claude",
            max_tokens=2048,
            thinking=thinking,  # type: ignore[arg-type]
            messages=[*history, {"role": "user", "content": "and?"}],  # type: ignore[list-item]
        )
        assert again.content[-1].type == "text"
    elif rig.kind == "openai":
        assert sent["reasoning_effort"] == "low"
    else:
        assert sent["generationConfig"]["thinkingConfig"]["includeThoughts"] is True
        assert reply.content[0].type == "thinking"
        assert reply.content[0].thinking == "Thinking it over."  # type: ignore[union-attr]
    async with rig.client.messages.stream(
        model="claude",
        max_tokens=2048,
        thinking=thinking,
        messages=HELLO,  # type: ignore[arg-type]
    ) as stream:
        final = await stream.get_final_message()
    assert final.content[-1].type == "text"


async def test_count_tokens(rig: Rig) -> None:
    raw = await rig.client.messages.with_raw_response.count_tokens(
        model="claude",
        messages=HELLO,
        system="Be terse.",
        tools=[WEATHER],  # type: ignore[list-item]
    )
    count = pydantic.TypeAdapter(MessageTokensCount).validate_python(raw.http_response.json())
    assert count.input_tokens > 0
    if rig.kind == "anthropic":  # the upstream's own count
        assert rig.fake.requests[-1].path == "/v1/messages/count_tokens"
        assert "max_tokens" not in rig.fake.requests[-1].json
    else:  # an estimate: nothing was sent upstream
        assert all(r.json.get("messages") != HELLO for r in rig.fake.requests)
    row = (await usage_rows(rig.gateway))[-1]
    assert row["endpoint"] == "/v1/messages/count_tokens"
    assert row["status"] == 200 and row["prompt_tokens"] == 0  # counting uses no tokens


@pytest.mark.parametrize(
    ("status", "error", "seen", "kind"),
    [
        (400, anthropic.BadRequestError, 400, "invalid_request_error"),
        (429, anthropic.RateLimitError, 429, "rate_limit_error"),
        (503, anthropic.OverloadedError, 529, "overloaded_error"),
    ],
)
async def test_upstream_errors_are_anthropic_shaped(
    rig: Rig, status: int, error: type[anthropic.APIStatusError], seen: int, kind: str
) -> None:
    rig.fake.script(status=529 if rig.kind == "anthropic" and status == 503 else status)
    with pytest.raises(error) as err:
        await rig.client.messages.create(model="claude", max_tokens=50, messages=HELLO)
    assert err.value.status_code == seen
    body = err.value.response.json()
    assert body["type"] == "error" and body["error"]["type"] == kind
    assert set(body) == {"type", "error", "request_id"} and set(body["error"]) == {
        "type",
        "message",
    }


async def test_error_mid_stream_is_an_error_event(rig: Rig) -> None:
    after = {"anthropic": 4, "openai": 2, "gemini": 1}[rig.kind]
    rig.fake.script(error_after=after)
    seen = []
    with pytest.raises(anthropic.APIStatusError) as err:
        async with rig.client.messages.stream(model="claude", max_tokens=50, messages=HELLO) as s:
            async for text in s.text_stream:
                seen.append(text)
    assert "".join(seen).startswith("echo")
    assert err.value.body["type"] == "error"  # type: ignore[index]


async def test_stop_sequences_and_sampling_reach_the_upstream(rig: Rig) -> None:
    await rig.client.messages.create(
        model="claude",
        max_tokens=50,
        messages=HELLO,
        stop_sequences=["END", "STOP"],
        metadata={"user_id": "u-7"},
        extra_body={"temperature": 0.3},  # (anthropic-sdk-python 2.x has no parameter for it)
    )
    sent = rig.last()
    if rig.kind == "anthropic":
        assert sent["stop_sequences"] == ["END", "STOP"] and sent["temperature"] == 0.3
        assert sent["metadata"] == {"user_id": "u-7"}
    elif rig.kind == "openai":
        assert (sent["stop"], sent["temperature"], sent["user"]) == (["END", "STOP"], 0.3, "u-7")
    else:
        config = sent["generationConfig"]
        assert config["stopSequences"] == ["END", "STOP"] and config["temperature"] == 0.3


async def test_a_client_hanging_up_mid_stream_closes_the_upstream(rig: Rig) -> None:
    rig.fake.always(content=" ".join(["word"] * 50), hold=asyncio.Event(), hold_after=5)
    fields = {"model": "claude", "max_tokens": 200, "messages": HELLO, "stream": True}
    async with aiohttp.ClientSession() as session:
        resp = await session.post(
            rig.gateway.make_url("/v1/messages"), json=fields, headers={"x-api-key": rig.key}
        )
        assert resp.status == 200
        await resp.content.readuntil(b"\n\n")
        resp.close()  # hang up mid-stream
    async with asyncio.timeout(NEVER_HANG):
        await rig.fake.client_disconnected.wait()
        await app_of(rig.gateway)[USAGE_KEY].wait_recorded(1)
    row = (await usage_rows(rig.gateway))[-1]
    assert (row["status"], row["stream"], row["estimated"]) == (499, 1, 1)
