"""One contract, every provider type: the official `openai` client cannot tell who answered.

Each scenario runs against the gateway in front of a fake OpenAI-compatible, Anthropic and
Gemini upstream. The fakes check requests the way the real APIs do (alternating roles, tool
results that answer tool calls, schema keywords, ...), so a translation bug fails here as the
real upstream's 400. Every answer is also validated against OpenAI's own spec.
"""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import openai
import pytest
from aiohttp.pytest_plugin import AiohttpClient, AiohttpServer
from aiohttp.test_utils import TestClient

from tests.conftest import (
    MakeSettings,
    openai_client,
    sse_events,
    usage_rows,
)
from tests.rigs import Fake, fake_for, model_on, serve
from tests.spec import validate_chat_completion, validate_chat_stream, validate_error

KINDS = ("openai", "azure", "anthropic", "gemini")
UPSTREAM_MODELS = {
    "openai": "gpt-4o-mini",
    "azure": "gpt-4o-mini",  # a deployment name
    "anthropic": "claude-sonnet-4-5",
    "gemini": "gemini-2.5-flash",
}
# A 1x1 transparent PNG.
PNG = base64.b64encode(
    bytes.fromhex(
        "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
        "1f15c4890000000d49444154789c6360000002000154a24f5d0000000049454e44ae426082"
    )
).decode()
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"type": ["string", "null"]}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}


@dataclass
class Rig:
    kind: str
    fake: Fake
    gateway: TestClient[Any, Any]
    key: str
    client: openai.AsyncOpenAI

    @property
    def content_started(self) -> int:
        """Upstream stream events up to and including the first piece of text."""
        # Anthropic: message_start, content_block_start, ping, then the first text_delta.
        # Azure: first its content filter's chunk (empty choices), then as OpenAI.
        return {"openai": 2, "azure": 3, "anthropic": 4, "gemini": 1}[self.kind]

    @property
    def wire(self) -> str:
        """The wire format the upstream speaks: Azure's is OpenAI's."""
        return "openai" if self.kind == "azure" else self.kind

    def last(self) -> dict[str, Any]:
        """The body of the last chat request the upstream received."""
        paths = ("/chat/completions", "/v1/messages", "generateContent")
        requests = [r for r in self.fake.requests if r.path.endswith(paths) or ":" in r.path]
        body: dict[str, Any] = requests[-1].json
        return body

    # What the upstream received, read the way each wire format says it.

    def system_text(self) -> str:
        body = self.last()
        if self.wire == "openai":
            return " ".join(m["content"] for m in body["messages"] if m["role"] == "system")
        if self.wire == "anthropic":
            system = body.get("system", [])
            return system if isinstance(system, str) else " ".join(b["text"] for b in system)
        return " ".join(p["text"] for p in body["systemInstruction"]["parts"])

    def tool_results(self) -> list[str]:
        body = self.last()
        if self.wire == "openai":
            return [m["content"] for m in body["messages"] if m["role"] == "tool"]
        if self.wire == "anthropic":
            return [
                b["content"]
                for m in body["messages"]
                if isinstance(m["content"], list)
                for b in m["content"]
                if b["type"] == "tool_result"
            ]
        return [
            json.dumps(p["functionResponse"]["response"]["output"])
            for c in body["contents"]
            for p in c["parts"]
            if "functionResponse" in p
        ]

    def images(self) -> list[str]:
        """Each image the upstream got, as `<mime>:<base64>` or its URL."""
        body = self.last()
        found: list[str] = []
        if self.wire == "openai":
            for m in body["messages"]:
                for p in m["content"] if isinstance(m["content"], list) else ():
                    if p["type"] == "image_url":
                        found.append(p["image_url"]["url"])
            return found
        if self.wire == "anthropic":
            for m in body["messages"]:
                for b in m["content"] if isinstance(m["content"], list) else ():
                    if b["type"] == "image":
                        src = b["source"]
                        found.append(
                            src["url"]
                            if src["type"] == "url"
                            else f"{src['media_type']}:{src['data']}"
                        )
            return found
        for c in body["contents"]:
            for p in c["parts"]:
                if "inlineData" in p:
                    found.append(f"{p['inlineData']['mimeType']}:{p['inlineData']['data']}")
        return found


@pytest.fixture(params=KINDS)
async def rig(
    request: pytest.FixtureRequest,
    aiohttp_server: AiohttpServer,
    aiohttp_client: AiohttpClient,
    make_settings: MakeSettings,
) -> AsyncIterator[Rig]:
    kind: str = request.param
    fake = fake_for(kind)
    model = model_on(
        "m", "up", UPSTREAM_MODELS[kind], input_price_per_mtok=1.0, output_price_per_mtok=2.0
    )
    gateway, key = await serve(kind, fake, aiohttp_server, aiohttp_client, make_settings, model)
    async with openai_client(gateway, key) as client:
        yield Rig(kind, fake, gateway, key, client)


HELLO = [
    {"role": "system", "content": "Be terse."},
    {"role": "user", "content": "hello there"},
]


async def test_plain_answer(rig: Rig) -> None:
    raw = await rig.client.chat.completions.with_raw_response.create(model="m", messages=HELLO)
    validate_chat_completion(json.loads(raw.text))
    reply = raw.parse()
    assert reply.object == "chat.completion"
    assert reply.id.startswith("chatcmpl-")
    assert reply.created > 0
    choice = reply.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == "echo: hello there"
    assert choice.finish_reason == "stop"
    assert reply.usage is not None
    assert reply.usage.prompt_tokens > 0
    assert reply.usage.completion_tokens > 0
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    assert rig.system_text() == "Be terse."
    rows = await usage_rows(rig.gateway)
    assert rows[-1]["status"] == 200
    assert rows[-1]["prompt_tokens"] == reply.usage.prompt_tokens
    assert rows[-1]["estimated"] == 0


async def test_streamed_answer(rig: Rig) -> None:
    stream = await rig.client.chat.completions.create(
        model="m", messages=HELLO, stream=True, stream_options={"include_usage": True}
    )
    chunks = [c async for c in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "echo: hello there"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert [f for f in finishes if f] == ["stop"]
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens > 0
    assert len({c.id for c in chunks}) == 1
    rows = await usage_rows(rig.gateway)
    assert rows[-1]["completion_tokens"] == chunks[-1].usage.completion_tokens


async def test_stream_framing_matches_the_spec(rig: Rig) -> None:
    body = {"model": "m", "messages": HELLO, "stream": True}
    headers = {"Authorization": f"Bearer {rig.key}"}
    async with rig.gateway.post("/v1/chat/completions", json=body, headers=headers) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        events = sse_events(await resp.read())
    validate_chat_stream(events)
    assert all(e.get("usage") is None for e in events)  # not asked for, not sent


async def test_sdk_stream_helper(rig: Rig) -> None:
    async with rig.client.chat.completions.stream(model="m", messages=HELLO) as stream:
        final = await stream.get_final_completion()
    assert final.choices[0].message.content == "echo: hello there"


async def _tool_round(rig: Rig, *, stream: bool) -> tuple[str, str, dict[str, Any]]:
    """Ask for the weather; return the tool call's id, name and parsed arguments."""
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    if not stream:
        reply = await rig.client.chat.completions.create(
            model="m", messages=messages, tools=[WEATHER]
        )
        assert reply.choices[0].finish_reason == "tool_calls"
        calls = reply.choices[0].message.tool_calls
        assert calls is not None and len(calls) == 1
        call = calls[0]
        assert call.type == "function"
        return call.id, call.function.name, json.loads(call.function.arguments)
    async with rig.client.chat.completions.stream(
        model="m", messages=messages, tools=[WEATHER]
    ) as events:
        final = await events.get_final_completion()
    assert final.choices[0].finish_reason == "tool_calls"
    call = final.choices[0].message.tool_calls[0]  # type: ignore[index]
    return call.id, call.function.name, json.loads(call.function.arguments)


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
async def test_tool_conversation_round_trips(rig: Rig, stream: bool) -> None:
    call_id, name, args = await _tool_round(rig, stream=stream)
    assert name == "get_weather"
    assert isinstance(args.get("city"), str)
    assert call_id
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": "Use tools."},
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": call_id,
                    "type": "function",
                    "function": {"name": name, "arguments": json.dumps(args)},
                }
            ],
        },
        {"role": "tool", "tool_call_id": call_id, "content": '{"temp_c": 21}'},
    ]
    reply = await rig.client.chat.completions.create(
        model="m", messages=messages, tools=[WEATHER], tool_choice="none"
    )
    assert reply.choices[0].finish_reason == "stop"
    assert reply.choices[0].message.content
    assert any("21" in r for r in rig.tool_results())


async def test_tool_stream_fragments_follow_openai_rules(rig: Rig) -> None:
    body = {
        "model": "m",
        "messages": [{"role": "user", "content": "Weather?"}],
        "tools": [WEATHER],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "stream": True,
    }
    headers = {"Authorization": f"Bearer {rig.key}"}
    async with rig.gateway.post("/v1/chat/completions", json=body, headers=headers) as resp:
        events = sse_events(await resp.read())
    validate_chat_stream(events)
    fragments = [
        tc for e in events for c in e["choices"] for tc in c["delta"].get("tool_calls", [])
    ]
    assert "id" in fragments[0] and fragments[0]["function"]["name"] == "get_weather"
    assert all("id" not in f and "name" not in f.get("function", {}) for f in fragments[1:])
    arguments = "".join(f["function"].get("arguments", "") for f in fragments)
    assert isinstance(json.loads(arguments)["city"], str)


async def test_data_url_image_reaches_the_upstream(rig: Rig) -> None:
    content = [
        {"type": "text", "text": "What is this?"},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}},
    ]
    reply = await rig.client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": content}]
    )
    assert reply.choices[0].message.content == "echo: What is this?"
    expected = f"data:image/png;base64,{PNG}" if rig.wire == "openai" else f"image/png:{PNG}"
    assert rig.images() == [expected]


async def test_http_image_url(rig: Rig) -> None:
    url = "https://example.com/cat.png"
    content = [
        {"type": "text", "text": "What is this?"},
        {"type": "image_url", "image_url": {"url": url}},
    ]
    request = rig.client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": content}]
    )
    if rig.kind == "gemini":  # the gateway never downloads URLs for Gemini
        with pytest.raises(openai.BadRequestError) as err:
            await request
        assert err.value.body["param"] == "messages[0].content[1].image_url.url"  # type: ignore[index]
        assert rig.fake.requests == []
    else:
        await request
        assert rig.images() == [url]


SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
    "required": ["city", "days"],
    "additionalProperties": False,
}


async def test_json_schema_output(rig: Rig) -> None:
    reply = await rig.client.chat.completions.create(
        model="m",
        messages=[{"role": "user", "content": "Plan a trip."}],
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "trip", "schema": SCHEMA, "strict": True},
        },
    )
    assert reply.choices[0].finish_reason == "stop"
    assert reply.choices[0].message.tool_calls is None
    data = json.loads(reply.choices[0].message.content or "")
    assert isinstance(data["city"], str) and isinstance(data["days"], int)


async def test_json_object_output_streamed(rig: Rig) -> None:
    stream = await rig.client.chat.completions.create(
        model="m",
        messages=[{"role": "user", "content": "Reply in JSON."}],
        response_format={"type": "json_object"},
        stream=True,
    )
    chunks = [c async for c in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert isinstance(json.loads(text), dict)
    assert not any(c.choices[0].delta.tool_calls for c in chunks if c.choices)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"


@pytest.mark.parametrize(
    ("status", "error_class", "seen"),
    [
        (400, openai.BadRequestError, 400),
        (404, openai.NotFoundError, 404),
        (429, openai.RateLimitError, 429),
        (500, openai.InternalServerError, 503),
        (503, openai.InternalServerError, 503),
    ],
)
async def test_upstream_errors_map_to_openai_errors(
    rig: Rig, status: int, error_class: type[openai.APIStatusError], seen: int
) -> None:
    rig.fake.script(status=status, headers={"retry-after": "7"} if status == 429 else {})
    with pytest.raises(error_class) as err:
        await rig.client.chat.completions.create(model="m", messages=HELLO)
    assert err.value.status_code == seen
    validate_error(err.value.response.json())
    if status == 429:
        assert err.value.response.headers["retry-after"] == "7"


async def test_bad_upstream_credentials_are_a_gateway_fault(rig: Rig) -> None:
    rig.fake.api_key = "another-key"
    with pytest.raises(openai.InternalServerError) as err:
        await rig.client.chat.completions.create(model="m", messages=HELLO)
    assert err.value.status_code == 502
    assert err.value.code == "upstream_auth_failed"


async def test_error_mid_stream_becomes_an_error_event(rig: Rig) -> None:
    rig.fake.script(error_after=rig.content_started)
    stream = await rig.client.chat.completions.create(model="m", messages=HELLO, stream=True)
    seen = []
    with pytest.raises(openai.APIError):
        async for chunk in stream:
            seen.append(chunk.choices[0].delta.content or "")
    assert "".join(seen).startswith("echo")  # what came before the failure was delivered


async def test_dropped_stream_becomes_an_error_event(rig: Rig) -> None:
    rig.fake.script(drop_after=rig.content_started)
    stream = await rig.client.chat.completions.create(model="m", messages=HELLO, stream=True)
    seen = []
    with pytest.raises(openai.APIError):
        async for chunk in stream:
            seen.append(chunk.choices[0].delta.content or "")
    assert "".join(seen).startswith("echo")  # what came before the failure was delivered
    rows = await usage_rows(rig.gateway)
    assert rows[-1]["status"] == 502
