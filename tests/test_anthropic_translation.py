"""OpenAI ⇄ Anthropic translation as pure functions: no network, one rule per test."""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest

from gateway.errors import InvalidRequest, UpstreamBadResponse, UpstreamError, UpstreamUnavailable
from gateway.providers.anthropic.request import JSON_TOOL, JsonTool, to_anthropic, tool_id
from gateway.providers.anthropic.response import (
    BLOCK_STATE_SIZE,
    AnthropicStream,
    UsageTally,
    from_anthropic,
)
from gateway.providers.anthropic.wire import AnthropicResponse
from gateway.providers.base import ChatCall
from gateway.schemas.chat import ChatCompletionRequest
from gateway.schemas.codec import decode_body
from gateway.settings import ModelConfig, Target

MODEL = ModelConfig(name="c", targets=(Target(provider="a", model="claude-x"),))
THINKER = ModelConfig(name="t", targets=(Target(provider="a", model="claude-x"),), reasoning=True)


def make_call(body: dict[str, Any], model: ModelConfig = MODEL) -> ChatCall:
    body = {"model": model.name} | body
    raw = json.dumps(body).encode()
    return ChatCall(
        request=decode_body(raw, ChatCompletionRequest),
        body=raw,
        model=model,
        upstream_model="claude-x",
    )


def translate(body: dict[str, Any], model: ModelConfig = MODEL, **kw: Any) -> dict[str, Any]:
    request, _ = to_anthropic(make_call(body, model), 4096, **kw)
    out: dict[str, Any] = json.loads(msgspec.json.encode(request))
    return out


def user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


def test_system_and_developer_messages_become_top_level_system() -> None:
    out = translate(
        {
            "messages": [
                {"role": "system", "content": "Be terse."},
                user("hi"),
                {"role": "developer", "content": [{"type": "text", "text": "Use JSON."}]},
            ]
        }
    )
    assert out["system"] == [
        {"type": "text", "text": "Be terse."},
        {"type": "text", "text": "Use JSON."},
    ]
    assert out["messages"] == [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    assert out["max_tokens"] == 4096  # required by Anthropic: the provider default


def test_model_default_max_tokens_wins_over_the_provider_default() -> None:
    model = ModelConfig(name="c", targets=MODEL.targets, max_tokens=333)
    assert translate({"messages": [user("hi")]}, model)["max_tokens"] == 333
    assert (
        translate({"messages": [user("hi")], "max_completion_tokens": 9}, model)["max_tokens"] == 9
    )


def test_consecutive_turns_merge_and_tool_results_come_first() -> None:
    out = translate(
        {
            "messages": [
                user("one"),
                user("two"),
                {
                    "role": "assistant",
                    "content": "calling",
                    "tool_calls": [
                        {
                            "id": "call_1",
                            "type": "function",
                            "function": {"name": "f", "arguments": "{}"},
                        },
                        {
                            "id": "call_2",
                            "type": "function",
                            "function": {"name": "g", "arguments": ""},
                        },
                    ],
                },
                {"role": "tool", "tool_call_id": "call_1", "content": "r1"},
                user("and then?"),
                {
                    "role": "tool",
                    "tool_call_id": "call_2",
                    "content": [{"type": "text", "text": "r2"}],
                },
            ],
            "tools": [
                {"type": "function", "function": {"name": "f"}},
                {"type": "function", "function": {"name": "g", "parameters": {"type": "object"}}},
            ],
        }
    )
    roles = [m["role"] for m in out["messages"]]
    assert roles == ["user", "assistant", "user"]
    assert [b["text"] for b in out["messages"][0]["content"]] == ["one", "two"]
    assistant = out["messages"][1]["content"]
    assert [b["type"] for b in assistant] == ["text", "tool_use", "tool_use"]
    assert assistant[2]["input"] == {}
    last = out["messages"][2]["content"]
    assert [b["type"] for b in last] == ["tool_result", "tool_result", "text"]
    assert [b.get("tool_use_id") for b in last[:2]] == ["call_1", "call_2"]
    assert out["tools"][0]["input_schema"] == {"type": "object", "properties": {}}


def test_foreign_tool_ids_are_rewritten_alike_for_calls_and_results() -> None:
    odd = "call_abc__thought__c2lnbmF0dXJl+/="
    assert tool_id(odd) == "call_abc"
    assert tool_id("fc.1:2") == tool_id("fc.1:2")
    assert all(ch.isalnum() or ch in "_-" for ch in tool_id("fc.1:2"))
    assert tool_id("call_ok-1") == "call_ok-1"


def test_tool_history_without_tools_declares_them_and_forbids_new_calls() -> None:
    out = translate(
        {
            "messages": [
                user("q"),
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": "c1",
                            "type": "function",
                            "function": {"name": "lookup", "arguments": "{}"},
                        }
                    ],
                },
                {"role": "tool", "tool_call_id": "c1", "content": "42"},
            ]
        }
    )
    assert [t["name"] for t in out["tools"]] == ["lookup"]
    assert out["tool_choice"] == {"type": "none"}


def test_conversation_starting_with_assistant_gets_a_user_turn_and_prefill_is_trimmed() -> None:
    out = translate({"messages": [{"role": "assistant", "content": "Sure:  "}]})
    assert out["messages"][0] == {"role": "user", "content": [{"type": "text", "text": "."}]}
    assert out["messages"][1]["content"] == [{"type": "text", "text": "Sure:"}]


def test_empty_conversation_is_a_400() -> None:
    with pytest.raises(InvalidRequest) as err:
        translate({"messages": [{"role": "system", "content": "x"}, user("  ")]})
    assert err.value.param == "messages"


@pytest.mark.parametrize(
    ("field", "value", "param"),
    [
        ("n", 2, "n"),
        ("logprobs", True, "logprobs"),
        ("top_logprobs", 3, "top_logprobs"),
        ("seed", 7, "seed"),
        ("presence_penalty", 0.5, "presence_penalty"),
        ("frequency_penalty", -1, "frequency_penalty"),
        ("logit_bias", {"42": 3}, "logit_bias"),
        ("modalities", ["text", "audio"], "modalities"),
        ("functions", [{"name": "f"}], "functions"),
    ],
)
def test_fields_anthropic_cannot_honour_are_a_400(field: str, value: Any, param: str) -> None:
    with pytest.raises(InvalidRequest) as err:
        translate({"messages": [user("hi")], field: value})
    assert err.value.param == param
    assert err.value.code == "unsupported_parameter"
    assert "Anthropic" in err.value.message


def test_neutral_values_of_unsupported_fields_pass() -> None:
    out = translate(
        {
            "messages": [user("hi")],
            "n": 1,
            "presence_penalty": 0,
            "logprobs": False,
            "top_logprobs": 0,
            "logit_bias": {},
        }
    )
    assert "n" not in out and "top_logprobs" not in out


def test_sampling_stop_and_user() -> None:
    out = translate(
        {
            "messages": [user("hi")],
            "temperature": 1.7,
            "top_p": 0.9,
            "stop": ["END", " ", "\n"],
            "user": "u-1",
        }
    )
    assert out["temperature"] == 1.0  # Anthropic's range ends at 1
    assert "top_p" not in out  # recent models refuse both together: temperature wins
    assert translate({"messages": [user("hi")], "top_p": 0.9})["top_p"] == 0.9
    assert out["stop_sequences"] == ["END"]  # whitespace-only sequences are refused upstream
    assert out["metadata"] == {"user_id": "u-1"}


@pytest.mark.parametrize(
    ("choice", "parallel", "expected"),
    [
        ("auto", None, {"type": "auto"}),
        ("none", None, {"type": "none"}),
        ("required", None, {"type": "any"}),
        ("required", False, {"type": "any", "disable_parallel_tool_use": True}),
        ({"type": "function", "function": {"name": "f"}}, None, {"type": "tool", "name": "f"}),
        (None, False, {"type": "auto", "disable_parallel_tool_use": True}),
    ],
)
def test_tool_choice(choice: Any, parallel: bool | None, expected: dict[str, Any]) -> None:
    body: dict[str, Any] = {
        "messages": [user("hi")],
        "tools": [{"type": "function", "function": {"name": "f"}}],
    }
    if choice is not None:
        body["tool_choice"] = choice
    if parallel is not None:
        body["parallel_tool_calls"] = parallel
    assert translate(body)["tool_choice"] == expected


def test_tool_choice_without_tools_is_a_400() -> None:
    with pytest.raises(InvalidRequest) as err:
        translate({"messages": [user("hi")], "tool_choice": "auto"})
    assert err.value.param == "tool_choice"


def test_bad_tool_arguments_are_a_400_naming_the_field() -> None:
    with pytest.raises(InvalidRequest) as err:
        translate(
            {
                "messages": [
                    user("q"),
                    {
                        "role": "assistant",
                        "tool_calls": [
                            {
                                "id": "c",
                                "type": "function",
                                "function": {"name": "f", "arguments": "[1]"},
                            }
                        ],
                    },
                ]
            }
        )
    assert err.value.param == "messages[1].tool_calls[0].function.arguments"


def test_images_documents_and_their_limits() -> None:
    out = translate(
        {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,AAAA"}},
                        {"type": "image_url", "image_url": {"url": "https://x.test/a.png"}},
                        {"type": "file", "file": {"file_data": "data:application/pdf;base64,JVBE"}},
                    ],
                }
            ]
        }
    )
    blocks = out["messages"][0]["content"]
    assert blocks[0]["source"] == {"type": "base64", "media_type": "image/jpeg", "data": "AAAA"}
    assert blocks[1]["source"] == {"type": "url", "url": "https://x.test/a.png"}
    assert blocks[2]["type"] == "document"
    for url, param in [
        ("data:image/tiff;base64,AAAA", "messages[0].content[0].image_url.url"),
        ("ftp://x.test/a.png", "messages[0].content[0].image_url.url"),
    ]:
        with pytest.raises(InvalidRequest) as err:
            translate(
                {
                    "messages": [
                        {
                            "role": "user",
                            "content": [{"type": "image_url", "image_url": {"url": url}}],
                        }
                    ]
                }
            )
        assert err.value.param == param
    with pytest.raises(InvalidRequest, match="audio"):
        translate(
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "input_audio", "input_audio": {"data": "AA", "format": "wav"}}
                        ],
                    }
                ]
            }
        )


def test_json_mode_is_a_forced_tool_without_other_tools() -> None:
    request, json_tool = to_anthropic(
        make_call({"messages": [user("hi")], "response_format": {"type": "json_object"}}), 100
    )
    out = json.loads(msgspec.json.encode(request))
    assert json_tool
    assert out["tools"][0]["name"] == JSON_TOOL
    assert out["tool_choice"] == {"type": "tool", "name": JSON_TOOL}


def test_json_schema_with_tools_uses_native_structured_output() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "string"}}}
    request, json_tool = to_anthropic(
        make_call(
            {
                "messages": [user("hi")],
                "tools": [{"type": "function", "function": {"name": "f"}}],
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": schema},
                },
            }
        ),
        100,
    )
    out = json.loads(msgspec.json.encode(request))
    assert not json_tool
    strict = schema | {"additionalProperties": False}  # what Anthropic's structured output needs
    assert out["output_config"] == {"format": {"type": "json_schema", "schema": strict}}
    assert [t["name"] for t in out["tools"]] == ["f"]


def test_reasoning_effort_becomes_a_thinking_budget() -> None:
    out = translate(
        {"messages": [user("hi")], "reasoning_effort": "high", "temperature": 0.2}, THINKER
    )
    assert out["thinking"] == {"type": "enabled", "budget_tokens": 4096}
    assert out["max_tokens"] == 4096 + 4096  # the default answer room comes on top
    assert "temperature" not in out  # thinking forbids sampling changes
    limited = translate(
        {"messages": [user("hi")], "reasoning_effort": "high", "max_tokens": 3000}, THINKER
    )
    assert limited["thinking"] == {"type": "enabled", "budget_tokens": 2999}
    assert limited["max_tokens"] == 3000
    off = translate({"messages": [user("hi")], "reasoning_effort": "none"}, THINKER)
    assert off["thinking"] == {"type": "disabled"}
    with pytest.raises(InvalidRequest) as err:
        translate({"messages": [user("hi")], "reasoning_effort": "low", "max_tokens": 500}, THINKER)
    assert err.value.param == "max_completion_tokens"


def test_native_thinking_object_passes_through() -> None:
    thinking = {"type": "enabled", "budget_tokens": 2000}
    out = translate({"messages": [user("hi")], "thinking": thinking, "max_tokens": 5000}, THINKER)
    assert out["thinking"] == thinking


def test_thinking_is_skipped_while_a_tool_loop_continues() -> None:
    out = translate(
        {
            "messages": [
                user("q"),
                {
                    "role": "assistant",
                    "tool_calls": [
                        {
                            "id": "c",
                            "type": "function",
                            "function": {"name": "f", "arguments": "{}"},
                        }
                    ],
                },
                {"role": "tool", "tool_call_id": "c", "content": "ok"},
            ],
            "tools": [{"type": "function", "function": {"name": "f"}}],
            "reasoning_effort": "medium",
        },
        THINKER,
    )
    assert "thinking" not in out


def _response(**fields: Any) -> AnthropicResponse:
    body = {"id": "msg_1", "model": "claude-x", "content": [], "stop_reason": "end_turn"} | fields
    return msgspec.json.decode(json.dumps(body), type=AnthropicResponse)


def _translated(resp: AnthropicResponse, json_tool: JsonTool | None) -> tuple[bytes, Any]:
    tally = UsageTally("anthropic")
    tally.merge(resp.usage)
    return from_anthropic(resp, json_tool, tally.counts())


@pytest.mark.parametrize(
    ("stop", "finish"),
    [
        ("end_turn", "stop"),
        ("stop_sequence", "stop"),
        ("max_tokens", "length"),
        ("model_context_window_exceeded", "length"),
        ("tool_use", "tool_calls"),
        ("refusal", "content_filter"),
        ("pause_turn", "stop"),
    ],
)
def test_finish_reasons(stop: str, finish: str) -> None:
    body, _ = _translated(_response(stop_reason=stop), json_tool=None)
    assert json.loads(body)["choices"][0]["finish_reason"] == finish


def test_response_content_thinking_tools_and_cached_usage() -> None:
    resp = _response(
        content=[
            {"type": "thinking", "thinking": "hmm", "signature": "sig"},
            {"type": "text", "text": "Let me check."},
            {"type": "tool_use", "id": "toolu_1", "name": "f", "input": {"x": 1}},
            {"type": "server_tool_use", "id": "srv", "name": "web_search", "input": {}},
        ],
        stop_reason="tool_use",
        usage={
            "input_tokens": 10,
            "output_tokens": 5,
            "cache_read_input_tokens": 100,
            "cache_creation_input_tokens": 20,
        },
    )
    body, usage = _translated(resp, json_tool=None)
    out = json.loads(body)
    msg = out["choices"][0]["message"]
    assert out["id"] == "chatcmpl-msg_1" and out["object"] == "chat.completion"
    assert msg["content"] == "Let me check."
    assert msg["reasoning_content"] == "hmm"
    [call] = msg["tool_calls"]
    assert (call["id"], call["type"], call["function"]["name"]) == ("toolu_1", "function", "f")
    assert json.loads(call["function"]["arguments"]) == {"x": 1}
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (130, 5, 135)
    assert out["usage"]["prompt_tokens_details"]["cached_tokens"] == 100


def _events(*events: dict[str, Any]) -> list[bytes]:
    return [json.dumps(e).encode() for e in events]


START = {
    "type": "message_start",
    "message": {
        "id": "msg_9",
        "model": "claude-x",
        "content": [],
        "usage": {"input_tokens": 7, "output_tokens": 1},
    },
}


def _run(
    call: ChatCall, events: list[bytes], json_tool: JsonTool | None = None
) -> tuple[AnthropicStream, list[dict[str, Any]]]:
    stream = AnthropicStream(call, "a", json_tool)
    out: list[dict[str, Any]] = []
    for data in events:
        out.extend(json.loads(c) for c in stream.feed(data))
    return stream, out


def test_stream_tool_without_arguments_and_thinking() -> None:
    call = make_call(
        {"messages": [user("hi")], "stream": True, "stream_options": {"include_usage": True}}
    )
    stream, chunks = _run(
        call,
        _events(
            {"type": "ping"},
            START,
            {
                "type": "content_block_start",
                "index": 0,
                "content_block": {"type": "thinking", "thinking": ""},
            },
            {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "thinking_delta", "thinking": "hm"},
            },
            {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "signature_delta", "signature": "s"},
            },
            {"type": "content_block_stop", "index": 0},
            {
                "type": "content_block_start",
                "index": 1,
                "content_block": {"type": "tool_use", "id": "t1", "name": "now", "input": {}},
            },
            {"type": "content_block_stop", "index": 1},
            {
                "type": "message_delta",
                "delta": {"stop_reason": "tool_use"},
                "usage": {"output_tokens": 12},
            },
            {"type": "message_stop"},
        ),
    )
    assert stream.done
    # The role goes with the first delta (no role chunk of its own ahead of it).
    assert chunks[0]["choices"][0]["delta"] == {
        "role": "assistant",
        "content": "",
        "refusal": None,
        "reasoning_content": "hm",
    }
    assert chunks[1]["choices"][0]["delta"]["tool_calls"][0]["id"] == "t1"
    assert chunks[2]["choices"][0]["delta"]["tool_calls"] == [
        {"index": 0, "function": {"arguments": "{}"}}
    ]
    assert chunks[3]["choices"][0]["finish_reason"] == "tool_calls"
    assert chunks[4]["choices"] == [] and chunks[4]["usage"]["total_tokens"] == 19
    assert all(c["usage"] is None for c in chunks[:4])
    assert call.usage is not None and call.usage.completion_tokens == 12


def test_stream_json_tool_fragments_become_content() -> None:
    call = make_call({"messages": [user("hi")], "stream": True})
    _, chunks = _run(
        call,
        _events(
            START,
            {
                "type": "content_block_start",
                "index": 0,
                "content_block": {"type": "tool_use", "id": "t", "name": JSON_TOOL, "input": {}},
            },
            {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "input_json_delta", "partial_json": ""},
            },
            {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "input_json_delta", "partial_json": '{"a":'},
            },
            {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "input_json_delta", "partial_json": "1}"},
            },
            {"type": "content_block_stop", "index": 0},
            {
                "type": "message_delta",
                "delta": {"stop_reason": "tool_use"},
                "usage": {"output_tokens": 3},
            },
            {"type": "message_stop"},
        ),
        json_tool=JsonTool(),
    )
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert json.loads(text) == {"a": 1}
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_stream_errors() -> None:
    call = make_call({"messages": [user("hi")], "stream": True})
    overloaded = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
    with pytest.raises(UpstreamUnavailable, match="Overloaded"):
        _run(call, _events(START, overloaded))
    with pytest.raises(UpstreamError, match="invalid"):
        _run(
            call,
            _events(
                START,
                {"type": "error", "error": {"type": "invalid_request_error", "message": "invalid"}},
            ),
        )
    with pytest.raises(UpstreamError, match="before 'message_start'"):
        _run(call, _events({"type": "content_block_stop", "index": 0}))
    with pytest.raises(UpstreamError, match="malformed"):
        _run(call, [b"{nope"])


def test_json_object_with_tools_is_a_400() -> None:
    with pytest.raises(InvalidRequest) as err:
        translate(
            {
                "messages": [user("hi")],
                "tools": [{"type": "function", "function": {"name": "f"}}],
                "response_format": {"type": "json_object"},
            }
        )
    assert err.value.param == "response_format"


def test_json_tool_joins_tools_declared_for_history() -> None:
    out = translate(
        {
            "messages": [
                user("q"),
                {
                    "role": "assistant",
                    "tool_calls": [
                        {
                            "id": "c",
                            "type": "function",
                            "function": {"name": "f", "arguments": "{}"},
                        }
                    ],
                },
                {"role": "tool", "tool_call_id": "c", "content": "1"},
            ],
            "response_format": {"type": "json_object"},
        }
    )
    assert [t["name"] for t in out["tools"]] == ["f", JSON_TOOL]
    assert out["tool_choice"] == {"type": "tool", "name": JSON_TOOL}


def test_thinking_is_off_when_a_tool_is_forced() -> None:
    body = {
        "messages": [user("hi")],
        "tools": [{"type": "function", "function": {"name": "f"}}],
        "tool_choice": "required",
        "reasoning_effort": "high",
        "temperature": 0.3,
    }
    out = translate(body, THINKER)
    assert "thinking" not in out
    assert out["temperature"] == 0.3
    assert "thinking" not in translate(
        {
            "messages": [user("hi")],
            "reasoning_effort": "low",
            "response_format": {"type": "json_object"},
        },
        THINKER,
    )


def test_non_object_json_schema_is_wrapped_and_unwrapped() -> None:
    schema = {"type": "array", "items": {"type": "integer"}}
    call = make_call(
        {
            "messages": [user("hi")],
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "n", "schema": schema},
            },
        }
    )
    request, json_tool = to_anthropic(call, 100)
    out = json.loads(msgspec.json.encode(request))
    assert json_tool == JsonTool(wrapped=True)
    assert out["tools"][0]["input_schema"] == {
        "type": "object",
        "properties": {"values": schema},
        "required": ["values"],
    }
    resp = _response(
        content=[{"type": "tool_use", "id": "t", "name": JSON_TOOL, "input": {"values": [1, 2]}}],
        stop_reason="tool_use",
    )
    body, _ = _translated(resp, json_tool)
    assert json.loads(json.loads(body)["choices"][0]["message"]["content"]) == [1, 2]
    stream_call = make_call({"messages": [user("hi")], "stream": True})
    _, chunks = _run(
        stream_call,
        _events(
            START,
            {
                "type": "content_block_start",
                "index": 0,
                "content_block": {"type": "tool_use", "id": "t", "name": JSON_TOOL, "input": {}},
            },
            {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "input_json_delta", "partial_json": '{"values": [1,'},
            },
            {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "input_json_delta", "partial_json": " 2]}"},
            },
            {"type": "content_block_stop", "index": 0},
            {
                "type": "message_delta",
                "delta": {"stop_reason": "tool_use"},
                "usage": {"output_tokens": 3},
            },
            {"type": "message_stop"},
        ),
        json_tool=json_tool,
    )
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert json.loads(text) == [1, 2]


def test_tool_parameters_must_describe_an_object() -> None:
    out = translate(
        {
            "messages": [user("hi")],
            "tools": [
                {
                    "type": "function",
                    "function": {
                        "name": "f",
                        "parameters": {"properties": {"a": {"type": "string"}}},
                    },
                }
            ],
        }
    )
    assert out["tools"][0]["input_schema"] == {
        "type": "object",
        "properties": {"a": {"type": "string"}},
    }
    with pytest.raises(InvalidRequest) as err:
        translate(
            {
                "messages": [user("hi")],
                "tools": [
                    {"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}
                ],
            }
        )
    assert err.value.param == "tools[0].function.parameters"


def test_strict_schema_for_structured_output() -> None:
    from gateway.providers.anthropic.schema import strict_schema

    schema = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "type": "object",
        "properties": {
            "name": {"type": ["string", "null"], "format": "email"},
            "tags": {"type": "array", "items": {"type": "string"}, "minItems": 3},
            "kind": {"oneOf": [{"type": "string"}, {"type": "integer", "minimum": 1}]},
        },
        "required": ["name"],
        "additionalProperties": True,
    }
    out = json.loads(bytes(strict_schema(msgspec.Raw(json.dumps(schema).encode()), "p")))
    assert out["additionalProperties"] is False
    assert out["properties"]["name"] == {
        "anyOf": [{"type": "string", "format": "email"}, {"type": "null"}]
    }
    assert out["properties"]["tags"]["description"] == "{minItems: 3}"
    assert out["properties"]["kind"]["anyOf"][1] == {
        "type": "integer",
        "description": "{minimum: 1}",
    }
    assert out["required"] == ["name"]
    with pytest.raises(InvalidRequest):
        strict_schema(msgspec.Raw(b"[1]"), "p")


def test_deeply_nested_tool_arguments_are_a_400_not_a_crash() -> None:
    deep = "[" * 5000 + "]" * 5000
    with pytest.raises(InvalidRequest) as err:
        translate(
            {
                "messages": [
                    user("q"),
                    {
                        "role": "assistant",
                        "tool_calls": [
                            {
                                "id": "c",
                                "type": "function",
                                "function": {"name": "f", "arguments": deep},
                            }
                        ],
                    },
                ]
            }
        )
    assert err.value.param == "messages[1].tool_calls[0].function.arguments"


def test_data_urls_with_parameters() -> None:
    out = translate(
        {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "image_url",
                            "image_url": {"url": "data:image/png;name=a.png;base64,AAAA"},
                        }
                    ],
                }
            ]
        }
    )
    assert out["messages"][0]["content"][0]["source"]["media_type"] == "image/png"


def _blocks(count: int, *, closed: bool) -> list[bytes]:
    events: list[dict[str, Any]] = [START]
    for index in range(count):
        block = {"type": "text", "text": ""}
        events.append({"type": "content_block_start", "index": index, "content_block": block})
        if closed:
            events.append({"type": "content_block_stop", "index": index})
    return _events(*events)


def test_stream_blocks_held_open_count_against_the_limit() -> None:
    # Each open block keeps state until its stop: an upstream that opens blocks and never
    # closes them makes the stream hold more and more, so it is bounded like an answer.
    limit = 100 * BLOCK_STATE_SIZE
    call = make_call({"messages": [user("hi")], "stream": True})
    stream = AnthropicStream(call, "a", None, limit)
    with pytest.raises(UpstreamBadResponse, match="max_response_bytes"):
        for data in _blocks(101, closed=False):
            stream.feed(data)
    stream = AnthropicStream(call, "a", None, limit)  # closed blocks hold nothing
    for data in _blocks(1000, closed=True):
        stream.feed(data)
