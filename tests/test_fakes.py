"""The fake OpenAI upstream behaves like OpenAI, and every script knob does what it says."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp.pytest_plugin import AiohttpServer

from tests import spec
from tests.conftest import NEVER_HANG
from tests.fakes import FakeOpenAI

HELLO: dict[str, Any] = {
    "model": "gpt-4o-mini",
    "messages": [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": [{"type": "text", "text": "hello there"}]},
    ],
}
WEATHER_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                "required": ["city"],
            },
        },
    },
    {"type": "function", "function": {"name": "get_time"}},
]


@pytest.fixture
async def fake(aiohttp_server: AiohttpServer) -> FakeOpenAI:
    fake = FakeOpenAI()
    await fake.start(aiohttp_server)
    return fake


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def chat(
    fake: FakeOpenAI, session: aiohttp.ClientSession, **body: Any
) -> aiohttp.ClientResponse:
    response = await session.post(f"{fake.base_url}/chat/completions", json=HELLO | body)
    await response.read()
    return response


def sse(body: bytes) -> tuple[list[dict[str, Any]], bool]:
    """The JSON events of a chat SSE body, and whether it ended with [DONE]."""
    events, done = [], False
    for block in body.split(b"\n\n"):
        if not block:
            continue
        assert block.startswith(b"data: ") and b"\n" not in block, block[:200]
        if block == b"data: [DONE]":
            done = True
            continue
        assert not done, "data after [DONE]"
        events.append(json.loads(block[6:]))
    assert body.endswith(b"\n\n")
    return events, done


def streamed_text(chunks: list[dict[str, Any]]) -> str:
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])


async def test_non_stream_echo_and_recording(
    fake: FakeOpenAI, session: aiohttp.ClientSession
) -> None:
    assert not fake.request_seen.is_set()
    response = await chat(fake, session, temperature=0.5)
    assert response.status == 200
    assert response.headers["x-request-id"].startswith("req_")
    body = await response.json()
    spec.validate_chat_completion(body)
    assert body["id"].startswith("chatcmpl-fake")
    assert body["model"] == "gpt-4o-mini"
    assert body["choices"][0]["message"]["content"] == "echo: hello there"
    assert body["choices"][0]["finish_reason"] == "stop"
    usage = body["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] > 0
    assert fake.request_seen.is_set()
    [recorded] = fake.requests
    assert (recorded.method, recorded.path) == ("POST", "/v1/chat/completions")
    assert recorded.json == HELLO | {"temperature": 0.5}
    assert recorded.headers["content-type"] == "application/json"
    assert fake.chat_requests == [recorded]


async def test_stream_without_usage(fake: FakeOpenAI, session: aiohttp.ClientSession) -> None:
    response = await chat(fake, session, stream=True, model="gpt-4o")
    assert response.status == 200
    assert response.content_type == "text/event-stream"
    chunks, done = sse(await response.read())
    assert done
    spec.validate_chat_stream(chunks)
    assert len(chunks) == 5  # role, "echo:", " hello", " there", finish
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": "", "refusal": None}
    assert chunks[-1]["choices"][0] == {
        "index": 0,
        "delta": {},
        "logprobs": None,
        "finish_reason": "stop",
    }
    assert streamed_text(chunks) == "echo: hello there"
    assert all("usage" not in c and c["model"] == "gpt-4o" for c in chunks)


async def test_stream_with_usage(fake: FakeOpenAI, session: aiohttp.ClientSession) -> None:
    options = {"include_usage": True, "include_obfuscation": False}
    response = await chat(fake, session, stream=True, stream_options=options)
    chunks, done = sse(await response.read())
    assert done
    spec.validate_chat_stream(chunks, include_usage=True)
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["completion_tokens"] == 3
    assert all(c["usage"] is None and "obfuscation" not in c for c in chunks[:-1])


async def test_tool_call(fake: FakeOpenAI, session: aiohttp.ClientSession) -> None:
    body = await (await chat(fake, session, tools=WEATHER_TOOLS)).json()
    spec.validate_chat_completion(body)
    choice = body["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] is None
    [call] = choice["message"]["tool_calls"]
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris"}

    forced = {"type": "function", "function": {"name": "get_time"}}
    body = await (await chat(fake, session, tools=WEATHER_TOOLS, tool_choice=forced)).json()
    assert body["choices"][0]["message"]["tool_calls"][0]["function"] == {
        "name": "get_time",
        "arguments": "{}",
    }
    body = await (await chat(fake, session, tools=WEATHER_TOOLS, tool_choice="none")).json()
    assert body["choices"][0]["message"]["content"] == "echo: hello there"


async def test_tool_call_stream_fragments(fake: FakeOpenAI, session: aiohttp.ClientSession) -> None:
    fake.always(arguments='{"city": "Paris", "days": 3}')
    response = await chat(fake, session, tools=WEATHER_TOOLS, stream=True)
    chunks, done = sse(await response.read())
    assert done
    spec.validate_chat_stream(chunks)
    calls = [c["choices"][0]["delta"]["tool_calls"][0] for c in chunks[:-1]]
    assert len(calls) > 3
    assert calls[0] == {
        "index": 0,
        "id": "call_fake1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": ""},
    }
    assert all(
        set(c) == {"index", "function"} and set(c["function"]) == {"arguments"} for c in calls[1:]
    )
    assert "".join(c["function"]["arguments"] for c in calls) == '{"city": "Paris", "days": 3}'
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


@pytest.mark.parametrize("status", [400, 401, 429, 500, 503])
async def test_scripted_errors(
    fake: FakeOpenAI, session: aiohttp.ClientSession, status: int
) -> None:
    fake.script(status=status, headers={"retry-after": "2"}, times=2)
    for _ in range(2):
        response = await chat(fake, session, stream=True)
        assert response.status == status
        body = await response.json()
        spec.validate_error(body)
        assert response.headers["retry-after"] == "2"
    assert (await chat(fake, session)).status == 200  # the queue is used up
    assert len(fake.requests) == 3


async def test_custom_error_body_and_api_key(
    aiohttp_server: AiohttpServer, session: aiohttp.ClientSession
) -> None:
    fake = FakeOpenAI(api_key="sk-upstream")
    await fake.start(aiohttp_server)
    error = {"error": {"message": "too long", "type": "invalid_request_error", "param": "messages",
                       "code": "context_length_exceeded"}}  # fmt: skip
    fake.script(status=400, error=error)
    url = f"{fake.base_url}/chat/completions"
    async with session.post(url, json=HELLO) as response:
        assert response.status == 401
        assert (await response.json())["error"]["code"] == "invalid_api_key"
    auth = {"Authorization": "Bearer sk-upstream"}
    async with session.post(url, json=HELLO, headers=auth) as response:
        assert (response.status, await response.json()) == (400, error)
    async with session.get(f"{fake.base_url}/models", headers=auth) as response:
        models = await response.json()
        spec.validate_models_list(models)
        assert [m["id"] for m in models["data"]] == ["gpt-4o-mini", "gpt-4o"]
    assert fake.requests[-1].json is None


async def test_drop_mid_stream(fake: FakeOpenAI, session: aiohttp.ClientSession) -> None:
    fake.script(drop_after=2)
    async with session.post(
        f"{fake.base_url}/chat/completions", json=HELLO | {"stream": True}
    ) as r:
        assert r.status == 200
        first = await r.content.readuntil(b"\n\n")
        assert json.loads(first[6:])["choices"][0]["delta"]["role"] == "assistant"
        with pytest.raises(aiohttp.ClientPayloadError):
            await r.read()


async def test_drop_before_response(fake: FakeOpenAI, session: aiohttp.ClientSession) -> None:
    fake.script(drop_before_response=True)
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await chat(fake, session)
    assert (await chat(fake, session)).status == 200


async def test_mid_stream_error_event(fake: FakeOpenAI, session: aiohttp.ClientSession) -> None:
    fake.script(error_after=3)
    chunks, done = sse(await (await chat(fake, session, stream=True)).read())
    assert not done
    assert len(chunks) == 4
    spec.validate_error(chunks[-1])
    with pytest.raises(AssertionError, match="mid-stream error"):
        spec.validate_chat_stream(chunks)


async def test_very_long_line(fake: FakeOpenAI, session: aiohttp.ClientSession) -> None:
    fake.script(content="x" * 1_000_000)  # no spaces: one content chunk
    body = await (await chat(fake, session, stream=True)).read()
    assert max(len(line) for line in body.split(b"\n")) > 1_000_000
    chunks, done = sse(body)
    assert done
    assert streamed_text(chunks) == "x" * 1_000_000


async def test_delays(fake: FakeOpenAI, session: aiohttp.ClientSession) -> None:
    fake.always(delay_headers=0.1, chunk_delay=0.02)
    start = time.monotonic()
    chunks, done = sse(await (await chat(fake, session, stream=True)).read())
    assert time.monotonic() - start >= 0.1 + 0.02 * (len(chunks) - 1)
    assert done


async def test_hold_answers_only_once_released(
    fake: FakeOpenAI, session: aiohttp.ClientSession
) -> None:
    release = asyncio.Event()
    fake.script(hold=release)
    pending = asyncio.create_task(chat(fake, session))
    await fake.request_seen.wait()
    release.set()
    assert (await pending).status == 200
    rest = asyncio.Event()
    fake.script(hold=rest, hold_after=2)
    response = await session.post(
        f"{fake.base_url}/chat/completions", json=HELLO | {"stream": True}
    )
    head = [await response.content.readuntil(b"\n\n") for _ in range(2)]  # before the hold
    rest.set()
    chunks, done = sse(b"".join(head) + await response.read())
    assert done and streamed_text(chunks) == "echo: hello there"


async def test_client_disconnect_is_noticed(
    fake: FakeOpenAI, session: aiohttp.ClientSession
) -> None:
    fake.always(hold=asyncio.Event(), hold_after=1)  # the stream stops after one chunk
    response = await session.post(
        f"{fake.base_url}/chat/completions", json=HELLO | {"stream": True}
    )
    await response.content.readuntil(b"\n\n")
    assert not fake.client_disconnected.is_set()
    response.close()  # hang up mid-stream
    async with asyncio.timeout(NEVER_HANG):
        await fake.client_disconnected.wait()


async def test_client_timeout_before_headers_is_noticed(
    fake: FakeOpenAI, session: aiohttp.ClientSession
) -> None:
    fake.always(hold=asyncio.Event())  # never answers
    # A client that gives up before the headers, by asyncio's timeout: aiohttp's own total
    # timeout raised a CancelledError instead of its TimeoutError once under load (its timer
    # fired as the request left the block it watches).
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.1):
            await session.post(f"{fake.base_url}/chat/completions", json=HELLO)
    async with asyncio.timeout(NEVER_HANG):
        await fake.client_disconnected.wait()
