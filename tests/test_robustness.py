"""Hostile clients and odd upstreams: nothing crashes, leaks, or blames the wrong party."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.pytest_plugin import AiohttpClient, AiohttpServer
from aiohttp.test_utils import TestClient

from gateway.providers import demo
from gateway.settings import ModelConfig, OpenAIConfig, Target
from gateway.state import KEYS_KEY
from tests.conftest import (
    NEVER_HANG,
    MakeSettings,
    app_of,
    calls_in,
    create_key,
    openai_client,
    refusal_counts,
    start_gateway,
    usage_rows,
)
from tests.fakes import completion

CHAT = "/v1/chat/completions"
Reply = Callable[[web.Request], Awaitable[web.StreamResponse]]


def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
    obj = {
        "id": "c1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "m",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


class Raw:
    """A gateway in front of an upstream whose every reply a test writes by hand."""

    def __init__(self, gateway: TestClient[Any, Any], key: str, seen: list[Any]) -> None:
        self.gateway, self.key, self.seen = gateway, key, seen

    async def post(self, body: dict[str, Any]) -> Any:
        headers = {"Authorization": f"Bearer {self.key}"}
        return await self.gateway.post(CHAT, json=body, headers=headers)


@pytest.fixture
def raw_upstream(
    aiohttp_server: AiohttpServer, aiohttp_client: AiohttpClient, make_settings: MakeSettings
) -> Callable[[Reply], Awaitable[Raw]]:
    async def build(reply: Reply) -> Raw:
        seen: list[Any] = []

        async def handler(request: web.Request) -> web.StreamResponse:
            seen.append(await request.json())
            return await reply(request)

        app = web.Application()
        app.router.add_post("/v1/chat/completions", handler)
        server = await aiohttp_server(app)
        base = str(server.make_url("/v1"))
        settings = make_settings(
            providers=(OpenAIConfig(name="up", base_url=base, api_keys=("k",)),),
            models=(
                ModelConfig(name="gpt", targets=(Target(provider="up", model="gpt-4o-mini"),)),
                ModelConfig(
                    name="thinker", targets=(Target(provider="up", model="o3"),), reasoning=True
                ),
            ),
        )
        gateway = await start_gateway(aiohttp_client, settings)
        return Raw(gateway, await create_key(gateway), seen)

    return build


GPT = {"model": "gpt", "messages": [{"role": "user", "content": "x"}]}


async def test_client_max_tokens_becomes_max_completion_tokens_for_reasoning_models(
    raw_upstream: Any,
) -> None:
    async def reply(request: web.Request) -> web.StreamResponse:
        return web.json_response(
            completion({"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2})
        )

    rig = await raw_upstream(reply)
    assert (await rig.post({**GPT, "model": "thinker", "max_tokens": 100})).status == 200
    assert "max_tokens" not in rig.seen[-1] and rig.seen[-1]["max_completion_tokens"] == 100
    assert (await rig.post({**GPT, "max_tokens": 100})).status == 200
    assert rig.seen[-1]["max_tokens"] == 100


async def test_unreadable_usage_costs_no_answer_and_no_later_rows(raw_upstream: Any) -> None:
    calls = iter([10**20, 1, 1])

    async def reply(request: web.Request) -> web.StreamResponse:
        n = next(calls)
        return web.json_response(
            completion({"prompt_tokens": n, "completion_tokens": 1, "total_tokens": n + 1})
        )

    rig = await raw_upstream(reply)
    for _ in range(3):
        assert (await rig.post(GPT)).status == 200
    rows = await usage_rows(rig.gateway)
    assert [r["estimated"] for r in rows] == [1, 0, 0]


async def test_unreadable_usage_chunk_mid_stream_still_completes(raw_upstream: Any) -> None:
    async def reply(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(chunk({"role": "assistant", "content": "hi"}))
        await resp.write(chunk({}, "stop"))
        await resp.write(b'data: {"id":"c1","choices":[],"usage":{"prompt_tokens":1.5}}\n\n')
        await resp.write(b"data: [DONE]\n\n")
        return resp

    rig = await raw_upstream(reply)
    resp = await rig.post({**GPT, "stream": True})
    body = await resp.read()
    assert body.endswith(b"data: [DONE]\n\n") and b'"usage"' not in body
    assert (await usage_rows(rig.gateway))[-1]["estimated"] == 1


async def test_stream_answered_with_plain_json_is_an_error_not_an_empty_success(
    raw_upstream: Any,
) -> None:
    async def reply(request: web.Request) -> web.StreamResponse:
        return web.json_response({"error": {"message": "overloaded", "type": "server_error"}})

    rig = await raw_upstream(reply)
    resp = await rig.post({**GPT, "stream": True})
    assert resp.status == 502
    assert (await resp.json())["error"]["type"] == "upstream_error"


async def test_multi_line_data_events_are_reframed(raw_upstream: Any) -> None:
    async def reply(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        pretty = json.dumps(json.loads(chunk({"role": "assistant", "content": "a"})[6:]), indent=1)
        await resp.write(("data: " + pretty.replace("\n", "\ndata: ") + "\n\n").encode())
        await resp.write(chunk({}, "stop") + b"data: [DONE]\n\n")
        return resp

    rig = await raw_upstream(reply)
    async with openai_client(rig.gateway, rig.key) as client:
        stream = await client.chat.completions.create(
            model="gpt", messages=GPT["messages"], stream=True
        )  # type: ignore[arg-type]
        chunks = [c async for c in stream]
    assert chunks[0].choices[0].delta.content == "a"


async def test_unknown_stream_options_are_kept(raw_upstream: Any) -> None:
    async def reply(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(chunk({}, "stop") + b"data: [DONE]\n\n")
        return resp

    rig = await raw_upstream(reply)
    await rig.post({**GPT, "stream": True, "stream_options": {"continuous_usage_stats": True}})
    assert rig.seen[-1]["stream_options"] == {"continuous_usage_stats": True, "include_usage": True}


async def test_google_style_bad_key_is_a_gateway_fault(raw_upstream: Any) -> None:
    async def reply(request: web.Request) -> web.StreamResponse:
        body = [
            {
                "error": {
                    "code": 400,
                    "message": "API key not valid. Please pass a valid API key.",
                    "status": "INVALID_ARGUMENT",
                    "details": [
                        {
                            "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                            "reason": "API_KEY_INVALID",
                        }
                    ],
                }
            }
        ]
        return web.json_response(body, status=400)

    rig = await raw_upstream(reply)
    resp = await rig.post(GPT)
    assert resp.status == 502
    assert (await resp.json())["error"]["code"] == "upstream_auth_failed"


async def test_upstream_rate_limit_text_is_not_relayed(raw_upstream: Any) -> None:
    async def reply(request: web.Request) -> web.StreamResponse:
        err = {
            "message": "Rate limit reached for gpt-4o in organization org-SECRET123",
            "type": "requests",
        }
        return web.json_response({"error": err}, status=429, headers={"retry-after": "2"})

    rig = await raw_upstream(reply)
    resp = await rig.post(GPT)
    assert resp.status == 429 and resp.headers["Retry-After"] == "2"
    assert "org-SECRET123" not in await resp.text()


# ---- hostile clients against the demo model ---------------------------------------------------


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}


async def test_deeply_nested_body_is_400(gateway: TestClient[Any, Any], key: str) -> None:
    body = (
        b'{"model":"demo","messages":[{"role":"user","content":"x"}],"x":'
        + b"[" * 5000
        + b"]" * 5000
        + b"}"
    )
    resp = await gateway.post(CHAT, data=body, headers=auth(key))
    assert resp.status == 400


async def test_non_utf8_authorization_header_is_401(gateway: TestClient[Any, Any]) -> None:
    assert gateway.server.host is not None
    reader, writer = await asyncio.open_connection(gateway.server.host, gateway.server.port)
    writer.write(
        b"GET /v1/models HTTP/1.1\r\nHost: x\r\n"  # a raw request: no client would send it
        b"Authorization: Bearer \xff\xfe\r\nConnection: close\r\n\r\n"
    )
    await writer.drain()
    status_line = await reader.readline()
    writer.close()
    assert b" 401 " in status_line


async def test_overlong_model_id_is_400_and_not_remembered(
    gateway: TestClient[Any, Any], key: str
) -> None:
    body = {"model": "demo/" + "x" * 300, "messages": [{"role": "user", "content": "x"}]}
    resp = await gateway.post(CHAT, json=body, headers=auth(key))
    assert resp.status == 400 and (await resp.json())["error"]["param"] == "model"


async def test_long_demo_message_costs_no_more_calls_than_a_short_one(
    gateway: TestClient[Any, Any], key: str
) -> None:
    """The demo's `stop` handling once joined the words again for every word (quadratic in the
    message); its work must not grow with the message: per-word work stays inside single C
    calls (split, find, join), which are linear."""

    async def demo_calls(words: int) -> int:
        body = {
            "model": "demo",
            "messages": [{"role": "user", "content": "a " * words}],
            "stop": ["zz"],
        }
        with calls_in(demo) as calls:
            resp = await gateway.post(CHAT, json=body, headers=auth(key))
            assert resp.status == 200
        return calls.total()

    assert await demo_calls(100_000) == await demo_calls(1_000)


@pytest.mark.parametrize(
    "parameters",
    [
        {"type": "object", "properties": {"a": {"enum": 3}, "b": {"type": {"x": 1}}}},
        {"properties": [1]},
    ],
)
async def test_odd_tool_schemas_do_not_break_the_demo(
    gateway: TestClient[Any, Any], key: str, parameters: dict[str, Any]
) -> None:
    tool = {"type": "function", "function": {"name": "f", "parameters": parameters}}
    body = {"model": "demo", "messages": [{"role": "user", "content": "x"}], "tools": [tool]}
    resp = await gateway.post(CHAT, json=body, headers=auth(key))
    assert resp.status == 200
    json.loads(
        (await resp.json())["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"]
    )


async def test_refused_requests_are_counted_not_written_a_row_each(
    gateway: TestClient[Any, Any], key: str
) -> None:
    for _ in range(3):
        await gateway.post(
            CHAT,
            json={"model": "nope", "messages": [{"role": "user", "content": "x"}]},
            headers=auth(key),
        )
    await gateway.post(CHAT, data=b"{", headers=auth(key))
    assert await usage_rows(gateway) == []
    key_id = app_of(gateway)[KEYS_KEY].lookup(key).id  # type: ignore[union-attr]
    assert await refusal_counts(gateway) == {(key_id, 404): 3, (key_id, 400): 1}


async def test_shutdown_ends_open_streams_with_an_error_event(
    aiohttp_server: AiohttpServer, aiohttp_client: AiohttpClient, make_settings: MakeSettings
) -> None:
    started = asyncio.Event()

    async def reply(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(chunk({"role": "assistant", "content": "a"}))
        started.set()
        await asyncio.Event().wait()  # a generation that never ends: only the shutdown cuts it
        return resp

    app = web.Application()
    app.router.add_post("/v1/chat/completions", reply)
    server = await aiohttp_server(app)
    provider = OpenAIConfig(name="up", base_url=str(server.make_url("/v1")))
    settings = make_settings(providers=(provider,), shutdown_grace_seconds=0.1)
    gateway = await start_gateway(aiohttp_client, settings)
    key = await create_key(gateway)
    resp = await gateway.post(
        CHAT, json={**GPT, "model": "up/m", "stream": True}, headers=auth(key)
    )
    await resp.content.readuntil(b"\n\n")
    await started.wait()
    async with asyncio.timeout(NEVER_HANG):
        await app_of(gateway).shutdown()
        rest = await resp.content.read()
    error = json.loads(rest.strip().removeprefix(b"data: "))
    assert error["error"]["message"] == "The gateway is shutting down."
    assert error["error"]["type"] == "upstream_error"
