"""`/v1/responses` passed through to OpenAI-compatible upstreams with `responses_api = true`:
what is forwarded, and how odd upstream streams and bodies are handled."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
import pytest
from aiohttp import web
from aiohttp.pytest_plugin import AiohttpClient, AiohttpServer
from aiohttp.test_utils import TestClient

from gateway.providers import base as provider_base
from gateway.settings import ModelConfig, OpenAIConfig, RoutingSettings, Target
from tests.conftest import NEVER_HANG, MakeSettings, create_key, start_gateway, usage_rows
from tests.fakes import FakeOpenAI
from tests.test_responses import sse

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Start = Callable[..., Awaitable[tuple[TestClient[Any, Any], str]]]


@pytest.fixture
def start(
    aiohttp_server: AiohttpServer, aiohttp_client: AiohttpClient, make_settings: MakeSettings
) -> Start:
    """A gateway whose model `m` passes Responses requests through to `upstream`."""

    async def run(
        upstream: web.Application, max_tokens: int | None = None
    ) -> tuple[TestClient[Any, Any], str]:
        server = await aiohttp_server(upstream)
        provider = OpenAIConfig(name="up", base_url=str(server.make_url("/v1")), responses_api=True)
        model = ModelConfig(
            name="m", targets=(Target(provider="up", model="up-model"),), max_tokens=max_tokens
        )
        gateway = await start_gateway(
            aiohttp_client, make_settings(providers=(provider,), models=(model,))
        )
        return gateway, await create_key(gateway)

    return run


def app(handler: Handler) -> web.Application:
    upstream = web.Application()
    upstream.router.add_post("/v1/responses", handler)
    return upstream


def events_handler(*frames: bytes) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for frame in frames:
            await response.write(frame)
        await response.write_eof()
        return response

    return handler


def event(kind: str, number: int, **fields: Any) -> bytes:
    data = {"type": kind, "sequence_number": number} | fields
    return f"event: {kind}\ndata: {json.dumps(data)}\n\n".encode()


RESPONSE = {
    "id": "resp_1",
    "object": "response",
    "created_at": 1,
    "status": "in_progress",
    "model": "up-model",
    "output": [],
    "error": None,
    "incomplete_details": None,
    "instructions": None,
    "metadata": {},
    "parallel_tool_calls": True,
    "temperature": 1.0,
    "top_p": 1.0,
    "tool_choice": "auto",
    "tools": [],
}
USAGE = {
    "input_tokens": 11,
    "input_tokens_details": {"cached_tokens": 2, "cache_write_tokens": 0},
    "output_tokens": 5,
    "output_tokens_details": {"reasoning_tokens": 1},
    "total_tokens": 16,
}


async def post(gateway: TestClient[Any, Any], key: str, **body: Any) -> tuple[int, bytes]:
    body = {"model": "m", "input": "hi"} | body
    headers = {"Authorization": f"Bearer {key}"}
    async with gateway.post("/v1/responses", json=body, headers=headers) as resp:
        return resp.status, await resp.read()


async def test_the_client_body_is_forwarded(start: Start, aiohttp_server: AiohttpServer) -> None:
    fake = FakeOpenAI()
    gateway, key = await start(fake.make_app(), max_tokens=77)
    tools = [{"type": "web_search"}, {"type": "function", "name": "f", "parameters": {}}]
    status, _ = await post(gateway, key, tools=tools, tool_choice="none", x_custom={"a": 1})
    assert status == 200
    sent = fake.responses_requests[-1]
    assert sent.json["model"] == "up-model"
    assert sent.json["max_output_tokens"] == 77  # the model's default limit
    assert sent.json["tools"] == tools  # built-in tools are the upstream's business
    assert sent.json["x_custom"] == {"a": 1}
    assert sent.headers["x-request-id"]
    status, _ = await post(gateway, key, max_output_tokens=5)
    assert fake.responses_requests[-1].json["max_output_tokens"] == 5


async def test_usage_comes_from_the_terminal_event(start: Start) -> None:
    done = RESPONSE | {"status": "completed", "usage": USAGE}
    gateway, key = await start(
        app(
            events_handler(
                event("response.created", 0, response=RESPONSE),
                event("response.completed", 1, response=done),
                b"data: [DONE]\n\n",  # not OpenAI's, but some servers send it
            )
        )
    )
    status, body = await post(gateway, key, stream=True)
    assert status == 200
    assert [e["type"] for e in sse(body)] == ["response.created", "response.completed"]
    row = (await usage_rows(gateway))[-1]
    assert (row["prompt_tokens"], row["completion_tokens"], row["estimated"]) == (11, 5, 0)


@pytest.mark.parametrize(
    "frames",
    [
        (event("response.created", 0, response=RESPONSE),),
        (event("response.created", 0, response=RESPONSE), b"data: {not json\n\n"),
        (
            event("response.created", 0, response=RESPONSE),
            b'data: {"type":"error","error":{"message":"boom","type":"server_error"}}\n\n',
        ),
        (
            event("response.created", 0, response=RESPONSE),
            b'data: {"error":{"message":"boom","type":"server_error"}}\n\n',
        ),
    ],
    ids=["no-terminal-event", "malformed-event", "wrapped-error-event", "chat-error-event"],
)
async def test_broken_streams_end_with_an_error_event(
    start: Start, frames: tuple[bytes, ...]
) -> None:
    gateway, key = await start(app(events_handler(*frames)))
    status, body = await post(gateway, key, stream=True)
    assert status == 200
    events = sse(body)
    assert [e["type"] for e in events] == ["response.created", "error"]
    assert events[-1]["sequence_number"] == 1
    assert (await usage_rows(gateway))[-1]["status"] == 502


async def test_an_empty_stream_is_a_502(start: Start) -> None:
    gateway, key = await start(app(events_handler()))
    status, body = await post(gateway, key, stream=True)
    assert status == 502, body


async def test_multi_line_events_are_reframed(start: Start) -> None:
    pretty = json.dumps(
        {"type": "response.created", "sequence_number": 0, "response": RESPONSE}, indent=1
    )
    data = "".join(f"data: {line}\n" for line in pretty.splitlines())
    done = RESPONSE | {"status": "completed", "usage": USAGE}
    gateway, key = await start(
        app(
            events_handler(
                f"event: response.created\n{data}\n".encode(),
                event("response.completed", 1, response=done),
            )
        )
    )
    status, body = await post(gateway, key, stream=True)
    assert status == 200
    assert [e["type"] for e in sse_multiline(body)] == ["response.created", "response.completed"]


def sse_multiline(body: bytes) -> list[dict[str, Any]]:
    events = []
    for block in body.split(b"\n\n"):
        if not block:
            continue
        name, *data = block.split(b"\n")
        assert name.startswith(b"event: ")
        events.append(json.loads(b"\n".join(line[6:] for line in data)))
    return events


async def test_unreadable_usage_still_answers(start: Start) -> None:
    body = RESPONSE | {"status": "completed", "usage": USAGE | {"input_tokens": 1.5}}

    async def handler(request: web.Request) -> web.Response:
        return web.json_response(body)

    gateway, key = await start(app(handler))
    status, answer = await post(gateway, key)
    assert status == 200
    assert json.loads(answer)["id"] == "resp_1"
    row = (await usage_rows(gateway))[-1]
    assert row["status"] == 200


async def test_malformed_body_is_a_502(start: Start) -> None:
    async def handler(request: web.Request) -> web.Response:
        return web.Response(body=b"{not json", content_type="application/json")

    gateway, key = await start(app(handler))
    status, _ = await post(gateway, key)
    assert status == 502


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
async def test_a_failing_account_fails_over(
    aiohttp_server: AiohttpServer,
    aiohttp_client: AiohttpClient,
    make_settings: MakeSettings,
    stream: bool,
) -> None:
    fake = FakeOpenAI()
    await fake.start(aiohttp_server)
    provider = OpenAIConfig(
        name="up", base_url=fake.base_url, api_keys=("k1", "k2"), responses_api=True
    )
    model = ModelConfig(name="m", targets=(Target(provider="up", model="up-model"),))
    settings = make_settings(providers=(provider,), models=(model,))
    settings = msgspec.structs.replace(settings, routing=RoutingSettings(backoff_initial=0))
    gateway = await start_gateway(aiohttp_client, settings)
    key = await create_key(gateway)
    fake.script(status=503)
    status, body = await post(gateway, key, stream=stream)
    assert status == 200, body
    assert [r.headers["authorization"] for r in fake.responses_requests] == [
        "Bearer k1",
        "Bearer k2",
    ]
    row = (await usage_rows(gateway))[-1]
    assert (row["status"], row["estimated"]) == (200, 0)


# ---- which routes a request takes ---------------------------------------------------------------


@pytest.fixture
def mixed(
    aiohttp_server: AiohttpServer, aiohttp_client: AiohttpClient, make_settings: MakeSettings
) -> Callable[..., Awaitable[tuple[TestClient[Any, Any], str, FakeOpenAI, FakeOpenAI]]]:
    """A gateway whose model `m` has a pass-through target (fake `through`) and a translated
    one (fake `chat`); `through_first` says which has the better priority."""

    async def run(
        *, through_first: bool
    ) -> tuple[TestClient[Any, Any], str, FakeOpenAI, FakeOpenAI]:
        through, chat = FakeOpenAI(), FakeOpenAI()
        await through.start(aiohttp_server)
        await chat.start(aiohttp_server)
        providers = (
            OpenAIConfig(name="pt", base_url=through.base_url, responses_api=True),
            OpenAIConfig(name="chat", base_url=chat.base_url),
        )
        targets = (
            Target(provider="pt", model="pt-model", priority=0 if through_first else 1),
            Target(provider="chat", model="chat-model", priority=1 if through_first else 0),
        )
        settings = make_settings(
            providers=providers, models=(ModelConfig(name="m", targets=targets),)
        )
        gateway = await start_gateway(aiohttp_client, settings)
        return gateway, await create_key(gateway), through, chat

    return run


async def test_what_only_a_pass_through_serves_goes_to_one(mixed: Any) -> None:
    # The router put the translated target first; a built-in tool still finds its upstream.
    gateway, key, through, chat = await mixed(through_first=False)
    status, body = await post(gateway, key, tools=[{"type": "web_search"}])
    assert status == 200, body
    assert through.responses_requests[-1].json["tools"] == [{"type": "web_search"}]
    assert chat.requests == []


async def test_what_only_a_pass_through_serves_does_not_fall_back(mixed: Any) -> None:
    gateway, key, through, chat = await mixed(through_first=True)
    through.always(status=503)
    status, _ = await post(gateway, key, previous_response_id="resp_1")
    assert status == 503
    assert chat.requests == []


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
async def test_failed_pass_through_falls_back_to_translation(mixed: Any, stream: bool) -> None:
    gateway, key, through, chat = await mixed(through_first=True)
    through.always(status=503)
    status, body = await post(gateway, key, input="hello there", stream=stream)
    assert status == 200, body
    final = sse(body)[-1]["response"] if stream else json.loads(body)
    assert final["output"][0]["content"][0]["text"] == "echo: hello there"
    assert final["id"].startswith("resp_") and final["store"] is False  # the gateway's own
    assert [r.path for r in through.requests] == ["/v1/responses"]
    assert [r.path for r in chat.requests] == ["/v1/chat/completions"]
    assert chat.requests[0].json["model"] == "chat-model"
    row = (await usage_rows(gateway))[-1]
    assert (row["status"], row["provider"]) == (200, "chat")


async def test_a_request_the_upstream_refuses_does_not_fall_back(mixed: Any) -> None:
    gateway, key, through, chat = await mixed(through_first=True)
    through.always(status=400)
    status, _ = await post(gateway, key)
    assert status == 400
    assert chat.requests == []


async def test_pass_through_bodies_are_not_translated_again(
    start: Start, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The chat request's fields are only encoded (for OpenAI chat upstreams) if it is sent.
    encoded: list[object] = []

    def raw_fields(obj: object) -> dict[str, object]:
        encoded.append(obj)
        return {}

    monkeypatch.setattr(provider_base, "raw_fields", raw_fields)
    gateway, key = await start(FakeOpenAI().make_app())
    status, _ = await post(gateway, key)
    assert status == 200
    assert encoded == []


# ---- what is forwarded as sent ------------------------------------------------------------------


async def test_store_and_stream_options_are_forwarded_as_sent(start: Start) -> None:
    # Storage then happens at the upstream (OpenAI stores by default), not in the gateway.
    fake = FakeOpenAI()
    gateway, key = await start(fake.make_app())
    options = {"include_obfuscation": False}
    status, _ = await post(gateway, key, store=True, stream=True, stream_options=options)
    assert status == 200
    sent = fake.responses_requests[-1].json
    assert (sent["store"], sent["stream_options"]) == (True, options)
    await post(gateway, key)
    assert "store" not in fake.responses_requests[-1].json


async def test_stream_options_without_a_stream_is_a_400(start: Start) -> None:
    fake = FakeOpenAI()
    gateway, key = await start(fake.make_app())
    status, body = await post(gateway, key, stream_options={"include_obfuscation": False})
    assert status == 400
    assert json.loads(body)["error"]["param"] == "stream_options"
    assert fake.requests == []


# ---- the end of a stream, and its errors --------------------------------------------------------


async def test_nothing_is_read_after_the_terminal_event(start: Start) -> None:
    done = RESPONSE | {"status": "completed", "usage": USAGE}
    release = asyncio.Event()

    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(event("response.created", 0, response=RESPONSE))
        await response.write(event("response.completed", 1, response=done))
        await response.write(event("response.output_text.delta", 2, delta="late"))
        with contextlib.suppress(ConnectionError):
            await release.wait()  # the connection stays open
        return response

    gateway, key = await start(app(handler))
    try:
        async with asyncio.timeout(NEVER_HANG):  # it would wait for `release` forever
            status, body = await post(gateway, key, stream=True)
    finally:
        release.set()
    assert status == 200
    assert [e["type"] for e in sse(body)] == ["response.created", "response.completed"]
    row = (await usage_rows(gateway))[-1]
    assert (row["status"], row["prompt_tokens"], row["estimated"]) == (200, 11, 0)


CONTEXT = "Your input exceeds the context window of this model."


@pytest.mark.parametrize(
    ("error", "status", "code"),
    [
        (  # as OpenAI sends it
            {
                "error": {
                    "type": "invalid_request_error",
                    "code": "context_length_exceeded",
                    "message": CONTEXT,
                    "param": "input",
                }
            },
            400,
            "context_length_exceeded",
        ),
        (  # as OpenAI documents it
            {"code": "context_length_exceeded", "message": CONTEXT, "param": "input"},
            400,
            "context_length_exceeded",
        ),
        (
            {"error": {"type": "tokens", "code": "rate_limit_exceeded", "message": "Slow."}},
            429,
            "rate_limit_exceeded",
        ),
    ],
    ids=["wrapped", "flat", "rate-limit"],
)
async def test_error_events_keep_their_class(
    start: Start, error: dict[str, Any], status: int, code: str
) -> None:
    data = {"type": "error", "sequence_number": 0} | error
    first = f"event: error\ndata: {json.dumps(data)}\n\n".encode()
    # Before the first event: the status the error stands for, not a retryable 503.
    gateway, key = await start(app(events_handler(first)))
    got, body = await post(gateway, key, stream=True)
    assert got == status, body
    answer = json.loads(body)["error"]
    assert answer["code"] == code
    if status == 400:
        assert (answer["message"], answer["param"]) == (CONTEXT, "input")
    # Mid-stream: an error event with the upstream's code.
    later = event("response.created", 0, response=RESPONSE) + first.replace(
        b'"sequence_number": 0', b'"sequence_number": 1'
    )
    gateway, key = await start(app(events_handler(later)))
    got, body = await post(gateway, key, stream=True)
    assert got == 200
    events = sse(body)
    assert events[-1]["type"] == "error"
    assert events[-1]["code"] == code
    assert (await usage_rows(gateway))[-1]["status"] == status


async def test_background_is_relayed_only_for_a_key_that_counts_no_tokens(
    start: Start, make_settings: MakeSettings
) -> None:
    """`background: true` is answered at once upstream (`queued`, no usage) and generated
    there afterwards, past the gateway: a key without a budget or tokens per minute has it
    relayed; one with either gets a 400 naming `background`, and nothing goes upstream."""
    fake = FakeOpenAI()
    gateway, plain = await start(fake.make_app())
    status, _ = await post(gateway, plain, background=True)
    assert status == 200
    assert fake.responses_requests[-1].json["background"] is True
    relayed = len(fake.responses_requests)
    rated = await create_key(gateway, name="r", rpm=1_000)  # counts requests, not tokens
    status, _ = await post(gateway, rated, background=True)
    assert status == 200
    relayed += 1
    for fields in ({"budget_tokens": 10_000}, {"tpm": 100_000}):
        key = await create_key(gateway, name="k", **fields)
        for stream in (False, True):
            status, body = await post(gateway, key, background=True, stream=stream)
            assert status == 400, body
            error = json.loads(body)["error"]
            assert error["param"] == "background", error
            assert error["code"] == "unsupported_parameter", error
            assert "cannot count it" in error["message"], error
        status, _ = await post(gateway, key, background=False)  # not background: relayed
        assert status == 200
        relayed += 1
    assert len(fake.responses_requests) == relayed
