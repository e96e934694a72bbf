"""Raw HTTP: framing, error shapes, request ids, the simple chat API, models and health."""

from __future__ import annotations

from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from tests.conftest import MakeSettings, create_key, sse_events, start_gateway
from tests.spec import (
    validate_chat_completion,
    validate_chat_stream,
    validate_error,
    validate_model,
    validate_models_list,
)

CHAT = "/v1/chat/completions"
HELLO = {"model": "demo", "messages": [{"role": "user", "content": "hi"}]}


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def error_of(resp: Any, status: int) -> dict[str, Any]:
    assert resp.status == status, await resp.text()
    assert resp.content_type == "application/json"
    body = await resp.json()
    assert set(body) == {"error"}
    validate_error(body)
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert "Traceback" not in body["error"]["message"]
    return body["error"]  # type: ignore[no-any-return]


async def test_missing_key_is_401(gateway: TestClient[Any, Any]) -> None:
    err = await error_of(await gateway.post(CHAT, json=HELLO), 401)
    assert err["type"] == "authentication_error"
    err = await error_of(
        await gateway.post(CHAT, json=HELLO, headers={"Authorization": "Basic x"}), 401
    )
    assert err["type"] == "authentication_error"


@pytest.mark.parametrize(
    ("body", "param", "needle"),
    [
        (b"{not json", None, "not valid JSON"),
        (b'{"model": "demo", "messages": [{"role": "user", "content": "\xff"}]}', None, "UTF-8"),
        (
            b'{"model": "demo", "messages": [{"role": "user", "content": "x"}],'
            b' "tools": [{"type": "function", "function": {"name": "f", "parameters": "zzz"}}]}',
            "tools[0].function",
            "JSON object",
        ),
        (
            b'{"model": "demo", "messages": [{"role": "user", "content": "x"}], "response_format":'
            b' {"type": "json_schema", "json_schema": {"name": "a", "schema": [1]}}}',
            "response_format.json_schema",
            "JSON object",
        ),
        (b"[1, 2]", None, "Expected `object`"),
        (b'{"model": "demo"}', "messages", "messages"),
        (b'{"model": "demo", "messages": "hi"}', "messages", "array"),
        (b'{"model": 5, "messages": [{"role": "user", "content": "x"}]}', "model", "str"),
        (
            b'{"model": "demo", "messages": [{"role": "robot", "content": "x"}]}',
            "messages[0].role",
            "robot",
        ),
        (b'{"model": "demo", "messages": [{"role": "user", "content": "x"}], "n": 0}', "n", ">= 1"),
        (
            b'{"model": "demo", "messages": [{"role": "tool", "content": "x"}]}',
            "messages[0].tool_call_id",
            "tool_call_id",
        ),
        (
            b'{"model": "demo", "messages": [{"role": "user", "content": "x"}],'
            b' "stream_options": {"include_usage": true}}',
            "stream_options",
            "stream",
        ),
        (b'{"messages": [{"role": "user", "content": "x"}]}', "model", "model"),
        (
            b'{"model": "demo", "messages": [{"role": "user", "content": "x"}], "metadata": {"k": "'
            + b"v" * 513
            + b'"}}',
            "metadata",
            "length <= 512",
        ),
    ],
)
async def test_bad_bodies_are_400_naming_the_field(
    gateway: TestClient[Any, Any], key: str, body: bytes, param: str | None, needle: str
) -> None:
    resp = await gateway.post(
        CHAT, data=body, headers={**auth(key), "Content-Type": "application/json"}
    )
    err = await error_of(resp, 400)
    assert err["type"] == "invalid_request_error"
    assert err["param"] == param
    assert needle in err["message"]


async def test_oversized_body_is_413(aiohttp_client: Any, make_settings: MakeSettings) -> None:
    client = await start_gateway(aiohttp_client, make_settings(max_body_bytes=1024))
    key = await create_key(client)
    big = {"model": "demo", "messages": [{"role": "user", "content": "x" * 4096}]}
    err = await error_of(await client.post(CHAT, json=big, headers=auth(key)), 413)
    assert err["type"] == "invalid_request_error"


async def test_unknown_route_and_wrong_method(gateway: TestClient[Any, Any], key: str) -> None:
    err = await error_of(await gateway.get("/v1/nothing-here", headers=auth(key)), 404)
    assert err["code"] == "not_found"
    err = await error_of(await gateway.get(CHAT, headers=auth(key)), 405)
    assert err["type"] == "invalid_request_error"


async def test_request_id_is_minted_or_echoed(gateway: TestClient[Any, Any], key: str) -> None:
    resp = await gateway.post(CHAT, json=HELLO, headers=auth(key))
    assert resp.headers["X-Request-ID"].startswith("req_")
    resp = await gateway.post(CHAT, json=HELLO, headers={**auth(key), "X-Request-ID": "abc-123"})
    assert resp.headers["X-Request-ID"] == "abc-123"
    resp = await gateway.post(CHAT, json=HELLO, headers={"X-Request-ID": "bad id\twith space"})
    assert resp.status == 401 and resp.headers["X-Request-ID"].startswith("req_")


async def test_sse_framing(gateway: TestClient[Any, Any], key: str) -> None:
    resp = await gateway.post(CHAT, json={**HELLO, "stream": True}, headers=auth(key))
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/event-stream")
    assert resp.headers["Cache-Control"] == "no-cache"
    assert resp.headers["X-Accel-Buffering"] == "no"
    assert resp.headers["X-Request-ID"].startswith("req_")
    assert "Content-Encoding" not in resp.headers
    body = await resp.read()
    assert b"\r\n" not in body
    events = sse_events(body)
    validate_chat_stream(events)
    assert all(e["object"] == "chat.completion.chunk" for e in events)
    assert len({e["id"] for e in events}) == 1
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert events[-1]["choices"][0]["finish_reason"] == "stop"
    assert all("usage" not in e for e in events)  # not asked for


async def test_simple_chat_api_uses_default_model(gateway: TestClient[Any, Any], key: str) -> None:
    resp = await gateway.post(
        "/api/v1/chat",
        json={"messages": [{"role": "user", "content": "Hello, how are you?"}]},
        headers=auth(key),
    )
    assert resp.status == 200
    body = await resp.json()
    validate_chat_completion(body)
    assert body["model"] == "demo"
    assert body["choices"][0]["message"]["content"] == "You said: Hello, how are you?"
    resp = await gateway.post(
        "/api/v1/chat",
        json={"messages": [{"role": "user", "content": "poem"}], "stream": True},
        headers=auth(key),
    )
    assert sse_events(await resp.read())[-1]["choices"][0]["finish_reason"] == "stop"


async def test_models_list_and_get_respect_allow_list(
    gateway: TestClient[Any, Any], key: str
) -> None:
    body = await (await gateway.get("/v1/models", headers=auth(key))).json()
    validate_models_list(body)
    assert [m["id"] for m in body["data"]] == ["demo"]
    assert body["data"][0] == {
        "id": "demo",
        "object": "model",
        "created": 1_700_000_000,
        "owned_by": "demo",
        "embeddings": True,  # the demo model embeds too
    }
    validate_model(await (await gateway.get("/v1/models/demo", headers=auth(key))).json())
    assert (await gateway.get("/v1/models/demo/anything", headers=auth(key))).status == 200
    await error_of(await gateway.get("/v1/models/nope", headers=auth(key)), 404)
    limited = await create_key(gateway, models=["something-else"])
    body = await (await gateway.get("/v1/models", headers=auth(limited))).json()
    assert body["data"] == []
    err = await error_of(await gateway.get("/v1/models/demo", headers=auth(limited)), 404)
    assert err["code"] == "model_not_found"


async def test_provider_prefixed_model_ids(gateway: TestClient[Any, Any], key: str) -> None:
    resp = await gateway.post(CHAT, json={**HELLO, "model": "demo/any-name"}, headers=auth(key))
    body = await resp.json()
    assert resp.status == 200 and body["model"] == "demo/any-name"
    await error_of(
        await gateway.post(CHAT, json={**HELLO, "model": "nope/x"}, headers=auth(key)), 404
    )


async def test_provider_pattern_in_allow_list(gateway: TestClient[Any, Any]) -> None:
    key = await create_key(gateway, models=["demo/*"])
    assert (await gateway.post(CHAT, json=HELLO, headers=auth(key))).status == 200
    assert (
        await gateway.post(CHAT, json={**HELLO, "model": "demo/x"}, headers=auth(key))
    ).status == 200


async def test_health_endpoints_need_no_key(gateway: TestClient[Any, Any]) -> None:
    assert (await (await gateway.get("/healthz")).json()) == {"status": "ok"}
    resp = await gateway.get("/readyz")
    assert resp.status == 200
    assert (await resp.json())["database"] == "ok"


@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"n": 2},
        {
            "tools": [
                {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
            ]
        },
        {"stream_options": {"include_usage": True}},
    ],
)
async def test_demo_streams_match_the_spec(
    gateway: TestClient[Any, Any], key: str, extra: dict[str, Any]
) -> None:
    body = {**HELLO, "stream": True, **extra}
    events = sse_events(await (await gateway.post(CHAT, json=body, headers=auth(key))).read())
    validate_chat_stream(events, include_usage="stream_options" in extra)
    resp = await gateway.post(
        CHAT, json={**body, "stream": False, "stream_options": None}, headers=auth(key)
    )
    validate_chat_completion(await resp.json())
