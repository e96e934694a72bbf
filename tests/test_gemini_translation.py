"""OpenAI ⇄ Gemini translation as pure functions: no network, one rule per test."""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest

from gateway.errors import InvalidRequest, UpstreamError
from gateway.providers.base import ChatCall
from gateway.providers.gemini.request import (
    DUMMY_SIGNATURE,
    join_call_id,
    split_call_id,
    to_gemini,
)
from gateway.providers.gemini.response import GeminiStream, from_gemini
from gateway.providers.gemini.wire import GeminiResponse
from gateway.schemas.chat import ChatCompletionRequest
from gateway.schemas.codec import decode_body
from gateway.settings import ModelConfig, Target

MODEL = ModelConfig(name="g", targets=(Target(provider="g", model="gemini-2.5-flash"),))
THINKER = ModelConfig(name="t", targets=MODEL.targets, reasoning=True)


def make_call(
    body: dict[str, Any], model: ModelConfig = MODEL, upstream: str = "gemini-2.5-flash"
) -> ChatCall:
    raw = json.dumps({"model": model.name} | body).encode()
    return ChatCall(
        request=decode_body(raw, ChatCompletionRequest),
        body=raw,
        model=model,
        upstream_model=upstream,
    )


def translate(body: dict[str, Any], model: ModelConfig = MODEL, **kw: Any) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(msgspec.json.encode(to_gemini(make_call(body, model, **kw))))
    return out


def user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


def call(call_id: str, name: str, args: str = "{}") -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": args}}


def test_system_roles_and_merging() -> None:
    out = translate(
        {
            "messages": [
                {"role": "system", "content": "Be terse."},
                {"role": "developer", "content": "Really."},
                user("a"),
                user("b"),
                {"role": "assistant", "content": "ok"},
            ]
        }
    )
    assert out["systemInstruction"] == {"parts": [{"text": "Be terse."}, {"text": "Really."}]}
    assert out["contents"] == [
        {"role": "user", "parts": [{"text": "a"}, {"text": "b"}]},
        {"role": "model", "parts": [{"text": "ok"}]},
    ]


def test_only_a_system_message_is_sent_as_the_user_turn() -> None:
    out = translate({"messages": [{"role": "system", "content": "Say hi."}]})
    assert out["contents"] == [{"role": "user", "parts": [{"text": "Say hi."}]}]
    assert "systemInstruction" not in out


def test_tool_calls_and_results_become_function_parts() -> None:
    out = translate(
        {
            "messages": [
                user("q"),
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [call("c1", "f", '{"x":1}'), call("c2", "g")],
                },
                {"role": "tool", "tool_call_id": "c2", "content": "plain text"},
                {"role": "tool", "tool_call_id": "c1", "content": '{"t": 21}'},
            ]
        }
    )
    model, results = out["contents"][1], out["contents"][2]
    assert model["parts"] == [
        {"functionCall": {"name": "f", "args": {"x": 1}}},
        {"functionCall": {"name": "g", "args": {}}},
    ]
    assert results == {
        "role": "user",
        "parts": [
            {"functionResponse": {"name": "g", "response": {"output": "plain text"}}},
            {"functionResponse": {"name": "f", "response": {"output": {"t": 21}}}},
        ],
    }


def test_unknown_tool_call_id_is_a_400() -> None:
    with pytest.raises(InvalidRequest) as err:
        translate(
            {"messages": [user("q"), {"role": "tool", "tool_call_id": "nope", "content": "x"}]}
        )
    assert err.value.param == "messages[1].tool_call_id"


def test_thought_signatures_travel_in_the_call_id() -> None:
    assert split_call_id(join_call_id("call_1", "c2ln+/=")) == ("call_1", "c2ln+/=")
    assert split_call_id("call_2") == ("call_2", None)
    signed = join_call_id("call_1", "SIG")
    out = translate(
        {
            "messages": [
                user("q"),
                {"role": "assistant", "tool_calls": [call(signed, "f")]},
                {"role": "tool", "tool_call_id": signed, "content": "1"},
            ]
        }
    )
    assert out["contents"][1]["parts"][0]["thoughtSignature"] == "SIG"


def test_gemini_3_history_without_a_signature_gets_the_documented_dummy() -> None:
    body = {
        "messages": [
            user("q"),
            {"role": "assistant", "tool_calls": [call("c", "f"), call("d", "g")]},
        ]
    }
    parts = translate(body, upstream="gemini-3-pro-preview")["contents"][1]["parts"]
    assert parts[0]["thoughtSignature"] == DUMMY_SIGNATURE
    assert "thoughtSignature" not in parts[1]
    assert "thoughtSignature" not in translate(body)["contents"][1]["parts"][0]


def test_media_parts() -> None:
    out = translate(
        {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": "data:image/webp;base64,UklG"}},
                        {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}},
                        {"type": "file", "file": {"file_data": "data:application/pdf;base64,JVBE"}},
                        {
                            "type": "image_url",
                            "image_url": {
                                "url": "https://generativelanguage.googleapis.com/v1beta/files/abc"
                            },
                        },
                    ],
                }
            ]
        }
    )
    assert out["contents"][0]["parts"] == [
        {"inlineData": {"mimeType": "image/webp", "data": "UklG"}},
        {"inlineData": {"mimeType": "audio/wav", "data": "AAAA"}},
        {"inlineData": {"mimeType": "application/pdf", "data": "JVBE"}},
        {"fileData": {"fileUri": "https://generativelanguage.googleapis.com/v1beta/files/abc"}},
    ]


@pytest.mark.parametrize(
    "url",
    ["http://169.254.169.254/latest/meta-data", "https://example.com/a.png", "file:///etc/passwd"],
)
def test_other_urls_are_refused_never_fetched(url: str) -> None:
    with pytest.raises(InvalidRequest) as err:
        translate(
            {
                "messages": [
                    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}
                ]
            }
        )
    assert err.value.param == "messages[0].content[0].image_url.url"


def test_generation_config() -> None:
    out = translate(
        {
            "messages": [user("hi")],
            "temperature": 1.5,
            "top_p": 0.5,
            "max_tokens": 99,
            "stop": "END",
            "n": 2,
            "seed": 3,
            "presence_penalty": 0.1,
            "frequency_penalty": 0.2,
            "modalities": ["text", "image"],
        }
    )
    assert out["generationConfig"] == {
        "temperature": 1.5,
        "topP": 0.5,
        "maxOutputTokens": 99,
        "stopSequences": ["END"],
        "candidateCount": 2,
        "seed": 3,
        "presencePenalty": 0.1,
        "frequencyPenalty": 0.2,
        "responseModalities": ["TEXT", "IMAGE"],
    }


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("logprobs", True),
        ("logit_bias", {"1": 2}),
        ("modalities", ["audio"]),
        ("audio", {"voice": "x", "format": "mp3"}),
    ],
)
def test_fields_gemini_cannot_honour_are_a_400(field: str, value: Any) -> None:
    with pytest.raises(InvalidRequest) as err:
        translate({"messages": [user("hi")], field: value})
    assert err.value.code == "unsupported_parameter"


def test_json_modes_and_schema_conversion() -> None:
    assert translate({"messages": [user("hi")], "response_format": {"type": "json_object"}})[
        "generationConfig"
    ] == {"responseMimeType": "application/json"}
    schema = {
        "type": "object",
        "properties": {"a": {"type": ["string", "null"]}, "b": {"const": 1}},
        "required": ["a"],
        "additionalProperties": False,
    }
    cfg = translate(
        {
            "messages": [user("hi")],
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": schema, "strict": True},
            },
        }
    )["generationConfig"]
    assert cfg["responseMimeType"] == "application/json"
    assert "additionalProperties" not in json.dumps(cfg["responseSchema"])
    assert cfg["responseSchema"]["properties"]["a"] == {"type": "STRING", "nullable": True}


def test_unconvertible_schema_is_a_400() -> None:
    schema = {
        "$defs": {"n": {"type": "object", "properties": {"next": {"$ref": "#/$defs/n"}}}},
        "$ref": "#/$defs/n",
    }
    with pytest.raises(InvalidRequest) as err:
        translate(
            {
                "messages": [user("hi")],
                "tools": [{"type": "function", "function": {"name": "f", "parameters": schema}}],
            }
        )
    assert err.value.param == "tools[0].function.parameters"


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        ("none", {"mode": "NONE"}),
        ("auto", {"mode": "AUTO"}),
        ("required", {"mode": "ANY"}),
        (
            {"type": "function", "function": {"name": "f"}},
            {"mode": "ANY", "allowedFunctionNames": ["f"]},
        ),
    ],
)
def test_tools_and_tool_choice(choice: Any, expected: dict[str, Any]) -> None:
    out = translate(
        {
            "messages": [user("hi")],
            "tools": [
                {
                    "type": "function",
                    "function": {
                        "name": "f",
                        "description": "d",
                        "parameters": {"type": "object", "properties": {"x": {"type": "integer"}}},
                    },
                },
                {
                    "type": "function",
                    "function": {"name": "g", "parameters": {"type": "object", "properties": {}}},
                },
            ],
            "tool_choice": choice,
        }
    )
    decls = out["tools"][0]["functionDeclarations"]
    assert decls[0] == {
        "name": "f",
        "description": "d",
        "parameters": {"type": "OBJECT", "properties": {"x": {"type": "INTEGER"}}},
    }
    assert decls[1] == {"name": "g"}  # no arguments: no parameters
    assert out["toolConfig"] == {"functionCallingConfig": expected}


@pytest.mark.parametrize(
    ("upstream", "effort", "expected"),
    [
        ("gemini-2.5-flash", "low", {"includeThoughts": True, "thinkingBudget": 1024}),
        ("gemini-2.5-flash", "none", {"includeThoughts": False, "thinkingBudget": 0}),
        ("gemini-3-pro-preview", "high", {"includeThoughts": True, "thinkingLevel": "high"}),
        (
            "gemini-3-flash-preview",
            "minimal",
            {"includeThoughts": True, "thinkingLevel": "minimal"},
        ),
        ("gemini-3-pro-preview", "none", {"includeThoughts": False, "thinkingLevel": "low"}),
        ("gemini-2.5-pro", "none", {"includeThoughts": False, "thinkingBudget": 128}),
    ],
)
def test_reasoning_effort_becomes_thinking_config(
    upstream: str, effort: str, expected: dict[str, Any]
) -> None:
    out = translate(
        {"messages": [user("hi")], "reasoning_effort": effort}, THINKER, upstream=upstream
    )
    assert out["generationConfig"]["thinkingConfig"] == expected


def _resp(**fields: Any) -> GeminiResponse:
    return msgspec.json.decode(json.dumps(fields), type=GeminiResponse)


def test_response_with_thoughts_calls_images_and_usage() -> None:
    resp = _resp(
        candidates=[
            {
                "content": {
                    "role": "model",
                    "parts": [
                        {"text": "pondering", "thought": True},
                        {"text": "Here."},
                        {
                            "functionCall": {"name": "f", "args": {"a": 1}},
                            "thoughtSignature": "SIG",
                        },
                        {"inlineData": {"mimeType": "image/png", "data": "iVBO"}},
                    ],
                },
                "finishReason": "STOP",
                "index": 0,
            }
        ],
        usageMetadata={
            "promptTokenCount": 10,
            "candidatesTokenCount": 4,
            "thoughtsTokenCount": 6,
            "cachedContentTokenCount": 3,
            "totalTokenCount": 20,
        },
        modelVersion="gemini-2.5-flash",
        responseId="r1",
    )
    body, usage = from_gemini(resp, "fallback")
    out = json.loads(body)
    msg = out["choices"][0]["message"]
    assert out["id"] == "chatcmpl-r1" and out["model"] == "gemini-2.5-flash"
    assert msg["content"] == "Here." and msg["reasoning_content"] == "pondering"
    assert msg["images"] == [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBO"}}
    ]
    [tc] = msg["tool_calls"]
    assert split_call_id(tc["id"])[1] == "SIG" and tc["id"].startswith("call_")
    assert json.loads(tc["function"]["arguments"]) == {"a": 1}
    assert out["choices"][0]["finish_reason"] == "tool_calls"
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (10, 10, 20)
    assert out["usage"]["completion_tokens_details"]["reasoning_tokens"] == 6
    assert out["usage"]["prompt_tokens_details"]["cached_tokens"] == 3


@pytest.mark.parametrize(
    ("reason", "finish"),
    [
        ("STOP", "stop"),
        ("MAX_TOKENS", "length"),
        ("SAFETY", "content_filter"),
        ("RECITATION", "content_filter"),
        ("MALFORMED_FUNCTION_CALL", "stop"),
    ],
)
def test_finish_reasons(reason: str, finish: str) -> None:
    body, _ = from_gemini(
        _resp(candidates=[{"content": {"parts": [{"text": "x"}]}, "finishReason": reason}]), "m"
    )
    assert json.loads(body)["choices"][0]["finish_reason"] == finish


def test_blocked_prompt_is_a_content_filter_choice() -> None:
    body, _ = from_gemini(_resp(promptFeedback={"blockReason": "SAFETY"}), "m")
    choice = json.loads(body)["choices"][0]
    assert choice["message"]["content"] is None and choice["finish_reason"] == "content_filter"


def test_stream_state_machine() -> None:
    call = make_call(
        {
            "messages": [user("hi")],
            "stream": True,
            "stream_options": {"include_usage": True},
            "n": 2,
        }
    )
    state = GeminiStream(call, "g")
    chunks: list[dict[str, Any]] = []
    for event in [
        {
            "candidates": [
                {"content": {"parts": [{"text": "A"}]}, "index": 0},
                {"content": {"parts": [{"text": "B"}]}, "index": 1},
            ],
            "responseId": "r",
        },
        {
            "candidates": [
                {
                    "content": {"parts": [{"functionCall": {"name": "f", "args": {}}}]},
                    "finishReason": "STOP",
                    "index": 0,
                }
            ]
        },
        {
            "candidates": [
                {"content": {"parts": [{"text": "!"}]}, "finishReason": "MAX_TOKENS", "index": 1}
            ],
            "usageMetadata": {
                "promptTokenCount": 2,
                "candidatesTokenCount": 3,
                "totalTokenCount": 5,
            },
        },
    ]:
        chunks.extend(json.loads(c) for c in state.feed(json.dumps(event).encode()))
    chunks.extend(json.loads(c) for c in state.end())
    firsts = [c for c in chunks if c["choices"] and c["choices"][0]["delta"].get("role")]
    assert sorted(c["choices"][0]["index"] for c in firsts) == [0, 1]
    finishes = {
        c["choices"][0]["index"]: c["choices"][0]["finish_reason"]
        for c in chunks
        if c["choices"] and c["choices"][0]["finish_reason"]
    }
    assert finishes == {0: "tool_calls", 1: "length"}
    assert chunks[-1]["usage"]["total_tokens"] == 5


def test_stream_that_ends_early_or_fails() -> None:
    call = make_call({"messages": [user("hi")], "stream": True})
    state = GeminiStream(call, "g")
    state.feed(b'{"candidates":[{"content":{"parts":[{"text":"A"}]}}]}')
    with pytest.raises(UpstreamError, match="before it was complete"):
        state.end()
    with pytest.raises(UpstreamError, match="overloaded"):
        state.feed(
            b'{"error": {"code": 503, "message": "The model is overloaded.", '
            b'"status": "UNAVAILABLE"}}'
        )
    with pytest.raises(UpstreamError, match="malformed"):
        state.feed(b"{not json")
    with pytest.raises(UpstreamError):
        GeminiStream(call, "g").end()


def test_tools_with_json_output_need_gemini_3() -> None:
    body = {
        "messages": [user("hi")],
        "tools": [{"type": "function", "function": {"name": "f"}}],
        "response_format": {"type": "json_object"},
    }
    with pytest.raises(InvalidRequest) as err:
        translate(body)
    assert err.value.param == "response_format"
    out = translate(body, upstream="gemini-3-flash-preview")
    assert out["generationConfig"]["responseMimeType"] == "application/json"


def test_zero_penalties_are_not_sent() -> None:
    cfg = translate({"messages": [user("hi")], "presence_penalty": 0, "frequency_penalty": 0.0})
    assert "presencePenalty" not in cfg.get("generationConfig", {})
    assert "frequencyPenalty" not in cfg.get("generationConfig", {})


def test_ids_gemini_gave_go_back_to_it_and_only_those() -> None:
    resp = _resp(
        candidates=[
            {"content": {"parts": [{"functionCall": {"id": "fc-7", "name": "f", "args": {}}}]}}
        ]
    )
    body, _ = from_gemini(resp, "m")
    [tc] = json.loads(body)["choices"][0]["message"]["tool_calls"]
    assert tc["id"] == "gcall_fc-7"
    out = translate(
        {
            "messages": [
                user("q"),
                {"role": "assistant", "tool_calls": [call(tc["id"], "f"), call("call_x", "g")]},
                {"role": "tool", "tool_call_id": tc["id"], "content": "1"},
                {"role": "tool", "tool_call_id": "call_x", "content": "2"},
            ]
        }
    )
    calls = [p["functionCall"] for p in out["contents"][1]["parts"]]
    results = [p["functionResponse"] for p in out["contents"][2]["parts"]]
    assert [c.get("id") for c in calls] == ["fc-7", None]
    assert [r.get("id") for r in results] == ["fc-7", None]


def test_thought_images_are_not_the_answer() -> None:
    resp = _resp(
        candidates=[
            {
                "content": {
                    "parts": [
                        {"inlineData": {"mimeType": "image/png", "data": "AA"}, "thought": True},
                        {"inlineData": {"mimeType": "image/png", "data": "BB"}},
                    ]
                }
            }
        ]
    )
    body, _ = from_gemini(resp, "m")
    images = json.loads(body)["choices"][0]["message"]["images"]
    assert [i["image_url"]["url"] for i in images] == ["data:image/png;base64,BB"]


def test_anthropic_style_thinking_field() -> None:
    on = translate(
        {"messages": [user("hi")], "thinking": {"type": "enabled", "budget_tokens": 3000}}, THINKER
    )
    assert on["generationConfig"]["thinkingConfig"] == {
        "includeThoughts": True,
        "thinkingBudget": 3000,
    }
    off = translate({"messages": [user("hi")], "thinking": {"type": "disabled"}}, THINKER)
    assert off["generationConfig"]["thinkingConfig"] == {
        "includeThoughts": False,
        "thinkingBudget": 0,
    }
    with pytest.raises(InvalidRequest) as err:
        translate({"messages": [user("hi")], "thinking": {"budget_tokens": 1}}, THINKER)
    assert err.value.param == "thinking"


def test_stream_error_events_keep_their_status() -> None:
    from gateway.errors import UpstreamRateLimited, UpstreamUnavailable

    state = GeminiStream(make_call({"messages": [user("hi")], "stream": True}), "g")
    with pytest.raises(UpstreamRateLimited):
        state.feed(b'{"error": {"code": 429, "message": "Quota", "status": "RESOURCE_EXHAUSTED"}}')
    with pytest.raises(UpstreamUnavailable):
        state.feed(b'[{"error": {"code": 503, "message": "busy", "status": "UNAVAILABLE"}}]')
