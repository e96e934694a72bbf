"""`POST /v1/responses` with the official `openai` client, against every provider type.

Each scenario runs against the offline demo provider, a fake OpenAI-compatible upstream
(translated to chat completions, and passed through with `responses_api = true`), and fake
Anthropic and Gemini upstreams. Every `response` is validated against OpenAI's `Response`
schema and every streamed event against `ResponseStreamEvent`.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import openai
import pydantic
import pytest
from aiohttp.pytest_plugin import AiohttpClient, AiohttpServer
from openai import omit
from openai.lib.streaming.responses import ResponseStreamState
from openai.types.responses import ResponseStreamEvent

from gateway.settings import AnthropicConfig, ModelConfig, ProviderConfig, Target
from tests.conftest import (
    MakeSettings,
    create_key,
    openai_client,
    provider_config,
    refusal_counts,
    start_gateway,
    usage_rows,
)
from tests.rigs import UPSTREAM_KEY, fake_for
from tests.spec import validate_error, validate_response, validate_response_event
from tests.test_contract import PNG, UPSTREAM_MODELS, Rig

KINDS = ("demo", "openai", "openai-responses", "anthropic", "gemini")
UPSTREAMS = ("openai", "openai-responses", "anthropic", "gemini")
TRANSLATED = ("demo", "openai", "anthropic", "gemini")

WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "Current weather for a city.",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
        "additionalProperties": False,
    },
    "strict": True,
}
SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
    "required": ["city", "days"],
    "additionalProperties": False,
}


@dataclass
class RRig(Rig):
    """A `Rig` that also knows the demo (no fake) and the Responses pass-through."""

    name: str = ""

    @property
    def passthrough(self) -> bool:
        return self.name == "openai-responses"

    def echo(self, text: str) -> str:
        return f"You said: {text}" if self.kind == "demo" else f"echo: {text}"

    def last(self) -> dict[str, Any]:
        paths = ("/chat/completions", "/responses", "/v1/messages", "generateContent")
        requests = [r for r in self.fake.requests if r.path.endswith(paths) or ":" in r.path]
        body: dict[str, Any] = requests[-1].json
        return body

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}


@pytest.fixture(params=KINDS)
async def rig(
    request: pytest.FixtureRequest,
    aiohttp_server: AiohttpServer,
    aiohttp_client: AiohttpClient,
    make_settings: MakeSettings,
) -> AsyncIterator[RRig]:
    name: str = request.param
    kind = "openai" if name == "openai-responses" else name
    providers: tuple[ProviderConfig, ...] = ()
    fake: Any = None
    target = Target(provider="demo", model="demo")
    if kind != "demo":
        fake = fake_for(kind)
        await fake.start(aiohttp_server)
        providers = (
            provider_config(
                kind,
                name="up",
                base_url=fake.base_url,
                api_keys=(UPSTREAM_KEY,),
                **({"responses_api": True} if name == "openai-responses" else {}),
            ),
        )
        target = Target(provider="up", model=UPSTREAM_MODELS[kind])
    model = ModelConfig(
        name="m", targets=(target,), input_price_per_mtok=1.0, output_price_per_mtok=2.0
    )
    gateway = await start_gateway(
        aiohttp_client, make_settings(providers=providers, models=(model,))
    )
    key = await create_key(gateway)
    async with openai_client(gateway, key) as client:
        yield RRig(kind, fake, gateway, key, client, name=name)


def sse(body: bytes) -> list[dict[str, Any]]:
    """A Responses event stream's events, checking the framing: `event:` line equal to the
    data's `type`, `sequence_number` counting from 0, no `[DONE]`, every event valid."""
    assert b"[DONE]" not in body
    events = []
    for block in body.split(b"\n\n"):
        if not block or block.startswith(b":"):
            continue
        name, data = block.split(b"\n")
        assert name.startswith(b"event: ") and data.startswith(b"data: "), block
        event = json.loads(data[6:])
        assert event["type"] == name[7:].decode()
        assert event["sequence_number"] == len(events)
        validate_response_event(event)
        events.append(event)
    return events


async def raw_stream(rig: RRig, **body: Any) -> list[dict[str, Any]]:
    body = {"model": "m", "stream": True} | body
    async with rig.gateway.post("/v1/responses", json=body, headers=rig.headers()) as resp:
        assert resp.status == 200, await resp.text()
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        return sse(await resp.read())


# ---- plain answers ---------------------------------------------------------------------------


async def test_plain_string_input(rig: RRig) -> None:
    raw = await rig.client.responses.with_raw_response.create(
        model="m", input="hello there", instructions="Be terse."
    )
    validate_response(json.loads(raw.text))
    reply = raw.parse()
    assert reply.object == "response"
    assert reply.id.startswith("resp_")
    assert reply.status == "completed"
    assert reply.output_text == rig.echo("hello there")
    assert reply.output[0].type == "message"
    assert reply.output[0].id.startswith("msg_")
    assert reply.usage is not None
    assert reply.usage.input_tokens > 0 and reply.usage.output_tokens > 0
    assert reply.usage.total_tokens == reply.usage.input_tokens + reply.usage.output_tokens
    if rig.passthrough:
        sent = rig.last()
        assert sent["model"] == UPSTREAM_MODELS["openai"]
        assert (sent["instructions"], sent["input"]) == ("Be terse.", "hello there")
    else:
        assert reply.instructions == "Be terse."
        assert reply.store is False  # nothing is kept
        if rig.fake is not None:
            assert rig.system_text() == "Be terse."
    rows = await usage_rows(rig.gateway)
    assert rows[-1]["endpoint"] == "/v1/responses"
    assert rows[-1]["status"] == 200
    assert rows[-1]["model"] == "m"
    assert rows[-1]["prompt_tokens"] == reply.usage.input_tokens
    assert rows[-1]["completion_tokens"] == reply.usage.output_tokens
    assert rows[-1]["estimated"] == 0


async def test_list_input_with_an_image(rig: RRig) -> None:
    url = f"data:image/png;base64,{PNG}"
    content = [
        {"type": "input_text", "text": "What is this?"},
        {"type": "input_image", "image_url": url, "detail": "auto"},
    ]
    reply = await rig.client.responses.create(
        model="m",
        input=[
            {"role": "developer", "content": "Be brief."},
            {"type": "message", "role": "user", "content": content},
        ],
    )
    assert reply.output_text == rig.echo("What is this?")
    if rig.passthrough:
        assert rig.last()["input"][1]["content"] == content
    elif rig.fake is not None:
        assert rig.images() == [url if rig.kind == "openai" else f"image/png:{PNG}"]


@pytest.mark.parametrize("rig", TRANSLATED, indirect=True)
async def test_settings_are_echoed(rig: RRig) -> None:
    raw = await rig.client.responses.with_raw_response.create(
        model="m",
        input="hi",
        temperature=0.5,
        top_p=0.9,
        max_output_tokens=64,
        metadata={"team": "blue"},
        store=True,
        tools=[WEATHER],
        tool_choice="none",
    )
    body = json.loads(raw.text)
    validate_response(body)
    assert (body["temperature"], body["top_p"], body["max_output_tokens"]) == (0.5, 0.9, 64)
    assert body["metadata"] == {"team": "blue"}
    assert body["store"] is False
    assert body["tool_choice"] == "none"
    assert body["tools"] == [WEATHER]


# ---- streams ---------------------------------------------------------------------------------


async def test_stream_helper(rig: RRig) -> None:
    deltas: list[str] = []
    types: list[str] = []
    async with rig.client.responses.stream(model="m", input="hello there") as stream:
        async for event in stream:
            types.append(event.type)
            if event.type == "response.output_text.delta":
                deltas.append(event.delta)
        final = await stream.get_final_response()
    assert final.output_text == rig.echo("hello there")
    assert "".join(deltas) == final.output_text
    assert len(deltas) > 1
    assert types[:2] == ["response.created", "response.in_progress"]
    assert types[-1] == "response.completed"
    assert final.usage is not None and final.usage.total_tokens > 0
    rows = await usage_rows(rig.gateway)
    assert (rows[-1]["endpoint"], rows[-1]["stream"], rows[-1]["status"]) == (
        "/v1/responses",
        1,
        200,
    )
    assert rows[-1]["completion_tokens"] == final.usage.output_tokens


async def test_stream_framing_and_event_order(rig: RRig) -> None:
    events = await raw_stream(rig, input="hello there")
    assert [e["type"] for e in events] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * (len(events) - 8),
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    created, final = events[0]["response"], events[-1]["response"]
    assert created["status"] == "in_progress" and created["output"] == []
    assert final["id"] == created["id"]
    validate_response(final)
    assert final["output"] == [events[-2]["item"]]
    text = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    assert text == final["output"][0]["content"][0]["text"] == rig.echo("hello there")


# ---- tools and JSON --------------------------------------------------------------------------


async def _call_weather(rig: RRig, *, stream: bool) -> Any:
    question = [{"role": "user", "content": "Weather in Paris?"}]
    if not stream:
        return await rig.client.responses.create(model="m", input=question, tools=[WEATHER])
    async with rig.client.responses.stream(model="m", input=question, tools=[WEATHER]) as events:
        return await events.get_final_response()


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
async def test_function_call_round_trip(rig: RRig, stream: bool) -> None:
    first = await _call_weather(rig, stream=stream)
    validate_response(first.to_dict())
    calls = [item for item in first.output if item.type == "function_call"]
    assert len(calls) == 1
    call = calls[0]
    assert call.name == "get_weather"
    assert call.id.startswith("fc_") and call.call_id and call.call_id != call.id
    assert isinstance(json.loads(call.arguments)["city"], str)
    history = [
        {"role": "user", "content": "Weather in Paris?"},
        *[item.to_dict() for item in first.output],  # the usual `input += response.output`
        {"type": "function_call_output", "call_id": call.call_id, "output": '{"temp_c": 21}'},
    ]
    second = await rig.client.responses.create(
        model="m", input=history, tools=[WEATHER], tool_choice="none"
    )
    assert second.output_text
    assert not [item for item in second.output if item.type == "function_call"]
    if rig.passthrough:
        assert rig.last()["input"][-1]["call_id"] == call.call_id
    elif rig.fake is not None:
        assert any("21" in result for result in rig.tool_results())
    else:
        assert "21" in second.output_text


async def test_function_call_stream_events(rig: RRig) -> None:
    events = await raw_stream(
        rig,
        input="Weather?",
        tools=[WEATHER],
        tool_choice={"type": "function", "name": "get_weather"},
    )
    added = [e for e in events if e["type"] == "response.output_item.added"]
    assert [e["item"]["type"] for e in added] == ["function_call"]
    item = added[0]["item"]
    assert (item["name"], item["arguments"], item["status"]) == ("get_weather", "", "in_progress")
    deltas = [e for e in events if e["type"] == "response.function_call_arguments.delta"]
    (done,) = [e for e in events if e["type"] == "response.function_call_arguments.done"]
    assert "".join(d["delta"] for d in deltas) == done["arguments"]
    assert all(d["item_id"] == item["id"] for d in deltas)
    final = events[-1]["response"]
    assert final["output"][0]["arguments"] == done["arguments"]
    assert final["output"][0]["call_id"] == item["call_id"]


async def test_json_schema_output(rig: RRig) -> None:
    reply = await rig.client.responses.create(
        model="m",
        input="Plan a trip.",
        text={"format": {"type": "json_schema", "name": "trip", "schema": SCHEMA, "strict": True}},
    )
    validate_response(reply.to_dict())
    data = json.loads(reply.output_text)
    assert isinstance(data["city"], str) and isinstance(data["days"], int)
    assert [item.type for item in reply.output] == ["message"]


async def test_json_object_output_streamed(rig: RRig) -> None:
    async with rig.client.responses.stream(
        model="m", input="Reply in JSON.", text={"format": {"type": "json_object"}}
    ) as stream:
        final = await stream.get_final_response()
    assert isinstance(json.loads(final.output_text), dict)


# ---- errors ----------------------------------------------------------------------------------


async def test_previous_response_id_is_refused(rig: RRig) -> None:
    request = rig.client.responses.create(model="m", input="again", previous_response_id="resp_123")
    if rig.passthrough:  # the upstream keeps its own responses
        await request
        assert rig.last()["previous_response_id"] == "resp_123"
        return
    with pytest.raises(openai.BadRequestError) as err:
        await request
    validate_error(err.value.response.json())
    assert err.value.param == "previous_response_id"
    assert err.value.code == "unsupported_parameter"
    assert "does not store responses" in err.value.message
    assert rig.fake is None or rig.fake.requests == []
    # Refused before any upstream call: counted, not written as a usage row.
    assert [status for _, status in await refusal_counts(rig.gateway)] == [400]


@pytest.mark.parametrize("rig", UPSTREAMS, indirect=True)
async def test_upstream_rate_limit(rig: RRig) -> None:
    rig.fake.script(status=429, headers={"retry-after": "7"})
    with pytest.raises(openai.RateLimitError) as err:
        await rig.client.responses.create(model="m", input="hi")
    validate_error(err.value.response.json())
    assert err.value.response.headers["retry-after"] == "7"
    rows = await usage_rows(rig.gateway)
    assert (rows[-1]["endpoint"], rows[-1]["status"]) == ("/v1/responses", 429)


@pytest.mark.parametrize("rig", UPSTREAMS, indirect=True)
async def test_error_mid_stream_is_an_error_event(rig: RRig) -> None:
    # Past the first piece of text (the fifth event of a Responses stream).
    rig.fake.script(error_after=5 if rig.passthrough else rig.content_started)
    events = await raw_stream(rig, input="hello there")
    assert events[-1]["type"] == "error"
    assert events[-1]["message"]
    assert any(e["type"] == "response.output_text.delta" for e in events)
    rows = await usage_rows(rig.gateway)
    assert rows[-1]["status"] >= 500


@pytest.mark.parametrize("rig", UPSTREAMS, indirect=True)
async def test_dropped_stream_is_an_error_event(rig: RRig) -> None:
    rig.fake.script(drop_after=5 if rig.passthrough else rig.content_started)
    stream = await rig.client.responses.create(model="m", input="hello there", stream=True)
    seen = [event.type async for event in stream]
    assert seen[0] == "response.created"
    assert seen[-1] == "error"
    rows = await usage_rows(rig.gateway)
    assert rows[-1]["status"] == 502


@pytest.mark.parametrize("rig", ["gemini"], indirect=True)
async def test_provider_refusals_name_the_responses_field(rig: RRig) -> None:
    content = [
        {"type": "input_text", "text": "What is this?"},
        {"type": "input_image", "image_url": "https://example.com/cat.png"},
    ]
    with pytest.raises(openai.BadRequestError) as err:
        await rig.client.responses.create(
            model="m", input=[{"role": "user", "content": content}], instructions="Be brief."
        )
    validate_error(err.value.response.json())
    assert err.value.param == "input[0].content[1]"  # not the chat request's messages[1]...
    assert "'input[0].content[1]'" in err.value.message
    assert rig.fake.requests == []


@pytest.mark.parametrize("rig", ["anthropic"], indirect=True)
@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
async def test_thinking_comes_back_as_a_reasoning_item(rig: RRig, stream: bool) -> None:
    rig.fake.always(thinking="Let me think.")
    if stream:
        events = await raw_stream(rig, input="hello there")
        assert "response.reasoning_text.delta" in {e["type"] for e in events}
        body = events[-1]["response"]
    else:
        raw = await rig.client.responses.with_raw_response.create(model="m", input="hello there")
        body = json.loads(raw.text)
    validate_response(body)
    reasoning, message = body["output"]
    assert reasoning["type"] == "reasoning"
    assert reasoning["content"] == [{"type": "reasoning_text", "text": "Let me think."}]
    assert message["content"][0]["text"] == "echo: hello there"
    # Sent back as history (`input += output`), the reasoning item is dropped, not refused.
    history = [{"role": "user", "content": "hello there"}, *body["output"]]
    again = await rig.client.responses.create(
        model="m", input=[*history, {"role": "user", "content": "more"}]
    )
    assert again.output_text == "echo: more"


@pytest.mark.parametrize("kind", ["anthropic", "gemini"])
async def test_several_output_items_stream_through_the_sdk_helper(
    kind: str,
    aiohttp_server: AiohttpServer,
    aiohttp_client: AiohttpClient,
    make_settings: MakeSettings,
) -> None:
    """Text, then two tool calls: each item gets its own output_index, as the SDK demands."""
    fake = fake_for(kind)
    await fake.start(aiohttp_server)
    if kind == "anthropic":
        fake.script(content="Let me check.", parallel=True)
    else:
        fake.script(content="Let me check.", tool_call=True, parallel=True)
    provider = provider_config(kind, name="up", base_url=fake.base_url, api_keys=(UPSTREAM_KEY,))
    model = ModelConfig(name="m", targets=(Target(provider="up", model=UPSTREAM_MODELS[kind]),))
    gateway = await start_gateway(
        aiohttp_client, make_settings(providers=(provider,), models=(model,))
    )
    key = await create_key(gateway)
    tools = [WEATHER, {**WEATHER, "name": "get_time"}]
    async with (
        openai_client(gateway, key) as client,
        client.responses.stream(model="m", input="Weather and time?", tools=tools) as stream,
    ):
        indices = [e.output_index async for e in stream if e.type == "response.output_item.added"]
        final = await stream.get_final_response()
    assert indices == list(range(len(final.output)))
    kinds = [item.type for item in final.output]
    assert kinds[0] == "message" and kinds.count("function_call") == 2
    assert final.output_text.startswith("Let me check.")


def sdk_final_response(events: list[dict[str, Any]], tools: list[dict[str, Any]]) -> Any:
    """Feed raw gateway events to the SDK's own stream state machine; its final response."""
    adapter: pydantic.TypeAdapter[Any] = pydantic.TypeAdapter(ResponseStreamEvent)
    state: ResponseStreamState[Any] = ResponseStreamState(
        input_tools=tools,  # type: ignore[arg-type]
        text_format=omit,
    )
    completed = []
    for raw in events:
        for event in state.handle_event(adapter.validate_python(raw)):
            if event.type == "response.completed":
                completed.append(event.response)
    (final,) = completed
    return final


@pytest.mark.parametrize("scenario", ["reasoning-text", "text-two-calls"])
async def test_sdk_stream_state_accepts_the_events(
    scenario: str,
    aiohttp_server: AiohttpServer,
    aiohttp_client: AiohttpClient,
    make_settings: MakeSettings,
) -> None:
    """The installed SDK's `ResponseStreamState` (behind `responses.stream()`) over what the
    gateway streams: thinking then text from a reasoning model, and text then two calls."""
    fake = fake_for("anthropic")
    await fake.start(aiohttp_server)
    tools: list[dict[str, Any]] = []
    body: dict[str, Any] = {"input": "hello there"}
    if scenario == "reasoning-text":
        fake.always(thinking="Let me think it through.")
        body["reasoning"] = {"effort": "low"}
    else:
        fake.script(content="Let me check.", parallel=True)
        tools = [WEATHER, {**WEATHER, "name": "get_time"}]
        body["tools"] = tools
    provider = AnthropicConfig(
        name="up",
        base_url=fake.base_url,
        api_keys=(UPSTREAM_KEY,),
        reasoning_models=("claude-sonnet-4*",),
    )
    target = Target(provider="up", model="claude-sonnet-4-5")
    model = ModelConfig(name="m", targets=(target,), reasoning=scenario == "reasoning-text")
    gateway = await start_gateway(
        aiohttp_client, make_settings(providers=(provider,), models=(model,))
    )
    key = await create_key(gateway)
    async with openai_client(gateway, key) as client:
        rig = RRig("anthropic", fake, gateway, key, client, name="anthropic")
        events = await raw_stream(rig, **body)
    final = sdk_final_response(events, tools)
    assert final.status == "completed"
    done = [e["item"]["id"] for e in events if e["type"] == "response.output_item.done"]
    assert [item.id for item in final.output] == done
    kinds = [item.type for item in final.output]
    if scenario == "reasoning-text":
        assert rig.last()["thinking"]["type"] == "enabled"
        assert kinds == ["reasoning", "message"]
        assert final.output[0].content[0].text == "Let me think it through."
        assert final.output_text == "echo: hello there"
        deltas = [e["output_index"] for e in events if e["type"].endswith(".delta")]
        assert deltas[0] == 0 and deltas[-1] == 1  # thinking first, then the text
    else:
        assert kinds == ["message", "function_call", "function_call"]
        assert [item.name for item in final.output[1:]] == ["get_weather", "get_time"]
        assert [json.loads(item.arguments) for item in final.output[1:]] == [
            json.loads(e["arguments"])
            for e in events
            if e["type"] == "response.function_call_arguments.done"
        ]
        assert final.output_text == "Let me check."
