"""The Responses API translation: request → chat request, chat answers and chunk streams →
`response` objects and events (pure functions, no network), and the demo gateway's 400s."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import openai
import pytest
from aiohttp.test_utils import TestClient

from gateway.config import load_settings
from gateway.errors import UpstreamError, UpstreamRateLimited
from gateway.providers.base import ChatCall
from gateway.responses import ResponseEvents, from_completion, items, shell, to_chat
from gateway.schemas.chat import (
    AssistantMessage,
    FileContentPart,
    ImageContentPart,
    JSONSchemaFormat,
    SystemMessage,
    ToolChoiceAllowedTools,
    ToolMessage,
    UserMessage,
)
from gateway.schemas.codec import decode_body
from gateway.schemas.common import CompletionTokensDetails, PromptTokensDetails, Usage
from gateway.schemas.response_output import ResponseUsage
from gateway.schemas.responses import ResponseCreateRequest
from gateway.settings import ConfigError, ModelConfig, Target
from tests.conftest import create_key, refusal_counts, sdk_tls, usage_rows
from tests.spec import validate_error, validate_response, validate_response_event


def request(**body: Any) -> ResponseCreateRequest:
    return decode_body(json.dumps({"model": "m"} | body).encode(), ResponseCreateRequest)


# ---- request translation ---------------------------------------------------------------------


def test_instructions_and_string_input() -> None:
    out = to_chat(request(input="hi", instructions="Be terse.", max_output_tokens=9, stream=True))
    chat = out.chat
    assert chat.messages == [SystemMessage(content="Be terse."), UserMessage(content="hi")]
    assert (chat.model, chat.max_completion_tokens, chat.stream) == ("m", 9, True)
    assert out.refusal is None


def test_items_become_chat_messages() -> None:
    out = to_chat(
        request(
            input=[
                {"role": "system", "content": [{"type": "input_text", "text": "Sys"}]},
                {
                    "type": "message",
                    "role": "user",
                    "content": [
                        {"type": "input_text", "text": "Look"},
                        {"type": "input_image", "image_url": "data:x", "detail": "original"},
                        {"type": "input_file", "file_data": "data:y", "filename": "a.pdf"},
                    ],
                },
                {"type": "reasoning", "id": "rs_1", "summary": [], "content": []},
                {
                    "type": "message",
                    "role": "assistant",
                    "id": "msg_1",
                    "status": "completed",
                    "content": [{"type": "output_text", "text": "Let me see.", "annotations": []}],
                },
                {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
                {"type": "function_call", "call_id": "c2", "name": "g", "arguments": "{}"},
                {"type": "function_call_output", "call_id": "c1", "output": "one"},
                {
                    "type": "function_call_output",
                    "call_id": "c2",
                    "output": [{"type": "input_text", "text": "two"}],
                },
            ]
        )
    )
    system, user, assistant, tool1, tool2 = out.chat.messages
    assert isinstance(system, SystemMessage)
    assert isinstance(user, UserMessage) and isinstance(user.content, list)
    image, file = user.content[1], user.content[2]
    assert isinstance(image, ImageContentPart) and image.image_url.detail == "high"
    assert isinstance(file, FileContentPart)
    assert json.loads(bytes(file.file)) == {"file_data": "data:y", "filename": "a.pdf"}
    assert isinstance(assistant, AssistantMessage)
    assert [c.id for c in assistant.tool_calls or ()] == ["c1", "c2"]  # one assistant turn
    assert isinstance(tool1, ToolMessage) and tool1.tool_call_id == "c1"
    assert isinstance(tool2, ToolMessage) and tool2.tool_call_id == "c2"
    # Provider errors name chat parameters; they are mapped back to the Responses fields.
    assert out.param("messages[1].content[1].image_url.url") == "input[1].content[1]"
    assert out.param("messages[2].tool_calls[1].function.arguments") == "input[5]"
    assert out.param("messages[2].content") == "input[3]"
    assert out.param("messages[4].content") == "input[7]"
    assert out.param("messages[9]") == "input"
    assert out.param("tools[0].function.parameters") == "tools[0]"
    assert out.param("response_format") == "text.format"
    assert out.param("max_tokens") == "max_output_tokens"
    assert out.param("temperature") == "temperature"
    assert out.param(None) is None
    # tool_choice is nested in chat and flat in Responses.
    assert out.param("tool_choice.function.name") == "tool_choice.name"
    assert out.param("tool_choice.allowed_tools.tools[1].function") == "tool_choice.tools[1]"
    assert out.param("tool_choice.allowed_tools.mode") == "tool_choice.mode"


def test_each_input_item_is_decoded_once(monkeypatch: pytest.MonkeyPatch) -> None:
    decoded: list[bytes] = []

    class Counting:
        def __init__(self, decoder: Any) -> None:
            self.decoder = decoder

        def decode(self, raw: bytes) -> Any:
            decoded.append(bytes(raw))
            return self.decoder.decode(raw)

    counting = {t: Counting(d) for t, d in items._DECODERS.items()}
    monkeypatch.setattr(items, "_DECODERS", counting)
    history = [
        {"role": "user", "content": "Weather?"},
        {"type": "message", "role": "assistant", "content": "Let me check."},
        {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
    ]
    out = to_chat(request(input=history))
    assert len(out.chat.messages) == 3  # the call joins the assistant turn
    assert len(decoded) == len(history)


def test_tools_formats_and_choices() -> None:
    out = to_chat(
        request(
            input="x",
            tools=[{"type": "function", "name": "f", "parameters": None, "strict": None}],
            tool_choice={"type": "allowed_tools", "mode": "required", "tools": [{"name": "f"}]},
            text={"format": {"type": "json_schema", "name": "s", "schema": {"type": "object"}}},
            reasoning={"effort": "low"},
        )
    )
    chat = out.chat
    assert chat.tools and chat.tools[0].function.parameters is msgspec.UNSET  # type: ignore[union-attr]
    assert isinstance(chat.tool_choice, ToolChoiceAllowedTools)
    assert json.loads(bytes(chat.tool_choice.allowed_tools)) == {
        "mode": "required",
        "tools": [{"type": "function", "function": {"name": "f"}}],
    }
    assert isinstance(chat.response_format, JSONSchemaFormat)
    assert chat.reasoning_effort == "low"
    assert [t.name for t in out.tools] == ["f"]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"previous_response_id": "resp_1"}, "previous_response_id"),
        ({"tools": [{"type": "web_search"}]}, "tools[0]"),
        ({"tool_choice": {"type": "file_search"}}, "tool_choice"),
        ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0]"),
        ({"input": [{"type": "computer_call_output", "call_id": "c"}]}, "input[0].type"),
        (
            # Fields of other shapes than translated items have: still only a refusal.
            {"input": [{"type": "computer_call_output", "call_id": "c", "output": {"x": 1}}]},
            "input[0].type",
        ),
        ({"input": [{"type": "item_reference", "id": "msg_1"}], "instructions": "I"}, "input[0]"),
        ({"prompt": {"id": "pmpt_1"}, "input": []}, "prompt"),  # a stored prompt may have it
        (
            {"tool_choice": {"type": "allowed_tools", "mode": "auto", "tools": [{"type": "mcp"}]}},
            "tool_choice.tools[0]",
        ),
        ({"background": True}, "background"),
        ({"conversation": "conv_1"}, "conversation"),
        ({"prompt": {"id": "pmpt_1"}}, "prompt"),
        ({"top_logprobs": 3}, "top_logprobs"),
        ({"include": ["message.output_text.logprobs"]}, "include[0]"),
        (
            {"input": [{"role": "user", "content": [{"type": "input_image", "file_id": "f"}]}]},
            "input[0].content[0]",
        ),
        (
            {"input": [{"role": "system", "content": [{"type": "input_image", "image_url": "u"}]}]},
            "input[0].content[0]",
        ),
    ],
)
def test_what_only_a_pass_through_serves_is_deferred(body: dict[str, Any], param: str) -> None:
    out = to_chat(request(**{"input": "x"} | body))
    assert out.refusal is not None
    assert (out.refusal.param, out.refusal.code) == (param, "unsupported_parameter")


def test_encrypted_reasoning_may_be_asked_for() -> None:
    assert to_chat(request(input="x", include=["reasoning.encrypted_content"])).refusal is None


# ---- answers -----------------------------------------------------------------------------------


def completion(message: dict[str, Any], finish: str = "stop") -> bytes:
    return json.dumps(
        {
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "created": 1700000000,
            "model": "up-model",
            "choices": [{"index": 0, "message": message, "finish_reason": finish}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12},
        }
    ).encode()


def test_completion_with_every_kind_of_output() -> None:
    req = request(input="x", instructions="I")
    message = {
        "role": "assistant",
        "content": "Hi",
        "refusal": "No",
        "reasoning_content": "Thinking",
        "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
        ],
    }
    body = json.loads(from_completion(completion(message), shell(req, to_chat(req)), None))
    validate_response(body)
    assert [item["type"] for item in body["output"]] == ["reasoning", "message", "function_call"]
    assert body["output"][0]["content"] == [{"type": "reasoning_text", "text": "Thinking"}]
    assert [p["type"] for p in body["output"][1]["content"]] == ["output_text", "refusal"]
    assert body["output"][2]["call_id"] == "call_1"
    assert (body["model"], body["created_at"], body["instructions"]) == (
        "up-model",
        1700000000,
        "I",
    )
    assert body["usage"]["total_tokens"] == 12


def test_completion_cut_by_the_limit_is_incomplete() -> None:
    req = request(input="x")
    raw = from_completion(
        completion({"role": "assistant", "content": "Hi"}, "length"), shell(req, to_chat(req)), None
    )
    body = json.loads(raw)
    validate_response(body)
    assert body["status"] == "incomplete"
    assert body["incomplete_details"] == {"reason": "max_output_tokens"}
    assert body["output"][0]["status"] == "incomplete"


@pytest.mark.parametrize("body", [b"{", b'{"id":"x","created":1,"model":"m","choices":[]}'])
def test_malformed_completion_is_an_upstream_error(body: bytes) -> None:
    req = request(input="x")
    with pytest.raises(UpstreamError):
        from_completion(body, shell(req, to_chat(req)), None)


def test_usage_converts_both_ways() -> None:
    usage = Usage(
        prompt_tokens=10,
        completion_tokens=4,
        total_tokens=14,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=3),
        completion_tokens_details=CompletionTokensDetails(reasoning_tokens=2),
    )
    converted = ResponseUsage.from_usage(usage)
    assert converted.input_tokens_details is not None
    assert converted.input_tokens_details.cached_tokens == 3
    assert converted.to_usage() == usage
    assert ResponseUsage(input_tokens=1, output_tokens=2).to_usage().total_tokens == 3


# ---- streams -----------------------------------------------------------------------------------


def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
    choice = {"index": 0, "delta": delta, "finish_reason": finish}
    return json.dumps(
        {
            "id": "c",
            "object": "chat.completion.chunk",
            "created": 1,
            "model": "up",
            "choices": [choice],
        }
    ).encode()


def tool(index: int, arguments: str, call_id: str | None = None) -> dict[str, Any]:
    fragment: dict[str, Any] = {"index": index, "function": {"arguments": arguments}}
    if call_id:
        fragment |= {"id": call_id, "type": "function"}
        fragment["function"]["name"] = f"f{index}"
    return {"tool_calls": [fragment]}


async def translate(batches: list[list[bytes]], usage: Usage | None = None) -> list[Any]:
    req = request(input="x")
    translation = to_chat(req)
    call = ChatCall(
        request=translation.chat,
        body=None,
        model=ModelConfig(name="m", targets=(Target(provider="p", model="up"),)),
        upstream_model="up",
        usage=usage,
    )

    async def source() -> AsyncIterator[list[bytes]]:
        for batch in batches:
            yield batch

    events = ResponseEvents(shell(req, translation), call)
    frames = b"".join([b"".join(b) async for b in events.events(source())])
    out = []
    for block in frames.split(b"\n\n")[:-1]:
        name, data = block.split(b"\n")
        event = json.loads(data[6:])
        assert name == b"event: " + event["type"].encode()
        validate_response_event(event)
        out.append(event)
    assert [e["sequence_number"] for e in out] == list(range(len(out)))
    return out


async def test_stream_of_every_kind_of_output() -> None:
    events = await translate(
        [
            [chunk({"role": "assistant", "reasoning_content": "Hmm"})],
            [chunk({"content": "Hi"}), chunk({"refusal": "No"})],
            [chunk(tool(0, "", "call_a")), chunk(tool(0, '{"a":1}'))],
            [chunk(tool(1, "{}", "call_b")), chunk({}, "tool_calls")],
        ],
        Usage(prompt_tokens=3, completion_tokens=4, total_tokens=7),
    )
    kinds = [e["type"] for e in events]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert "response.reasoning_text.delta" in kinds and "response.refusal.done" in kinds
    final = events[-1]["response"]
    assert events[-1]["type"] == "response.completed"
    assert [i["type"] for i in final["output"]] == [
        "reasoning",
        "message",
        "function_call",
        "function_call",
    ]
    assert [p["type"] for p in final["output"][1]["content"]] == ["output_text", "refusal"]
    assert final["output"][2]["arguments"] == '{"a":1}'
    assert [i["call_id"] for i in final["output"][2:]] == ["call_a", "call_b"]
    assert final["usage"]["total_tokens"] == 7
    done = [e["item"] for e in events if e["type"] == "response.output_item.done"]
    assert done == final["output"]


async def test_a_tool_name_sent_after_the_id_is_kept() -> None:
    late = {"index": 0, "id": "call_a", "type": "function", "function": {"arguments": ""}}
    events = await translate(
        [
            [chunk({"role": "assistant", "tool_calls": [late]})],
            [chunk({"tool_calls": [{"index": 0, "function": {"name": "f", "arguments": "{}"}}]})],
            [chunk({}, "tool_calls")],
        ]
    )
    (done,) = [e for e in events if e["type"] == "response.function_call_arguments.done"]
    assert done["name"] == "f"
    assert events[-1]["response"]["output"][0]["name"] == "f"


async def test_stream_cut_by_the_limit_ends_incomplete() -> None:
    events = await translate([[chunk({"content": "Hi"}), chunk({}, "length")]])
    assert events[-1]["type"] == "response.incomplete"
    assert events[-1]["response"]["incomplete_details"] == {"reason": "max_output_tokens"}
    assert "usage" not in events[-1]["response"]  # the upstream reported none


@pytest.mark.parametrize(
    "batches",
    [
        [[b"{not json"]],
        [[chunk(tool(0, "{", "call_a")), chunk(tool(1, "{}", "call_b")), chunk(tool(0, "}"))]],
    ],
    ids=["malformed", "interleaved-calls"],
)
async def test_unusable_streams_are_upstream_errors(batches: list[list[bytes]]) -> None:
    with pytest.raises(UpstreamError):
        await translate(batches)


def test_error_event_takes_the_next_number() -> None:
    req = request(input="x")
    translation = to_chat(req)
    call = ChatCall(
        request=translation.chat,
        body=None,
        model=ModelConfig(name="m", targets=(Target(provider="p", model="up"),)),
        upstream_model="up",
    )
    events = ResponseEvents(shell(req, translation), call)
    frame = events.error_frame(UpstreamRateLimited("Slow down."))
    event = json.loads(frame.split(b"\n")[1][6:])
    validate_response_event(event)
    assert (event["sequence_number"], event["code"], event["message"]) == (
        0,
        "rate_limit_exceeded",
        "Slow down.",
    )


# ---- the demo gateway --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        (
            {"input": [{"role": "user", "content": [{"type": "input_video"}]}]},
            "input[0].content[0].type",
            None,
        ),
        (
            {"input": [{"type": "function_call", "name": "f", "arguments": "{}"}]},
            "input[0].call_id",
            None,
        ),
        ({"input": [{"role": "robot", "content": "hi"}]}, "input[0].role", None),
        ({"tools": [{"type": "web_search"}]}, "tools[0]", "unsupported_parameter"),
        ({"tools": [{"type": "function", "name": "bad name"}]}, "tools[0].name", None),
        (
            {"tools": [{"type": "function", "name": "f", "parameters": [1]}]},
            "tools[0].parameters",
            None,
        ),
        ({"tool_choice": {"type": "function"}}, "tool_choice.name", None),
        ({"tool_choice": {"type": "allowed_tools", "mode": "auto"}}, "tool_choice.tools", None),
        (
            {
                "tool_choice": {
                    "type": "allowed_tools",
                    "mode": "auto",
                    "tools": [{"type": "function", "name": "f"}, {"type": "function"}],
                }
            },
            "tool_choice.tools[1].name",
            None,
        ),
        (
            {
                "tool_choice": {
                    "type": "allowed_tools",
                    "mode": "auto",
                    "tools": [{"server_label": "x", "type": "mcp"}],
                }
            },
            "tool_choice.tools[0]",
            "unsupported_parameter",
        ),
        ({"input": None}, "input", None),  # missing
        ({"input": []}, "input", None),
        ({"input": [{"type": "reasoning", "summary": []}]}, "input", None),
        ({"input": [{"role": "user"}]}, "input[0].content", None),
        ({"input": [{"content": "hi"}]}, "input[0].role", None),
        ({"input": [{"type": "function_call_output", "call_id": "c"}]}, "input[0].output", None),
        ({"input": [{"role": "user", "content": "hi"}] * 10_001}, "input", None),
        ({"stream_options": {"include_obfuscation": False}}, "stream_options", None),
        (
            {"stream_options": {"include_obfuscation": "no"}, "stream": True},
            "stream_options.include_obfuscation",
            None,
        ),
        ({"max_output_tokens": 0}, "max_output_tokens", None),
        ({"text": {"format": {"type": "xml"}}}, "text.format.type", None),
        ({"reasoning": {"effort": "high"}}, "reasoning.effort", "unsupported_parameter"),
        ({"previous_response_id": "resp_1"}, "previous_response_id", "unsupported_parameter"),
        ({"model": None}, "model", None),
    ],
)
async def test_bad_requests_name_the_field(
    gateway: TestClient[Any, Any], key: str, body: dict[str, Any], param: str, code: str | None
) -> None:
    payload = {k: v for k, v in ({"model": "demo", "input": "hi"} | body).items() if v is not None}
    resp = await gateway.post(
        "/v1/responses", json=payload, headers={"Authorization": f"Bearer {key}"}
    )
    assert resp.status == 400, await resp.text()
    error = await resp.json()
    validate_error(error)
    assert (error["error"]["param"], error["error"]["code"]) == (param, code)
    assert error["error"]["type"] == "invalid_request_error"
    if param != "model":
        assert f"'{param}'" in error["error"]["message"]


async def test_missing_input_says_so(gateway: TestClient[Any, Any], key: str) -> None:
    resp = await gateway.post(
        "/v1/responses", json={"model": "demo"}, headers={"Authorization": f"Bearer {key}"}
    )
    assert resp.status == 400
    error = (await resp.json())["error"]
    assert error["message"] == "Missing required parameter: 'input'."


async def test_stream_options_with_a_stream(oai: openai.AsyncOpenAI) -> None:
    # Accepted; a translated stream's events carry no `obfuscation` padding (see docs/providers.md).
    stream = await oai.responses.create(
        model="demo", input="hi", stream=True, stream_options={"include_obfuscation": True}
    )
    events = [event async for event in stream]
    assert events[-1].type == "response.completed"
    assert all(getattr(e, "obfuscation", None) is None for e in events)


async def test_demo_limit_gives_an_incomplete_response(oai: openai.AsyncOpenAI) -> None:
    reply = await oai.responses.create(
        model="demo", input="one two three four", max_output_tokens=2
    )
    validate_response(reply.to_dict())
    assert reply.status == "incomplete"
    assert reply.incomplete_details is not None
    assert reply.incomplete_details.reason == "max_output_tokens"
    assert reply.output_text == "You said:"
    stream = await oai.responses.create(
        model="demo", input="one two three four", max_output_tokens=2, stream=True
    )
    events = [event async for event in stream]
    assert events[-1].type == "response.incomplete"


async def test_key_without_the_model_is_refused(gateway: TestClient[Any, Any]) -> None:
    secret = await create_key(gateway, models=["other"])
    async with openai.AsyncOpenAI(
        base_url=str(gateway.make_url("/v1")),
        api_key=secret,
        max_retries=0,
        http_client=openai.DefaultAsyncHttpxClient(verify=sdk_tls()),
    ) as client:
        with pytest.raises(openai.PermissionDeniedError):
            await client.responses.create(model="demo", input="hi")
    # Refused before any upstream call: counted, not written as a usage row.
    assert [status for _, status in await refusal_counts(gateway)] == [403]
    assert await usage_rows(gateway) == []


def test_responses_api_setting_is_only_for_openai_providers(tmp_path: Path) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text(
        '[[providers]]\nname = "a"\ntype = "anthropic"\napi_keys = ["k"]\nresponses_api = true\n'
    )
    with pytest.raises(ConfigError, match=r"providers\[0\]\.responses_api"):
        load_settings(path, {})
    path.write_text('[[providers]]\nname = "o"\ntype = "openai"\nresponses_api = true\n')
    assert load_settings(path, {}).providers[0].responses_api is True


async def test_events_before_a_bad_chunk_still_go_out() -> None:
    req = request(input="x")
    translation = to_chat(req)
    call = ChatCall(
        request=translation.chat,
        body=None,
        model=ModelConfig(name="m", targets=(Target(provider="p", model="up"),)),
        upstream_model="up",
    )

    async def source() -> AsyncIterator[list[bytes]]:
        yield [chunk({"content": "Hi"}), b"{bad"]

    events = ResponseEvents(shell(req, translation), call)
    sent: list[bytes] = []
    with pytest.raises(UpstreamError):
        async for batch in events.events(source()):
            sent.extend(batch)
    assert len(sent) == 5  # created, in_progress, item added, part added, the delta
    error = json.loads(events.error_frame(UpstreamError("x")).split(b"\n")[1][6:])
    assert error["sequence_number"] == 5
