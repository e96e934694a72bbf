"""The fake Anthropic upstream answers, streams and rejects requests like the real Messages API."""

from __future__ import annotations

import asyncio
import copy
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp.pytest_plugin import AiohttpServer

from tests.conftest import NEVER_HANG
from tests.fake_anthropic import FakeAnthropic, Invalid, check_request

Json = dict[str, Any]

VERSION = {"anthropic-version": "2023-06-01"}
MODEL = "claude-sonnet-4-5-20250929"
HELLO: Json = {
    "model": MODEL,
    "max_tokens": 100,
    "messages": [{"role": "user", "content": [{"type": "text", "text": "hello there"}]}],
}
WEATHER: Json = {
    "name": "get_weather",
    "description": "Weather for a city.",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
        "required": ["city"],
    },
}
TIME: Json = {"name": "get_time", "input_schema": {"type": "object"}}
TOOLS = [WEATHER, TIME]
PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR4nGNgYGAAAAAEAAH2FzhVAAAAAElFTkSuQmCC"
CALL: Json = {"type": "tool_use", "id": "toolu_01A", "name": "get_weather", "input": {"city": "P"}}
RESULT: Json = {"type": "tool_result", "tool_use_id": "toolu_01A", "content": "21C"}


def user(*content: Any) -> Json:
    return {"role": "user", "content": list(content)}


def assistant(*content: Any) -> Json:
    return {"role": "assistant", "content": list(content)}


def text(value: str) -> Json:
    return {"type": "text", "text": value}


TOOL_TURN = [user(text("weather in Paris?")), assistant(CALL), user(RESULT)]


@pytest.fixture
async def fake(aiohttp_server: AiohttpServer) -> FakeAnthropic:
    fake = FakeAnthropic()
    await fake.start(aiohttp_server)
    return fake


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def post(
    fake: FakeAnthropic,
    session: aiohttp.ClientSession,
    body: Any = None,
    headers: dict[str, str] | None = None,
    **fields: Any,
) -> aiohttp.ClientResponse:
    """POST /v1/messages with ``body`` (default: HELLO | fields); the body is read already."""
    body = HELLO | fields if body is None else body
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    hdrs = (VERSION if headers is None else headers) | {"content-type": "application/json"}
    response = await session.post(f"{fake.base_url}/v1/messages", data=data, headers=hdrs)
    await response.read()
    return response


async def message(fake: FakeAnthropic, session: aiohttp.ClientSession, **fields: Any) -> Json:
    response = await post(fake, session, **fields)
    assert response.status == 200, await response.text()
    body: Json = await response.json()
    return body


def parse_sse(raw: bytes) -> list[Json]:
    """The events of an Anthropic SSE body; each `event:` name must equal its data's type."""
    assert raw.endswith(b"\n\n")
    events = []
    for frame in raw.decode().split("\n\n")[:-1]:
        name, data = frame.split("\n")
        assert name.startswith("event: ") and data.startswith("data: "), frame
        event = json.loads(data[6:])
        assert event["type"] == name[7:]
        events.append(event)
    return events


async def stream(fake: FakeAnthropic, session: aiohttp.ClientSession, **fields: Any) -> list[Json]:
    response = await post(fake, session, stream=True, **fields)
    assert response.status == 200, await response.text()
    assert response.content_type == "text/event-stream"
    assert response.headers["request-id"].startswith("req_")
    return parse_sse(await response.read())


def assemble(events: list[Json]) -> Json:
    """The message a client builds from a stream (as the Anthropic SDK's accumulator does)."""
    assert events[0]["type"] == "message_start" and events[-1] == {"type": "message_stop"}
    result: Json = copy.deepcopy(events[0]["message"])
    assert result["content"] == [] and result["stop_reason"] is None
    assert result["usage"]["output_tokens"] == 1
    blocks: list[Json] = []
    partial: dict[int, str] = {}
    for event in events[1:-1]:
        kind, index = event["type"], event.get("index")
        if kind == "content_block_start":
            assert index == len(blocks)
            blocks.append(dict(event["content_block"]))
        elif kind == "content_block_delta":
            assert index == len(blocks) - 1
            delta, block = event["delta"], blocks[-1]
            if delta["type"] == "input_json_delta":
                assert block["input"] == {}
                partial[index] = partial.get(index, "") + delta["partial_json"]
            elif delta["type"] == "signature_delta":
                block["signature"] = delta["signature"]
            else:
                field = {"text_delta": "text", "thinking_delta": "thinking"}[delta["type"]]
                block[field] += delta[field]
        elif kind == "content_block_stop":
            assert index == len(blocks) - 1
            if index in partial:
                blocks[index]["input"] = json.loads(partial[index])
        elif kind == "message_delta":
            result |= event["delta"]
            result["usage"] |= event["usage"]
        else:
            assert event == {"type": "ping"}
    assert events[-2]["type"] == "message_delta"
    return result | {"content": blocks}


async def rejected(response: aiohttp.ClientResponse, status: int = 400) -> str:
    """The message of a realistic Anthropic error answer."""
    assert response.status == status
    body = await response.json()
    assert set(body) == {"type", "error", "request_id"} and body["type"] == "error"
    assert body["request_id"] == response.headers["request-id"]
    assert body["request_id"].startswith("req_")
    message: str = body["error"]["message"]
    return message


# -- answers ------------------------------------------------------------------------------------


async def test_plain_answer(fake: FakeAnthropic, session: aiohttp.ClientSession) -> None:
    assert not fake.request_seen.is_set()
    response = await post(fake, session, system="Be terse.", temperature=0.5)
    assert response.status == 200
    assert response.headers["request-id"].startswith("req_")
    body = await response.json()
    assert body["id"].startswith("msg_01") and len(body["id"]) > 20
    assert body == {
        "id": body["id"],
        "type": "message",
        "role": "assistant",
        "model": MODEL,
        "content": [{"type": "text", "text": "echo: hello there"}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {
            "input_tokens": 2 + 2 + 4,  # words of system and messages, 4 per message
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
            "output_tokens": 3,
            "service_tier": "standard",
        },
    }
    assert fake.request_seen.is_set()
    [recorded] = fake.requests
    assert (recorded.method, recorded.path) == ("POST", "/v1/messages")
    assert recorded.json == HELLO | {"system": "Be terse.", "temperature": 0.5}
    assert recorded.headers["anthropic-version"] == "2023-06-01"
    assert fake.messages_requests == [recorded]
    assert fake.base_url.startswith("http://127.0.0.1:") and fake.base_url.count("/") == 2


async def test_stream_matches_plain_answer(
    fake: FakeAnthropic, session: aiohttp.ClientSession
) -> None:
    plain = await message(fake, session)
    events = await stream(fake, session)
    assert [e["type"] for e in events] == [
        "message_start",
        "content_block_start",
        "ping",
        *["content_block_delta"] * 3,
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert events[1]["content_block"] == {"type": "text", "text": ""}
    assert [e["delta"] for e in events[3:6]] == [
        {"type": "text_delta", "text": t} for t in ("echo:", " hello", " there")
    ]
    assert events[-2] == {
        "type": "message_delta",
        "delta": {"stop_reason": "end_turn", "stop_sequence": None},
        "usage": {"output_tokens": 3},
    }
    assert assemble(events) == plain | {"id": events[0]["message"]["id"]}
    assert events[0]["message"]["usage"]["input_tokens"] == plain["usage"]["input_tokens"]


async def test_ping_knob_and_wire_format(
    fake: FakeAnthropic, session: aiohttp.ClientSession
) -> None:
    fake.script(ping=False)
    assert "ping" not in [e["type"] for e in await stream(fake, session)]
    raw = await (await post(fake, session, stream=True)).read()
    assert b'event: ping\ndata: {"type": "ping"}\n\n' in raw
    assert b"[DONE]" not in raw


async def test_tool_call(fake: FakeAnthropic, session: aiohttp.ClientSession) -> None:
    body = await message(fake, session, tools=TOOLS)
    assert body["stop_reason"] == "tool_use"
    [call] = body["content"]
    assert call["id"].startswith("toolu_01") and len(call["id"]) > 20
    assert call == {
        "type": "tool_use",
        "id": call["id"],
        "name": "get_weather",
        "input": {"city": "Paris"},
    }
    assert body["usage"]["output_tokens"] == 10

    forced = {"type": "tool", "name": "get_time"}
    body = await message(fake, session, tools=TOOLS, tool_choice=forced)
    assert [(c["name"], c["input"]) for c in body["content"]] == [("get_time", {})]
    body = await message(fake, session, tools=TOOLS, tool_choice={"type": "none"})
    assert body["content"] == [text("echo: hello there")]
    fake.script(content="Let me check.", arguments={"city": "Rome"})
    body = await message(fake, session, tools=TOOLS)
    assert body["content"][0] == text("Let me check.")
    assert body["content"][1]["input"] == {"city": "Rome"}
    fake.script(tool_call=False)
    assert (await message(fake, session, tools=TOOLS))["stop_reason"] == "end_turn"
    fake.script(tool_call=True)
    body = await message(fake, session)  # no tools: a made-up one
    assert body["content"][0]["name"] == "tool"


async def test_tool_call_stream(fake: FakeAnthropic, session: aiohttp.ClientSession) -> None:
    fake.always(arguments={"city": "Paris", "days": 3})
    plain = await message(fake, session, tools=TOOLS)
    events = await stream(fake, session, tools=TOOLS)
    start = events[1]["content_block"]
    assert start["type"] == "tool_use" and start["input"] == {}
    assert start["id"].startswith("toolu_01") and start["name"] == "get_weather"
    pieces = [e["delta"]["partial_json"] for e in events if e["type"] == "content_block_delta"]
    assert pieces[0] == "" and len(pieces) > 3
    assert all(len(p) <= 8 for p in pieces)
    assert json.loads("".join(pieces)) == {"city": "Paris", "days": 3}
    streamed = assemble(events)
    assert streamed["content"][0]["input"] == plain["content"][0]["input"]
    assert streamed["stop_reason"] == "tool_use"


async def test_parallel_tool_calls(fake: FakeAnthropic, session: aiohttp.ClientSession) -> None:
    fake.always(parallel=True)
    events = await stream(fake, session, tools=TOOLS)
    names = [(b["name"], b["input"]) for b in assemble(events)["content"]]
    assert names == [("get_weather", {"city": "Paris"}), ("get_time", {})]
    assert [e["index"] for e in events if e["type"] == "content_block_start"] == [0, 1]
    choice = {"type": "auto", "disable_parallel_tool_use": True}
    body = await message(fake, session, tools=TOOLS, tool_choice=choice)
    assert [c["name"] for c in body["content"]] == ["get_weather"]


async def test_tool_result_turn(fake: FakeAnthropic, session: aiohttp.ClientSession) -> None:
    result = RESULT | {"content": [text("21C"), text("sunny")], "is_error": False}
    body = await message(fake, session, tools=TOOLS, messages=[*TOOL_TURN[:2], user(result)])
    assert body["content"] == [text("tool said: 21C sunny")]
    assert body["stop_reason"] == "end_turn"
    turn = [*TOOL_TURN[:2], user(RESULT, text("thanks"))]
    body = await message(fake, session, tools=TOOLS, messages=turn, tool_choice={"type": "any"})
    assert body["content"][0]["name"] == "get_weather"  # forced: calls again


async def test_thinking(fake: FakeAnthropic, session: aiohttp.ClientSession) -> None:
    thinking = {"type": "enabled", "budget_tokens": 1024}
    body = await message(fake, session, max_tokens=2000, thinking=thinking)
    first, second = body["content"]
    assert first["type"] == "thinking" and first["thinking"] == "Let me think."
    assert first["signature"] and second == text("echo: hello there")
    events = await stream(fake, session, max_tokens=2000, thinking=thinking)
    assert events[1]["content_block"] == {"type": "thinking", "thinking": "", "signature": ""}
    deltas = [e["delta"]["type"] for e in events if e.get("index") == 0 and "delta" in e]
    assert deltas == ["thinking_delta"] * 3 + ["signature_delta"]
    assert assemble(events)["content"][0]["thinking"] == "Let me think."
    fake.script(thinking="Hmm.")  # without thinking in the request
    assert (await message(fake, session))["content"][0]["thinking"] == "Hmm."


async def test_structured_output(fake: FakeAnthropic, session: aiohttp.ClientSession) -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    output = {"format": {"type": "json_schema", "schema": schema}}
    body = await message(fake, session, output_config=output)
    assert json.loads(body["content"][0]["text"]) == {"n": 1}


async def test_stop_sequences_and_max_tokens(
    fake: FakeAnthropic, session: aiohttp.ClientSession
) -> None:
    fake.always(content="one two three four five")
    body = await message(fake, session, stop_sequences=[" four", "thr"])
    assert body["content"] == [text("one two ")]
    assert (body["stop_reason"], body["stop_sequence"]) == ("stop_sequence", "thr")
    body = await message(fake, session, max_tokens=2)
    assert body["content"] == [text("one two")]
    assert (body["stop_reason"], body["usage"]["output_tokens"]) == ("max_tokens", 2)
    events = await stream(fake, session, max_tokens=3)
    assert assemble(events)["stop_reason"] == "max_tokens"


async def test_usage_and_stop_reason_knobs(
    fake: FakeAnthropic, session: aiohttp.ClientSession
) -> None:
    knobs = {
        "input_tokens": 7,
        "output_tokens": 9,
        "cache_read_input_tokens": 100,
        "cache_creation_input_tokens": 20,
        "stop_reason": "refusal",
    }
    fake.always(**knobs)
    body = await message(fake, session)
    assert body["stop_reason"] == "refusal"
    expected = {k: v for k, v in knobs.items() if k != "stop_reason"}
    assert body["usage"] == expected | {"service_tier": "standard"}
    events = await stream(fake, session)
    assert events[0]["message"]["usage"] == expected | {
        "output_tokens": 1,
        "service_tier": "standard",
    }
    assert events[-2]["usage"] == {"output_tokens": 9}


async def test_full_featured_request_is_accepted(
    fake: FakeAnthropic, session: aiohttp.ClientSession
) -> None:
    cache = {"type": "ephemeral"}
    image_b64 = {
        "type": "image",
        "source": {"type": "base64", "media_type": "image/png", "data": PNG},
    }
    image_url = {"type": "image", "source": {"type": "url", "url": "https://x.test/cat.png"}}
    pdf = {
        "type": "document",
        "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBERi0xLjQK"},
        "title": "doc",
    }
    note = {
        "type": "document",
        "source": {"type": "text", "media_type": "text/plain", "data": "plain"},
    }
    thought = {"type": "thinking", "thinking": "Need weather.", "signature": "c2ln"}
    fake.signatures.add("c2ln")  # as if the fake had issued it: replayed signatures are checked
    call_b = CALL | {"id": "call_abc-1", "name": "get_time", "input": {}}
    messages = [
        user(text("look") | {"cache_control": cache}, image_b64, image_url, pdf, note),
        assistant(text("Seen.")),
        user(text("weather and time?")),
        assistant(thought, {"type": "redacted_thinking", "data": "xyz"}, CALL, call_b),
        user(
            RESULT | {"content": [text("21C"), image_b64], "is_error": False},
            {"type": "tool_result", "tool_use_id": "call_abc-1", "is_error": True},
            text("and?"),
        ),
    ]
    body = HELLO | {
        "max_tokens": 4096,
        "messages": messages,
        "system": [text("Be terse.") | {"cache_control": cache | {"ttl": "1h"}}],
        "tools": [WEATHER | {"cache_control": cache, "strict": True}, TIME | {"type": "custom"}],
        "tool_choice": {"type": "auto", "disable_parallel_tool_use": True},
        "thinking": {"type": "enabled", "budget_tokens": 2048},
        "temperature": 1,
        "top_p": 0.95,
        "stop_sequences": ["END"],
        "metadata": {"user_id": "u-1"},
        "service_tier": "auto",
        "stream": False,
    }
    reply = await message(fake, session, **body)
    assert reply["content"][-1] == text("tool said: 21C")  # the is_error result has no text
    prefill = [*messages, assistant(text("The answer is"))]
    body |= {"messages": prefill, "thinking": {"type": "disabled"}}
    del body["stream"]
    reply = assemble(await stream(fake, session, **body))
    assert reply["content"] == [text("tool said: 21C")]


# -- validation ---------------------------------------------------------------------------------

DROP = object()  # a field value meaning "leave the field out"
HI: Json = {"role": "user", "content": "hi"}
THINK: Json = {"max_tokens": 4000, "thinking": {"type": "enabled", "budget_tokens": 1024}}
RANK = (
    "Each `tool_result` block must have a corresponding `tool_use` block in the previous message."
)


def chat(*messages: Json, **fields: Any) -> Json:
    return {"messages": list(messages)} | fields


def image(**source: str) -> Json:
    return chat(user({"type": "image", "source": source}))


def after_call(*blocks: Json) -> Json:
    """A tool loop whose answering user message holds ``blocks``."""
    return chat(HI, assistant(CALL), user(*blocks), tools=TOOLS)


def result(**fields: Any) -> Json:
    return after_call(RESULT | fields)


# (id, fields replacing HELLO's, a part of the expected 400 message)
INVALID: list[tuple[str, Json, str]] = [
    ("extra-field", {"n": 2}, "n: Extra inputs are not permitted"),
    ("no-model", {"model": DROP}, "model: Field required"),
    ("no-max-tokens", {"max_tokens": DROP}, "max_tokens: Field required"),
    ("max-tokens-0", {"max_tokens": 0}, "max_tokens: Input should be greater than or equal to 1"),
    ("max-tokens-str", {"max_tokens": "9"}, "max_tokens: Input should be a valid integer"),
    ("max-tokens-bool", {"max_tokens": True}, "max_tokens: Input should be a valid integer"),
    ("no-messages", {"messages": DROP}, "messages: Field required"),
    ("empty-messages", {"messages": []}, "messages: at least one message is required"),
    ("system-role", chat({"role": "system", "content": "x"}),
     "messages.0.role: Input should be 'user' or 'assistant'"),
    ("first-assistant", chat(assistant(text("x"))), 'messages: first message must use the "user"'),
    ("two-users", chat(HI, HI), 'messages: roles must alternate between "user" and "assistant", '
                                'but found multiple "user" roles in a row'),
    ("empty-string", chat({"role": "user", "content": ""}),
     "messages.0: all messages must have non-empty content"),
    ("empty-list", chat(user()), "messages.0: all messages must have non-empty content"),
    ("empty-text", chat(user(text(""))),
     "messages.0.content.0.text: text content blocks must be non-empty"),
    ("blank-text", chat(user(text(" \n"))),
     "messages.0.content.0.text: text content blocks must contain non-whitespace text"),
    ("blank-string", chat({"role": "user", "content": "  "}),
     "messages.0.content: text content blocks must contain non-whitespace text"),
    ("null-content", chat({"role": "user", "content": None}), "messages.0.content: Field required"),
    ("unknown-block", chat(user({"type": "input_audio", "data": "x"})),
     "messages.0.content.0: Input tag 'input_audio' found using 'type' does not match"),
    ("openai-image", chat(user({"type": "image_url", "image_url": {"url": "x"}})),
     "messages.0.content.0: Input tag 'image_url'"),
    ("block-extra-key", chat(user(text("x") | {"foo": 1})),
     "messages.0.content.0.text.foo: Extra inputs are not permitted"),
    ("tool-use-in-user", chat(user(CALL), tools=TOOLS),
     "messages.0.content.0.type: `tool_use` blocks are not allowed in `user` messages"),
    ("image-media-type", image(type="base64", media_type="image/bmp", data=PNG),
     "messages.0.content.0.image.source.base64.media_type: Input should be 'image/jpeg', "
     "'image/png', 'image/gif' or 'image/webp'"),
    ("image-data-url", image(type="base64", media_type="image/png", data=f"data:;base64,{PNG}"),
     "messages.0.content.0.image.source.base64: invalid base64 data"),
    ("image-bad-base64", image(type="base64", media_type="image/png", data="abc"),
     "messages.0.content.0.image.source.base64: invalid base64 data"),
    ("image-url-scheme", image(type="url", url="ftp://x/cat.png"),
     "messages.0.content.0.image.source.url.url: URL must start with"),
    ("image-no-source", chat(user({"type": "image"})),
     "messages.0.content.0.image.source: Field required"),
    ("pdf-media-type", chat(user({"type": "document", "source": {
         "type": "base64", "media_type": "text/plain", "data": "JVBERi0xLjQK"}})),
     "messages.0.content.0.document.source.base64.media_type: Input should be 'application/pdf'"),
    ("prefill-whitespace", chat(HI, assistant(text("Sure, "))),
     "messages: final assistant content cannot end with trailing whitespace"),
    ("prefill-whitespace-str", chat(HI, {"role": "assistant", "content": "a\n"}),
     "messages: final assistant content cannot end with trailing whitespace"),
    ("tool-use-id", chat(HI, assistant(CALL | {"id": "call:1"}), tools=TOOLS),
     "messages.1.content.0.tool_use.id: String should match pattern '^[a-zA-Z0-9_-]+$'"),
    ("tool-use-input", chat(HI, assistant(CALL | {"input": "{}"}), user(RESULT), tools=TOOLS),
     "messages.1.content.0.tool_use.input: Input should be a valid dictionary"),
    ("missing-result", after_call(text("hm")),
     "messages.1: `tool_use` ids were found without `tool_result` blocks immediately after: "
     "toolu_01A. Each `tool_use` block must have a corresponding `tool_result` block in the "
     "next message."),
    ("final-tool-use", chat(HI, assistant(CALL), tools=TOOLS),
     "messages.1: `tool_use` ids were found without `tool_result` blocks immediately after"),
    ("unexpected-result", after_call(RESULT, RESULT | {"tool_use_id": "toolu_02"}),
     "messages.2.content.1: unexpected `tool_use_id` found in `tool_result` blocks: toolu_02. "
     + RANK),
    ("result-without-use", chat(user(RESULT), tools=TOOLS),
     "messages.0.content.0: unexpected `tool_use_id` found in `tool_result` blocks: toolu_01A."),
    ("result-after-text", after_call(text("x"), RESULT),
     "messages.2.content.1: `tool_result` blocks must come before any other content"),
    ("result-content-dict", result(content={"temp": 21}),
     "messages.2.content.0.tool_result.content: Input should be a valid string or list"),
    ("result-empty-text", result(content=[text("")]),
     "messages.2.content.0.tool_result.content.0.text: text content blocks must be non-empty"),
    ("result-is-error", result(is_error="no"),
     "messages.2.content.0.tool_result.is_error: Input should be a valid boolean"),
    ("history-without-tools", chat(*TOOL_TURN),
     "Requests which include `tool_use` or `tool_result` blocks must define tools."),
    ("tool-name", {"tools": [WEATHER | {"name": "get weather"}]},
     "tools.0.custom.name: String should match pattern '^[a-zA-Z0-9_-]{1,64}$'"),
    ("tool-name-long", {"tools": [WEATHER | {"name": "x" * 65}]},
     "tools.0.custom.name: String should match pattern"),
    ("tool-no-schema", {"tools": [{"name": "f"}]}, "tools.0.custom.input_schema: Field required"),
    ("tool-schema-type", {"tools": [{"name": "f", "input_schema": {"type": "array"}}]},
     "tools.0.custom.input_schema.type: Input should be 'object'"),
    ("tool-openai-shape", {"tools": [{"type": "function", "function": WEATHER}]},
     "tools.0.custom.type: Input should be 'custom'"),
    ("tool-duplicate", {"tools": [WEATHER, WEATHER]}, "tools: Tool names must be unique."),
    ("choice-string", {"tools": TOOLS, "tool_choice": "required"},
     "tool_choice: Input should be a valid dictionary"),
    ("choice-function", {"tools": TOOLS, "tool_choice": {"type": "function"}},
     "tool_choice: Input tag 'function' found using 'type' does not match any of the expected "
     "tags: 'auto', 'any', 'tool', 'none'"),
    ("choice-unknown-tool", {"tools": TOOLS, "tool_choice": {"type": "tool", "name": "nope"}},
     "tool_choice: Tool 'nope' not found"),
    ("choice-tool-no-name", {"tools": TOOLS, "tool_choice": {"type": "tool"}},
     "tool_choice.tool.name: Field required"),
    ("choice-none-parallel", {"tools": TOOLS, "tool_choice": {"type": "none",
                                                              "disable_parallel_tool_use": True}},
     "tool_choice.none.disable_parallel_tool_use: Extra inputs are not permitted"),
    ("choice-without-tools", {"tool_choice": {"type": "auto"}},
     "tool_choice: tool_choice may only be specified while providing tools"),
    ("system-empty-block", {"system": [text("")]},
     "system.0.text: text content blocks must be non-empty"),
    ("system-message", {"system": {"role": "system", "content": "x"}},
     "system: Input should be a valid string or list"),
    ("system-cache-type", {"system": [text("x") | {"cache_control": {"type": "persistent"}}]},
     "system.0.text.cache_control: Input tag 'persistent'"),
    ("temperature-2", {"temperature": 2}, "temperature: Input should be less than or equal to 1"),
    ("top-p-low", {"top_p": -0.1}, "top_p: Input should be greater than or equal to 0"),
    ("top-k-float", {"top_k": 1.5}, "top_k: Input should be a valid integer"),
    ("top-k-negative", {"top_k": -1}, "top_k: Input should be greater than or equal to 0"),
    ("stop-blank", {"stop_sequences": ["\n"]}, "stop_sequences: each stop sequence must contain"),
    ("stop-string", {"stop_sequences": "END"}, "stop_sequences: Input should be a valid list"),
    ("metadata-user", {"metadata": {"user": "u"}}, "metadata.user: Extra inputs are not permitted"),
    ("stream-string", {"stream": "yes"}, "stream: Input should be a valid boolean"),
    ("service-tier", {"service_tier": "priority"}, "service_tier: Input should be 'auto' or"),
    ("thinking-budget", THINK | {"thinking": {"type": "enabled", "budget_tokens": 512}},
     "thinking.enabled.budget_tokens: Input should be greater than or equal to 1024"),
    ("thinking-max-tokens", THINK | {"max_tokens": 1024},
     "`max_tokens` must be greater than `thinking.budget_tokens`"),
    ("thinking-forced-tool", THINK | {"tools": TOOLS, "tool_choice": {"type": "any"}},
     "Thinking may not be enabled when tool_choice forces tool use."),
    ("thinking-temperature", THINK | {"temperature": 0.7},
     "`temperature` may only be set to 1 when thinking is enabled"),
    ("thinking-top-k", THINK | {"top_k": 5}, "`top_k` must be unset when thinking is enabled"),
    ("thinking-top-p", THINK | {"top_p": 0.5}, "`top_p` must be greater than or equal to 0.95"),
    ("thinking-type", {"thinking": {"type": "on"}}, "thinking: Input tag 'on'"),
    ("thinking-disabled-budget", {"thinking": {"type": "disabled", "budget_tokens": 1024}},
     "thinking.disabled.budget_tokens: Extra inputs are not permitted"),
    ("thinking-not-replayed", THINK | chat(*TOOL_TURN, tools=TOOLS),
     "messages.1.content.0.type: Expected `thinking` or `redacted_thinking`, but found "
     "`tool_use`. When `thinking` is enabled, a final `assistant` message must start with a "
     "thinking block"),
    ("output-schema", {"output_config": {"format": {"type": "json_schema", "schema": "{}"}}},
     "output_config.format.json_schema.schema: Input should be a valid dictionary"),
    ("output-json-object", {"output_config": {"format": {"type": "json_object"}}},
     "output_config.format: Input tag 'json_object'"),
    ("output-format-beta", {"output_format": {"type": "json_schema", "schema": {}}},
     "output_format: Extra inputs are not permitted"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("fields", "expected"), [c[1:] for c in INVALID], ids=[c[0] for c in INVALID]
)
async def test_invalid_request_is_rejected(
    fake: FakeAnthropic, session: aiohttp.ClientSession, fields: Json, expected: str
) -> None:
    body = {k: v for k, v in (HELLO | fields).items() if v is not DROP}
    response = await post(fake, session, body)
    message = await rejected(response)
    assert expected in message
    assert (await response.json())["error"]["type"] == "invalid_request_error"
    assert fake.messages_requests[0].json == body


@pytest.mark.parametrize(
    ("headers", "data", "expected"),
    [
        ({}, HELLO, "anthropic-version: header is required"),
        ({"anthropic-version": "2024-01-01"}, HELLO, "anthropic-version: invalid version"),
        (VERSION, b"{not json", "There was an error parsing the body of your request."),
        (VERSION, [HELLO], "Input should be a valid dictionary"),
    ],
    ids=["no-version", "bad-version", "not-json", "not-object"],
)
async def test_bad_header_or_body_is_rejected(
    fake: FakeAnthropic,
    session: aiohttp.ClientSession,
    headers: dict[str, str],
    data: Any,
    expected: str,
) -> None:
    assert (await rejected(await post(fake, session, data, headers))).startswith(expected)


def test_check_request_without_a_server() -> None:
    check_request(HELLO | {"tools": TOOLS, "messages": TOOL_TURN})
    with pytest.raises(Invalid, match=r"^messages.1: `tool_use` ids were found without"):
        check_request(HELLO | {"tools": TOOLS, "messages": [*TOOL_TURN[:2], HI]})


async def test_rejected_request_uses_up_its_script(
    fake: FakeAnthropic, session: aiohttp.ClientSession
) -> None:
    fake.script(status=529)
    await rejected(await post(fake, session, max_tokens=0))
    assert (await post(fake, session)).status == 200


# -- scripted failures --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (400, "invalid_request_error"),
        (401, "authentication_error"),
        (403, "permission_error"),
        (404, "not_found_error"),
        (413, "request_too_large"),
        (429, "rate_limit_error"),
        (500, "api_error"),
        (529, "overloaded_error"),
    ],
)
async def test_scripted_errors(
    fake: FakeAnthropic, session: aiohttp.ClientSession, status: int, kind: str
) -> None:
    fake.script(status=status, headers={"retry-after": "2"}, times=2)
    for streaming in (False, True):
        response = await post(fake, session, stream=streaming)
        assert await rejected(response, status)
        assert (await response.json())["error"]["type"] == kind
        assert response.headers["retry-after"] == "2"
    response = await post(fake, session)  # the queue is used up
    assert response.status == 200 and "retry-after" not in response.headers
    assert len(fake.messages_requests) == 3
    fake.script(status=529)
    assert await rejected(await post(fake, session), 529) == "Overloaded"


async def test_custom_error_body_and_api_key(
    aiohttp_server: AiohttpServer, session: aiohttp.ClientSession
) -> None:
    fake = FakeAnthropic(api_key="sk-ant-upstream")
    await fake.start(aiohttp_server)
    response = await post(fake, session)
    assert await rejected(response, 401) == "invalid x-api-key"
    assert (await response.json())["error"]["type"] == "authentication_error"
    error = {"type": "error", "error": {"type": "rate_limit_error", "message": "slow down"}}
    fake.script(status=429, error=error)
    response = await post(fake, session, headers=VERSION | {"x-api-key": "sk-ant-upstream"})
    assert (response.status, await response.json()) == (429, error)
    assert fake.requests[0].headers.get("x-api-key") is None


async def test_unknown_path_is_a_json_404(
    fake: FakeAnthropic, session: aiohttp.ClientSession
) -> None:
    async with session.post(f"{fake.base_url}/v1/v1/messages", json=HELLO) as response:
        assert await rejected(response, 404) == "Not Found"
        assert (await response.json())["error"]["type"] == "not_found_error"
    assert fake.messages_requests == [] and len(fake.requests) == 1


async def test_drop_mid_stream(fake: FakeAnthropic, session: aiohttp.ClientSession) -> None:
    fake.script(drop_after=2)
    url = f"{fake.base_url}/v1/messages"
    async with session.post(url, json=HELLO | {"stream": True}, headers=VERSION) as response:
        assert response.status == 200
        first = await response.content.readuntil(b"\n\n")
        assert first.startswith(b"event: message_start\n")
        with pytest.raises(aiohttp.ClientPayloadError):
            await response.read()


async def test_drop_before_response(fake: FakeAnthropic, session: aiohttp.ClientSession) -> None:
    fake.script(drop_before_response=True)
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await post(fake, session)
    assert (await post(fake, session)).status == 200


async def test_mid_stream_error_event(fake: FakeAnthropic, session: aiohttp.ClientSession) -> None:
    fake.script(error_after=3)
    events = await stream(fake, session)
    assert [e["type"] for e in events] == ["message_start", "content_block_start", "ping", "error"]
    assert events[-1] == {
        "type": "error",
        "error": {"type": "overloaded_error", "message": "Overloaded"},
    }


async def test_client_disconnect_is_noticed(
    fake: FakeAnthropic, session: aiohttp.ClientSession
) -> None:
    fake.always(hold=asyncio.Event(), hold_after=1)  # the stream stops after one event
    url = f"{fake.base_url}/v1/messages"
    response = await session.post(url, json=HELLO | {"stream": True}, headers=VERSION)
    await response.content.readuntil(b"\n\n")
    assert not fake.client_disconnected.is_set()
    response.close()  # hang up mid-stream
    async with asyncio.timeout(NEVER_HANG):
        await fake.client_disconnected.wait()


async def test_thinking_signatures_must_be_replayed_unchanged(
    fake: FakeAnthropic, session: aiohttp.ClientSession
) -> None:
    thinking = {"type": "enabled", "budget_tokens": 1024}
    first = await message(fake, session, max_tokens=2048, thinking=thinking)
    block = first["content"][0]
    assert block["type"] == "thinking" and block["signature"] in fake.signatures
    history = [HELLO["messages"][0], {"role": "assistant", "content": [block]}]
    follow = [*history, {"role": "user", "content": "and?"}]
    await message(fake, session, max_tokens=2048, thinking=thinking, messages=follow)
    forged = [*history[:1], {"role": "assistant", "content": [block | {"signature": "Zm9v"}]}]
    response = await post(fake, session, **(HELLO | {"messages": [*forged, follow[-1]]}))
    assert response.status == 400
    assert "Invalid `signature`" in (await response.json())["error"]["message"]


async def test_count_tokens(fake: FakeAnthropic, session: aiohttp.ClientSession) -> None:
    url = f"{fake.base_url}/v1/messages/count_tokens"
    body = {"model": HELLO["model"], "messages": HELLO["messages"]}
    response = await session.post(url, json=body, headers=VERSION)
    assert response.status == 200, await response.text()
    assert (await response.json())["input_tokens"] > 0
    response = await session.post(url, json=body | {"max_tokens": 5}, headers=VERSION)
    assert response.status == 400
    assert "max_tokens: Extra inputs" in (await response.json())["error"]["message"]
    response = await session.post(url, json=body, headers={})
    assert response.status == 400
    fake.script(status=529)
    response = await session.post(url, json=body, headers=VERSION)
    assert response.status == 529
