"""Self-test of tests/spec.py: real OpenAI payloads pass, broken ones fail."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
from jsonschema import Draft202012Validator, ValidationError

from tests import spec

# Real OpenAI payloads, copied from OpenAI's API reference / openapi.yaml examples.
COMPLETION: dict[str, Any] = {
    "id": "chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG",
    "object": "chat.completion",
    "created": 1741570283,
    "model": "gpt-4o-2024-08-06",
    "choices": [
        {
            "index": 0,
            "message": {
                "role": "assistant",
                "content": "Hello!",
                "refusal": None,
                "annotations": [],
            },
            "logprobs": None,
            "finish_reason": "stop",
        }
    ],
    "usage": {
        "prompt_tokens": 19,
        "completion_tokens": 10,
        "total_tokens": 29,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    },
    "service_tier": "default",
    "system_fingerprint": "fp_fc9f1d7035",
}

TOOL_COMPLETION: dict[str, Any] = {
    "id": "chatcmpl-abc123",
    "object": "chat.completion",
    "created": 1699896916,
    "model": "gpt-4o-mini",
    "choices": [
        {
            "index": 0,
            "message": {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_abc123",
                        "type": "function",
                        "function": {
                            "name": "get_current_weather",
                            "arguments": '{\n"location": "Boston, MA"\n}',
                        },
                    }
                ],
                "refusal": None,
                "annotations": [],
            },
            "logprobs": None,
            "finish_reason": "tool_calls",
        }
    ],
    "usage": {"prompt_tokens": 82, "completion_tokens": 17, "total_tokens": 99},
}

_HEAD = {
    "id": "chatcmpl-123",
    "object": "chat.completion.chunk",
    "created": 1694268190,
    "model": "gpt-4o-mini",
    "system_fingerprint": "fp_44709d6fcb",
}


def _chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> dict[str, Any]:
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
    return {**_HEAD, "choices": [choice], **extra}


# The text stream of protocols §1.5 with include_usage (every chunk carries "usage": null).
TEXT_STREAM = [
    _chunk({"role": "assistant", "content": "", "refusal": None}, usage=None),
    _chunk({"content": "Hello"}, usage=None),
    _chunk({"content": " world"}, usage=None),
    _chunk({}, "stop", usage=None),
    {
        **_HEAD,
        "choices": [],
        "usage": {
            "prompt_tokens": 9,
            "completion_tokens": 2,
            "total_tokens": 11,
            "prompt_tokens_details": {"cached_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 0},
        },
    },
]

# The tool-call stream of protocols §1.5.
TOOL_STREAM = [
    _chunk(
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "index": 0,
                    "id": "call_DdmO9pD3xa9XTPNJ32zg2hcA",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": ""},
                }
            ],
        }
    ),
    _chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"ci'}}]}),
    _chunk({"tool_calls": [{"index": 0, "function": {"arguments": 'ty":"Paris"}'}}]}),
    _chunk(
        {
            "tool_calls": [
                {
                    "index": 1,
                    "id": "call_2",
                    "type": "function",
                    "function": {"name": "get_time", "arguments": ""},
                }
            ]
        }
    ),
    _chunk({"tool_calls": [{"index": 1, "function": {"arguments": "{}"}}]}),
    _chunk({}, "tool_calls"),
]

# The chunk example of openapi.yaml (newer: "obfuscation", no "refusal" in the role delta).
SPEC_CHUNK = json.loads(
    '{"id":"chatcmpl-123","object":"chat.completion.chunk","created":1694268190,'
    '"model":"gpt-4o-mini", "system_fingerprint": "fp_44709d6fcb", "choices":[{"index":0,'
    '"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}],'
    '"obfuscation":"r4N7vQ2m"}'
)

MODELS = {
    "object": "list",
    "data": [
        {
            "id": "model-id-0",
            "object": "model",
            "created": 1686935002,
            "owned_by": "organization-owner",
        },
        {"id": "gpt-4o-mini", "object": "model", "created": 1721172741, "owned_by": "system"},
    ],
}
ERROR = {
    "error": {
        "message": "Incorrect API key provided: sk-abc. You can find your API key at "
        "https://platform.openai.com/account/api-keys.",
        "type": "invalid_request_error",
        "param": None,
        "code": "invalid_api_key",
    }
}


def fails(check: Any, obj: Any, needle: str) -> None:
    with pytest.raises(ValidationError) as info:
        check(obj)
    assert needle in str(info.value), str(info.value)


def edited(obj: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A deep copy of ``obj`` with ``path`` (dotted, ints index lists) set, or deleted if ...."""
    out = copy.deepcopy(obj)
    *parents, last = [int(p) if p.isdigit() else p for p in path.split(".")]
    node: Any = out
    for p in parents:
        node = node[p]
    if value is ...:
        del node[last]
    else:
        node[last] = value
    return out


def test_schema_document_is_valid_json_schema() -> None:
    Draft202012Validator.check_schema(spec.schemas())
    assert "CreateChatCompletionResponse" in spec.schemas()["$defs"]


@pytest.mark.parametrize("obj", [COMPLETION, TOOL_COMPLETION], ids=["text", "tool"])
def test_real_completions_validate(obj: dict[str, Any]) -> None:
    spec.validate_chat_completion(obj)


def test_minimal_completion_validates() -> None:
    """The least a completion must carry (no usage, fingerprint, service tier, annotations)."""
    minimal = {
        "id": "x",
        "object": "chat.completion",
        "created": 1,
        "model": "m",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "hi", "refusal": None},
                "logprobs": None,
                "finish_reason": "length",
            }
        ],
    }
    spec.validate_chat_completion(minimal)
    # ...and what the spec surprisingly insists on:
    fails(spec.validate_chat_completion, edited(minimal, "choices.0.logprobs", ...), "logprobs")
    fails(
        spec.validate_chat_completion, edited(minimal, "choices.0.message.refusal", ...), "refusal"
    )
    fails(spec.validate_chat_completion, edited(minimal, "system_fingerprint", None), "None")


@pytest.mark.parametrize(
    ("path", "value", "needle"),
    [
        ("choices", ..., "'choices' is a required property"),
        ("choices.0.finish_reason", "bogus", "'bogus' is not one of"),
        ("choices.0.finish_reason", None, "None is not one of"),
        ("object", "chat.completion.chunk", "is not one of"),
        ("created", "1741570283", "is not of type 'integer'"),
        ("choices.0.message.role", "user", "is not one of"),
        ("usage.total_tokens", None, "is not of type 'integer'"),
    ],
)
def test_broken_completions_fail(path: str, value: Any, needle: str) -> None:
    fails(spec.validate_chat_completion, edited(COMPLETION, path, value), needle)


def test_tool_call_arguments_must_be_a_string() -> None:
    broken = edited(TOOL_COMPLETION, "choices.0.message.tool_calls.0.function.arguments", {})
    with pytest.raises(ValidationError):
        spec.validate_chat_completion(broken)


@pytest.mark.parametrize("chunk", [*TEXT_STREAM, *TOOL_STREAM, SPEC_CHUNK])
def test_real_chunks_validate(chunk: dict[str, Any]) -> None:
    spec.validate_chat_chunk(chunk)


def test_real_streams_validate() -> None:
    spec.validate_chat_stream(TEXT_STREAM, include_usage=True)
    spec.validate_chat_stream(TOOL_STREAM)


@pytest.mark.parametrize(
    ("chunk", "needle"),
    [
        (
            edited(TOOL_STREAM[1], "choices.0.delta.tool_calls.0.index", ...),
            "'index' is a required",
        ),
        (
            edited(TOOL_STREAM[0], "choices.0.delta.tool_calls.0.index", "0"),
            "not of type 'integer'",
        ),
        (edited(TEXT_STREAM[1], "choices.0.finish_reason", ...), "'finish_reason' is a required"),
        (edited(TEXT_STREAM[3], "choices.0.finish_reason", "bogus"), "'bogus' is not one of"),
        (
            edited(TEXT_STREAM[4], "usage", {"prompt_tokens": 1}),
            "'completion_tokens' is a required",
        ),
        (edited(TEXT_STREAM[0], "object", "chat.completion"), "is not one of"),
    ],
)
def test_broken_chunks_fail(chunk: dict[str, Any], needle: str) -> None:
    fails(spec.validate_chat_chunk, chunk, needle)


def test_chunk_usage_is_nullable_and_optional() -> None:
    spec.validate_chat_chunk(TEXT_STREAM[1])  # "usage": null
    spec.validate_chat_chunk(TOOL_STREAM[1])  # no usage key


@pytest.mark.parametrize(
    ("chunks", "needle"),
    [
        (TEXT_STREAM[:3], "exactly one finish_reason"),
        ([TEXT_STREAM[0], TEXT_STREAM[0], TEXT_STREAM[3]], "role sent 2 times"),
        ([*TOOL_STREAM[:1], TOOL_STREAM[0], TOOL_STREAM[-1]], "id/name repeated"),
        (
            [*TOOL_STREAM[:3], edited(TOOL_STREAM[3], "choices.0.delta.tool_calls.0.index", 2)],
            "0-based and contiguous",
        ),
        ([*TEXT_STREAM[:4], {"error": {"message": "boom"}}], "mid-stream error"),
        ([{**TEXT_STREAM[0], "id": "other"}, *TEXT_STREAM[1:4]], "same on every chunk"),
    ],
)
def test_broken_streams_fail(chunks: list[dict[str, Any]], needle: str) -> None:
    with pytest.raises(AssertionError, match=needle):
        spec.validate_chat_stream(chunks)


def test_stream_usage_chunk_must_come_last() -> None:
    spec.validate_chat_stream(TEXT_STREAM[:4])
    with pytest.raises(AssertionError, match="usage chunk"):
        spec.validate_chat_stream(TEXT_STREAM[:4], include_usage=True)


def test_models_and_errors() -> None:
    spec.validate_models_list(MODELS)
    spec.validate_model(MODELS["data"][0])
    spec.validate_model({**MODELS["data"][0], "shutdown_date": "2026-10-23"})
    fails(
        spec.validate_model, edited(MODELS["data"][0], "owned_by", ...), "'owned_by' is a required"
    )
    fails(spec.validate_models_list, edited(MODELS, "object", "models"), "is not one of")
    spec.validate_error(ERROR)
    fails(spec.validate_error, edited(ERROR, "error.code", ...), "'code' is a required")
    fails(spec.validate_error, {"message": "flat"}, "'error' is a required")


def test_responses_event_validates() -> None:
    spec.validate_response_event(
        {
            "type": "response.output_text.delta",
            "sequence_number": 4,
            "item_id": "msg_1",
            "output_index": 0,
            "content_index": 0,
            "delta": "Hi",
            "logprobs": [],
        }
    )
    with pytest.raises(ValidationError):
        spec.validate_response_event({"type": "response.output_text.delta", "delta": "Hi"})


def test_unknown_schema_name() -> None:
    with pytest.raises(KeyError, match="NoSuchSchema"):
        spec.validate("NoSuchSchema", {})
