"""The Messages API translation to chat and back, as pure functions (no network)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import pydantic
import pytest
from anthropic.types import Message, RawMessageStreamEvent

from gateway.errors import InvalidRequest, UpstreamError
from gateway.messages import MessageEvents, from_completion, to_chat
from gateway.messages.reply import tool_input
from gateway.messages.request import effort
from gateway.messages.schema import MessagesRequest
from gateway.providers.base import ChatCall
from gateway.schemas.codec import decode_body, raw_fields
from gateway.schemas.common import PromptTokensDetails, Usage
from gateway.settings import ModelConfig, Target

PNG = "iVBORw0KGgo="
MODEL = ModelConfig(name="m", targets=(Target(provider="p", model="up"),))
EVENT = pydantic.TypeAdapter(RawMessageStreamEvent)


def request(**fields: Any) -> MessagesRequest:
    body = {"model": "m", "max_tokens": 100, "messages": [{"role": "user", "content": "hi"}]}
    return decode_body(json.dumps(body | fields).encode(), MessagesRequest)


def chat(reasoning: bool = False, **fields: Any) -> dict[str, Any]:
    translation = to_chat(request(**fields), reasoning=reasoning)
    assert translation.refusal is None, translation.refusal
    return {k: json.loads(bytes(v)) for k, v in raw_fields(translation.chat).items()}


def refusal(**fields: Any) -> InvalidRequest:
    found = to_chat(request(**fields), reasoning=False).refusal
    assert found is not None
    return found


def test_a_conversation_with_tools() -> None:
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}}
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "Weather?"}, image]},
        {
            "role": "assistant",
            "content": [
                {"type": "thinking", "thinking": "Hmm.", "signature": "c2ln"},
                {"type": "text", "text": "Checking."},
                {
                    "type": "tool_use",
                    "id": "toolu_1",
                    "name": "get_weather",
                    "input": {"city": "Paris"},
                },
            ],
        },
        {
            "role": "user",
            "content": [
                {
                    "type": "tool_result",
                    "tool_use_id": "toolu_1",
                    "content": [{"type": "text", "text": "21C"}, image],
                },
                {"type": "text", "text": "Thanks", "cache_control": {"type": "ephemeral"}},
            ],
        },
    ]
    out = chat(
        system=[{"type": "text", "text": "Be terse."}, {"type": "text", "text": "Be kind."}],
        messages=messages,
        tools=[{"name": "get_weather", "description": "d", "input_schema": {"type": "object"}}],
        tool_choice={"type": "any", "disable_parallel_tool_use": True},
        stop_sequences=["END"],
        temperature=0.5,
        metadata={"user_id": "u1"},
    )
    data_url = f"data:image/png;base64,{PNG}"
    assert out["messages"] == [
        {"role": "system", "content": "Be terse.\nBe kind."},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Weather?"},
                {"type": "image_url", "image_url": {"url": data_url}},
            ],
        },
        {
            "role": "assistant",
            "content": "Checking.",
            "tool_calls": [
                {
                    "id": "toolu_1",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                    "type": "function",
                }
            ],
        },
        {"role": "tool", "content": "21C", "tool_call_id": "toolu_1"},
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": data_url}},
                {"type": "text", "text": "Thanks"},
            ],
        },
    ]
    assert out["tools"] == [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "d",
                "parameters": {"type": "object"},
            },
        }
    ]
    assert out["tool_choice"] == "required" and out["parallel_tool_calls"] is False
    assert (out["stop"], out["temperature"], out["user"], out["max_tokens"]) == (
        ["END"],
        0.5,
        "u1",
        100,
    )


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        ({"type": "auto"}, "auto"),
        ({"type": "none"}, "none"),
        ({"type": "tool", "name": "f"}, {"type": "function", "function": {"name": "f"}}),
    ],
)
def test_tool_choice(choice: dict[str, Any], expected: Any) -> None:
    out = chat(tools=[{"name": "f", "input_schema": {"type": "object"}}], tool_choice=choice)
    assert out["tool_choice"] == expected and "parallel_tool_calls" not in out


def test_documents() -> None:
    pdf = {
        "type": "document",
        "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBE"},
        "title": "a.pdf",
    }
    text = {
        "type": "document",
        "source": {"type": "text", "media_type": "text/plain", "data": "plain"},
    }
    nested = {
        "type": "document",
        "source": {"type": "content", "content": [{"type": "text", "text": "inner"}]},
    }
    url = {"type": "image", "source": {"type": "url", "url": "https://x.test/a.png"}}
    out = chat(messages=[{"role": "user", "content": [pdf, text, nested, url]}])
    assert out["messages"][0]["content"] == [
        {
            "type": "file",
            "file": {"file_data": "data:application/pdf;base64,JVBE", "filename": "a.pdf"},
        },
        {"type": "text", "text": "plain"},
        {"type": "text", "text": "inner"},
        {"type": "image_url", "image_url": {"url": "https://x.test/a.png"}},
    ]


def test_thinking_becomes_reasoning_effort_only_for_reasoning_models() -> None:
    enabled = {"type": "enabled", "budget_tokens": 1024}
    assert chat(reasoning=True, thinking=enabled)["reasoning_effort"] == "low"
    assert "reasoning_effort" not in chat(reasoning=False, thinking=enabled)
    assert "reasoning_effort" not in chat(reasoning=True, thinking={"type": "adaptive"})
    assert [effort(b) for b in (1024, 2048, 4096, 16000)] == ["low", "medium", "medium", "high"]
    out = chat(
        reasoning=True,
        output_config={
            "effort": "high",
            "format": {"type": "json_schema", "schema": {"type": "object"}},
        },
    )
    assert out["reasoning_effort"] == "high"
    assert out["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "output", "schema": {"type": "object"}, "strict": True},
    }


def test_streams_ask_for_usage() -> None:
    out = chat(stream=True)
    assert out["stream"] is True and out["stream_options"] == {"include_usage": True}


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"tools": [{"type": "bash_20250124", "name": "bash"}]}, "tools[0]"),
        ({"tools": [{"name": "bad name!", "input_schema": {"type": "object"}}]}, "tools[0]"),
        ({"tools": [{"type": "mcp_toolset", "mcp_server_name": "x"}]}, "tools[0]"),
        ({"top_k": 3}, "top_k"),
        ({"container": "c1"}, "container"),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "image", "source": {"type": "file", "file_id": "f"}}],
                    }
                ]
            },
            "messages[0].content[0].source",
        ),
        (
            {
                "messages": [
                    {
                        "role": "assistant",
                        "content": [
                            {
                                "type": "server_tool_use",
                                "id": "s",
                                "name": "web_search",
                                "input": {},
                            }
                        ],
                    }
                ]
            },
            "messages[0].content[0].type",
        ),
    ],
)
def test_what_chat_cannot_express_is_a_refusal(fields: dict[str, Any], param: str) -> None:
    err = refusal(**fields)
    assert err.param == param and err.code == "unsupported_parameter"


def test_malformed_blocks_are_400s() -> None:
    missing = [{"role": "user", "content": [{"type": "image"}]}]
    with pytest.raises(InvalidRequest) as err:
        to_chat(request(messages=missing), reasoning=False)
    assert err.value.param == "messages[0].content[0].source"
    bad = [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": 5}]}]
    with pytest.raises(InvalidRequest) as err:
        to_chat(request(messages=bad), reasoning=False)
    assert err.value.param == "messages[0].content[0].content"
    only_thinking = [
        {"role": "assistant", "content": [{"type": "thinking", "thinking": "x", "signature": "s"}]}
    ]
    with pytest.raises(InvalidRequest) as err:
        to_chat(request(messages=only_thinking), reasoning=False)
    assert err.value.param == "messages"


def completion(
    message: dict[str, Any], finish: str = "stop", usage: dict[str, Any] | None = None
) -> bytes:
    body = {
        "id": "chatcmpl-abc",
        "object": "chat.completion",
        "created": 1,
        "model": "up",
        "choices": [
            {"index": 0, "message": {"role": "assistant"} | message, "finish_reason": finish}
        ],
    }
    if usage is not None:
        body["usage"] = usage
    return json.dumps(body).encode()


def test_a_completion_as_a_message() -> None:
    calls = [
        {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}},
        {"id": "call_2", "type": "function", "function": {"name": "g", "arguments": "not json"}},
    ]
    usage = {
        "prompt_tokens": 10,
        "completion_tokens": 5,
        "total_tokens": 15,
        "prompt_tokens_details": {"cached_tokens": 4},
    }
    body = json.loads(
        from_completion(
            completion(
                {"content": "Hi", "reasoning_content": "Hmm", "tool_calls": calls},
                "tool_calls",
                usage,
            ),
            estimate=99,
        )
    )
    Message.model_validate(body)
    assert body["id"] == "msg_abc" and body["stop_reason"] == "tool_use"
    assert [b["type"] for b in body["content"]] == ["thinking", "text", "tool_use", "tool_use"]
    assert body["content"][2]["input"] == {"a": 1} and body["content"][3]["input"] == {}
    assert body["usage"] == {
        "input_tokens": 6,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 4,
        "output_tokens": 5,
    }
    cut = json.loads(from_completion(completion({"content": "x"}, "length"), estimate=7))
    assert cut["stop_reason"] == "max_tokens" and cut["usage"]["input_tokens"] == 7
    filtered = json.loads(from_completion(completion({"content": None}, "content_filter"), 1))
    assert filtered["stop_reason"] == "refusal" and filtered["content"] == []
    with pytest.raises(UpstreamError):
        from_completion(b"{]", 1)
    assert bytes(tool_input("[1]")) == b"{}"


def chunk(delta: dict[str, Any] | None = None, finish: str | None = None, **extra: Any) -> bytes:
    choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}]
    body = {
        "id": "chatcmpl-s",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "up",
        "choices": choices,
    }
    return json.dumps(body | extra).encode()


async def translate(batches: list[list[bytes]], usage: Usage | None = None) -> list[dict[str, Any]]:
    call = ChatCall(request=to_chat(request(), reasoning=False).chat, model=MODEL, usage=usage)
    converter = MessageEvents(call, estimate=12)

    async def source() -> AsyncIterator[list[bytes]]:
        for batch in batches:
            yield batch

    frames = [f async for batch in converter.events(source()) for f in batch]
    events = []
    for frame in frames:
        name, data = frame.decode().rstrip("\n").split("\n", 1)
        event = json.loads(data.removeprefix("data: "))
        assert name == f"event: {event['type']}"
        if event["type"] != "ping":
            EVENT.validate_python(event)
        events.append(event)
    return events


async def test_stream_blocks_one_at_a_time() -> None:
    events = await translate(
        [
            [chunk({"role": "assistant", "content": ""}), chunk({"reasoning_content": "Hm"})],
            [chunk({"content": "Hi"}), chunk({"refusal": "!"})],
            [
                chunk(
                    {
                        "tool_calls": [
                            {
                                "index": 0,
                                "id": "call_a",
                                "type": "function",
                                "function": {"arguments": '{"x"'},
                            }
                        ]
                    }
                ),
                chunk(
                    {"tool_calls": [{"index": 0, "function": {"name": "f", "arguments": ": 1}"}}]}
                ),
                chunk(
                    {
                        "tool_calls": [
                            {
                                "index": 1,
                                "id": "call_b",
                                "function": {"name": "g", "arguments": "{}"},
                            }
                        ]
                    }
                ),
            ],
            [chunk({}, "tool_calls")],
        ],
        usage=Usage(
            prompt_tokens=20,
            completion_tokens=8,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=5),
        ),
    )
    kinds = [e["type"] for e in events]
    assert kinds == [
        "message_start",
        "content_block_start", "ping", "content_block_delta", "content_block_stop",
        "content_block_start", "content_block_delta", "content_block_delta", "content_block_stop",
        "content_block_start", "content_block_delta", "content_block_stop",
        "content_block_start", "content_block_delta", "content_block_stop",
        "message_delta", "message_stop",
    ]  # fmt: skip
    assert events[0]["message"]["usage"] == {"input_tokens": 12, "output_tokens": 0}
    starts = [e["content_block"] for e in events if e["type"] == "content_block_start"]
    assert starts == [
        {"type": "thinking", "thinking": "", "signature": ""},
        {"type": "text", "text": ""},
        {"type": "tool_use", "id": "call_a", "name": "f", "input": {}},
        {"type": "tool_use", "id": "call_b", "name": "g", "input": {}},
    ]
    arguments = [e["delta"]["partial_json"] for e in events if e.get("index") == 2 and "delta" in e]
    assert "".join(arguments) == '{"x": 1}'
    assert events[-2]["delta"] == {"stop_reason": "tool_use", "stop_sequence": None}
    assert events[-2]["usage"] == {
        "input_tokens": 15,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 5,
        "output_tokens": 8,
    }


async def test_stream_without_usage_or_content() -> None:
    events = await translate([[chunk({"content": "a"}), chunk({"content": "b"})]])
    assert events[-2]["delta"]["stop_reason"] == "end_turn"
    assert events[-2]["usage"]["output_tokens"] == 0  # nothing counted: the call saw no chunks
    empty = await translate([[chunk({}, "stop")]])
    assert [e["type"] for e in empty] == ["message_start", "message_delta", "message_stop"]
    nameless = await translate(
        [[chunk({"tool_calls": [{"index": 0, "function": {"arguments": "{}"}}]})]]
    )
    assert nameless[1]["content_block"]["name"] == ""  # still a block, with what it got


async def test_a_malformed_chunk_fails_after_what_came_before() -> None:
    call = ChatCall(request=to_chat(request(), reasoning=False).chat, model=MODEL)
    converter = MessageEvents(call, estimate=1)

    async def source() -> AsyncIterator[list[bytes]]:
        yield [chunk({"content": "ok"}), b"{not json"]

    got: list[list[bytes]] = []
    with pytest.raises(UpstreamError):
        async for batch in converter.events(source()):
            got.append(batch)
    assert b"text_delta" in b"".join(got[0])
    assert msgspec.json.decode(got[0][0].split(b"data: ", 1)[1])["type"] == "message_start"


async def test_interleaved_tool_calls_are_refused() -> None:
    def call(index: int, **function: str) -> bytes:
        return chunk({"tool_calls": [{"index": index, "function": function}]})

    batch = [call(0, name="f", arguments="{"), call(1, name="g"), call(0, arguments="}")]
    with pytest.raises(UpstreamError):
        await translate([batch])
