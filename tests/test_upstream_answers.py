"""Upstream answers are checked before they are relayed (issue #12).

A `200` that is not a completion (an error object, `null`, wrong types) becomes the error
status it stands for, on every provider type; an OpenAI stream that ends with neither `[DONE]`
nor a `finish_reason`, or sends an event that is not JSON, ends with an error event instead of
looking complete. All seen through the real `openai` client, as a user would.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

import openai
import pytest
from aiohttp import web
from aiohttp.pytest_plugin import AiohttpClient, AiohttpServer

from gateway.settings import ModelConfig, RoutingSettings, Target
from tests.conftest import MakeSettings, create_key, openai_client, provider_config, start_gateway
from tests.test_robustness import chunk

# Provider type ("responses": an openai one that serves the Responses API) -> base URL path.
KINDS = {"openai": "/v1", "azure": "", "anthropic": "", "gemini": "", "responses": "/v1"}
COMPLETION = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "created": 1,
    "model": "m-1",
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "hi", "refusal": None},
            "logprobs": None,
            "finish_reason": "stop",
        }
    ],
}
# A 200 whose body is not what each API promises, with the wrong type somewhere.
WRONG_TYPES = {
    "openai": {"object": "chat.completion", "choices": "nope"},
    "azure": {"choices": [{"index": 0, "message": "nope"}]},
    "anthropic": {"type": "message", "content": "nope"},
    "gemini": {"candidates": "nope"},
    "responses": {"object": "response", "output": "nope"},
}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Start = Callable[..., Awaitable[openai.AsyncOpenAI]]


@pytest.fixture
def start(
    aiohttp_server: AiohttpServer, aiohttp_client: AiohttpClient, make_settings: MakeSettings
) -> Start:
    async def make(
        kind: str, handler: Handler, keys: tuple[str, ...] = ("k1",), attempts: int = 1
    ) -> openai.AsyncOpenAI:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handler)
        server = await aiohttp_server(app)
        base = str(server.make_url(KINDS[kind])).rstrip("/")
        extra: dict[str, Any] = {"api_version": "2024-10-21"} if kind == "azure" else {}
        if kind == "responses":
            kind, extra = "openai", {"responses_api": True}
        provider = provider_config(kind, name="up", base_url=base, api_keys=keys, **extra)
        model = ModelConfig(name="m", targets=(Target(provider="up", model="m-1"),))
        routing = RoutingSettings(max_attempts=attempts, backoff_initial=0, backoff_max=0)
        settings = make_settings(providers=(provider,), models=(model,), routing=routing)
        gateway = await start_gateway(aiohttp_client, settings)
        return openai_client(gateway, await create_key(gateway))

    return make


def answering(body: Any) -> Handler:
    async def handler(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response(body)

    return handler


async def ask(client: openai.AsyncOpenAI, kind: str) -> Any:
    async with client:
        if kind == "responses":
            return await client.responses.create(model="m", input="hi")
        return await client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}]
        )


def _envelope(kind: str, error: dict[str, Any]) -> dict[str, Any]:
    """An error body as each upstream writes it."""
    if kind == "anthropic":
        return {"type": "error", "error": error}
    return {"error": error}


@pytest.mark.parametrize("kind", list(KINDS))
async def test_a_200_carrying_an_error_is_that_error(start: Start, kind: str) -> None:
    blame = {"type": "invalid_request_error", "message": "messages: too long", "param": "messages"}
    with pytest.raises(openai.BadRequestError) as bad:
        await ask(await start(kind, answering(_envelope(kind, blame))), kind)
    assert bad.value.message.endswith(" - messages: too long") and bad.value.param == "messages"
    limited = {"type": "rate_limit_error", "message": "Number of requests has exceeded your limit"}
    with pytest.raises(openai.RateLimitError):
        await ask(await start(kind, answering(_envelope(kind, limited))), kind)
    broken = {"type": "server_error", "message": "The server had an error"}
    with pytest.raises(openai.APIStatusError) as failed:
        await ask(await start(kind, answering(_envelope(kind, broken))), kind)
    assert failed.value.status_code == 502 and failed.value.code == "upstream_bad_response"
    assert "answered HTTP 200 with an error: The server had an error" in failed.value.message


async def test_googles_error_with_its_http_code_keeps_that_status(start: Start) -> None:
    unavailable = {"error": {"code": 503, "message": "overloaded", "status": "UNAVAILABLE"}}
    with pytest.raises(openai.InternalServerError) as err:
        await ask(await start("gemini", answering(unavailable)), "gemini")
    assert err.value.status_code == 503


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("body", ["null", "[]", "wrong types", '"text"'])
async def test_a_200_that_is_not_an_answer_is_a_502(start: Start, kind: str, body: str) -> None:
    reply = WRONG_TYPES[kind] if body == "wrong types" else json.loads(body)
    with pytest.raises(openai.APIStatusError) as err:
        await ask(await start(kind, answering(reply)), kind)
    assert err.value.status_code == 502 and err.value.code == "upstream_bad_response"
    assert "answered HTTP 200" in err.value.message


async def test_another_account_answers_after_a_bad_200(start: Start) -> None:
    """A bad answer is the upstream's fault, which another account may not share."""
    seen: list[str] = []

    async def handler(request: web.Request) -> web.Response:
        await request.read()
        seen.append(request.headers["authorization"])
        return web.json_response(None if len(seen) == 1 else COMPLETION)

    client = await start("openai", handler, keys=("k1", "k2"), attempts=2)
    reply = await ask(client, "openai")
    assert reply.choices[0].message.content == "hi"
    assert seen == ["Bearer k1", "Bearer k2"]


def streaming(*frames: bytes) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for frame in frames:
            await resp.write(frame)
        return resp

    return handler


async def stream_text(client: openai.AsyncOpenAI) -> str:
    async with client:
        events = await client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        return "".join([c.choices[0].delta.content or "" async for c in events if c.choices])


HEAD = chunk({"role": "assistant", "content": "one"}) + chunk({"content": " two"})


@pytest.mark.parametrize("kind", ["openai", "azure"])
async def test_a_stream_cut_short_ends_with_an_error_event(start: Start, kind: str) -> None:
    """Before #12 the gateway finished it with its own [DONE], hiding the truncation."""
    client = await start(kind, streaming(HEAD))  # no finish_reason, no [DONE]
    with pytest.raises(openai.APIError, match="before the answer was complete"):
        await stream_text(client)


async def test_a_finished_stream_without_done_still_completes(start: Start) -> None:
    client = await start("openai", streaming(HEAD, chunk({}, "stop")))
    assert await stream_text(client) == "one two"


async def test_blank_keep_alive_events_are_not_relayed(start: Start) -> None:
    """`data:` with nothing after it would make the SDK fail to parse it."""
    frames = (HEAD, b"data: \n\n", chunk({}, "stop"), b"data: [DONE]\n\n")
    assert await stream_text(await start("openai", streaming(*frames))) == "one two"


@pytest.mark.parametrize("bad", [b"data: {not json\n\n", b"data: 42\n\n", b'data: "x"\n\n'])
async def test_an_event_that_is_not_a_json_object_is_an_error_event(
    start: Start, bad: bytes
) -> None:
    client = await start("openai", streaming(HEAD, bad, chunk({}, "stop"), b"data: [DONE]\n\n"))
    with pytest.raises(openai.APIError, match="not a JSON object"):
        await stream_text(client)


async def test_a_first_event_that_is_not_json_is_a_status(start: Start) -> None:
    """Nothing went out yet: the client gets a status (503, another route may do better)."""
    client = await start("openai", streaming(b"data: {not json\n\n"))
    with pytest.raises(openai.InternalServerError) as err:
        await stream_text(client)
    assert err.value.status_code == 503
