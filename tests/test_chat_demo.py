"""Chat completions against the offline demo model, driven by the official openai client."""

from __future__ import annotations

import json
from typing import Any

import openai
import pytest
from aiohttp.test_utils import TestClient

from tests.conftest import create_key, openai_client, usage_rows

WEATHER_TOOL: Any = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get weather by city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["city"],
        },
    },
}


async def test_non_streaming_reply(oai: openai.AsyncOpenAI) -> None:
    resp = await oai.chat.completions.create(
        model="demo", messages=[{"role": "user", "content": "Hello there"}]
    )
    assert resp.object == "chat.completion"
    assert resp.choices[0].message.role == "assistant"
    assert resp.choices[0].message.content == "You said: Hello there"
    assert resp.choices[0].finish_reason == "stop"
    assert resp.usage is not None
    assert resp.usage.completion_tokens == 4
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + 4
    assert resp.model == "demo"


async def test_streaming_reply_accumulates_to_the_same_text(oai: openai.AsyncOpenAI) -> None:
    stream = await oai.chat.completions.create(
        model="demo",
        messages=[{"role": "user", "content": "Count to three"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [c async for c in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "You said: Count to three"
    assert chunks[0].choices[0].delta.role == "assistant"
    finish = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finish == ["stop"]
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 5


async def test_stream_helper_of_the_sdk(oai: openai.AsyncOpenAI) -> None:
    async with oai.chat.completions.stream(
        model="demo", messages=[{"role": "user", "content": "hi"}]
    ) as stream:
        final = await stream.get_final_completion()
    assert final.choices[0].message.content == "You said: hi"


async def test_tool_call_and_round_trip(oai: openai.AsyncOpenAI) -> None:
    messages: list[Any] = [{"role": "user", "content": "Paris"}]
    first = await oai.chat.completions.create(model="demo", messages=messages, tools=[WEATHER_TOOL])
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    call = choice.message.tool_calls[0]  # type: ignore[index]
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris", "days": 1}
    messages += [
        choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": '{"temp_c": 21}'},
    ]
    second = await oai.chat.completions.create(
        model="demo", messages=messages, tools=[WEATHER_TOOL]
    )
    assert second.choices[0].message.content == 'The tool returned: {"temp_c": 21}'


async def test_streamed_tool_call_fragments_accumulate(oai: openai.AsyncOpenAI) -> None:
    async with oai.chat.completions.stream(
        model="demo",
        messages=[{"role": "user", "content": "Rome"}],
        tools=[WEATHER_TOOL],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    ) as stream:
        final = await stream.get_final_completion()
    call = final.choices[0].message.tool_calls[0]  # type: ignore[index]
    assert call.id.startswith("call_")
    assert json.loads(call.function.arguments)["city"] == "Rome"
    assert final.choices[0].finish_reason == "tool_calls"


async def test_tool_choice_none_answers_in_text(oai: openai.AsyncOpenAI) -> None:
    resp = await oai.chat.completions.create(
        model="demo",
        messages=[{"role": "user", "content": "x"}],
        tools=[WEATHER_TOOL],
        tool_choice="none",
    )
    assert resp.choices[0].message.content == "You said: x"


async def test_json_mode_and_json_schema(oai: openai.AsyncOpenAI) -> None:
    resp = await oai.chat.completions.create(
        model="demo",
        messages=[{"role": "user", "content": "ok"}],
        response_format={"type": "json_object"},
    )
    assert json.loads(resp.choices[0].message.content or "") == {"reply": "ok"}
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string"}, "n": {"type": "integer"}},
        "required": ["name", "n"],
    }
    resp = await oai.chat.completions.create(
        model="demo",
        messages=[{"role": "user", "content": "Ada"}],
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "person", "schema": schema, "strict": True},
        },
    )
    assert json.loads(resp.choices[0].message.content or "") == {"name": "Ada", "n": 1}


async def test_max_tokens_stop_and_n(oai: openai.AsyncOpenAI) -> None:
    resp = await oai.chat.completions.create(
        model="demo", messages=[{"role": "user", "content": "a b c d e f"}], max_tokens=3
    )
    assert resp.choices[0].message.content == "You said: a"  # three words
    assert resp.choices[0].finish_reason == "length"
    resp = await oai.chat.completions.create(
        model="demo", messages=[{"role": "user", "content": "a b STOP c"}], stop=["STOP"], n=2
    )
    assert [c.message.content for c in resp.choices] == ["You said: a b ", "You said: a b "]
    assert [c.index for c in resp.choices] == [0, 1]


async def test_multimodal_user_content_is_accepted(oai: openai.AsyncOpenAI) -> None:
    resp = await oai.chat.completions.create(
        model="demo",
        messages=[
            {"role": "system", "content": "be brief"},
            {"role": "developer", "content": [{"type": "text", "text": "really"}]},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is this?"},
                    {
                        "type": "image_url",
                        "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="},
                    },
                ],
            },
        ],
    )
    assert resp.choices[0].message.content == "You said: What is this?"


async def test_usage_is_recorded_per_request(
    gateway: TestClient[Any, Any], oai: openai.AsyncOpenAI
) -> None:
    await oai.chat.completions.create(model="demo", messages=[{"role": "user", "content": "one"}])
    stream = await oai.chat.completions.create(
        model="demo", messages=[{"role": "user", "content": "two"}], stream=True
    )
    async for _ in stream:
        pass
    rows = await usage_rows(gateway)
    assert [(r["model"], r["provider"], r["stream"], r["status"]) for r in rows] == [
        ("demo", "demo", 0, 200),
        ("demo", "demo", 1, 200),
    ]
    assert all(r["completion_tokens"] == 3 and r["key_id"] for r in rows)
    assert all(r["request_id"].startswith("req_") and r["latency_ms"] > 0 for r in rows)
    assert all(r["ttft_ms"] is not None for r in rows)


# ---- errors as the SDK sees them -------------------------------------------------------------


async def test_bad_key_is_authentication_error(gateway: TestClient[Any, Any]) -> None:
    async with openai_client(gateway, "sk-kiosk-wrong") as client:
        with pytest.raises(openai.AuthenticationError) as info:
            await client.chat.completions.create(
                model="demo", messages=[{"role": "user", "content": "x"}]
            )
    assert info.value.code == "invalid_api_key"
    assert info.value.request_id and info.value.request_id.startswith("req_")


async def test_revoked_and_expired_keys_are_refused(gateway: TestClient[Any, Any]) -> None:
    expired = await create_key(gateway, expires_at=1.0)
    async with openai_client(gateway, expired) as client:
        with pytest.raises(openai.AuthenticationError, match="expired"):
            await client.models.list()


async def test_model_outside_allow_list_is_permission_denied(gateway: TestClient[Any, Any]) -> None:
    limited = await create_key(gateway, models=["other"])
    async with openai_client(gateway, limited) as client:
        with pytest.raises(openai.PermissionDeniedError) as info:
            await client.chat.completions.create(
                model="demo", messages=[{"role": "user", "content": "x"}]
            )
    assert info.value.code == "model_not_allowed"


async def test_unknown_model_is_not_found(oai: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        await oai.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    assert info.value.code == "model_not_found"
    assert "nope" in info.value.message


async def test_bad_field_is_bad_request_naming_it(oai: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        await oai.chat.completions.create(
            model="demo", messages=[{"role": "user", "content": "x"}], temperature=5
        )
    assert info.value.param == "temperature"
    assert "temperature" in info.value.message


async def test_reasoning_effort_refused_for_non_reasoning_model(oai: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        await oai.chat.completions.create(
            model="demo", messages=[{"role": "user", "content": "x"}], reasoning_effort="low"
        )
    assert info.value.param == "reasoning_effort"
    with pytest.raises(openai.BadRequestError) as info:
        await oai.chat.completions.create(
            model="demo",
            messages=[{"role": "user", "content": "x"}],
            extra_body={"thinking": {"type": "enabled", "budget_tokens": 1024}},
        )
    assert info.value.param == "thinking"
