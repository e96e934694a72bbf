"""This session's changes attacked from outside: the one request path (`middleware.gateway`)
and its catch-all route, and the one-generator stream path, over raw sockets."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from gateway.state import USAGE_KEY
from tests.conftest import NEVER_HANG, app_of, refusal_counts, sse_events, usage_rows

STREAM = b'{"model":"demo","stream":true,"messages":[{"role":"user","content":"hi"}]}'


@pytest.mark.parametrize("connection", [b"", b"Connection: keep-alive\r\n"])
async def test_an_http_1_0_client_gets_its_stream_until_the_connection_closes(
    gateway: TestClient[Any, Any], key: str, connection: bytes
) -> None:
    # HTTP/1.0 has no chunked encoding: the stream's body ends where the connection does,
    # even for a client that asked to keep it alive.
    reader, writer = await asyncio.open_connection(gateway.host, gateway.port)
    writer.write(
        b"POST /v1/chat/completions HTTP/1.0\r\nHost: gw\r\nContent-Type: application/json\r\n"
        b"Authorization: Bearer %b\r\n%bContent-Length: %d\r\n\r\n%b"
        % (key.encode(), connection, len(STREAM), STREAM)
    )
    async with asyncio.timeout(NEVER_HANG):
        answer = await reader.read()
    writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith((b"HTTP/1.0 200", b"HTTP/1.1 200")), head
    assert b"transfer-encoding" not in head.lower()
    assert b"server: token-kiosk" in head.lower()
    assert b"connection: close" in head.lower()
    assert body.endswith(b"data: [DONE]\n\n")
    events = sse_events(body)
    assert events[0]["object"] == "chat.completion.chunk"
    assert events[-1]["choices"][0]["finish_reason"] == "stop"
    await app_of(gateway)[USAGE_KEY].wait_recorded(1)
    rows = await usage_rows(gateway)
    assert [(r["status"], r["stream"]) for r in rows] == [(200, 1)]


async def test_hundreds_of_mixed_requests_at_once_leave_one_row_or_refusal_each(
    gateway: TestClient[Any, Any], key: str
) -> None:
    # Answers, streams, refusals and streams the client drops after their first bytes, all at
    # once on many connections: every request that reached the upstream has exactly one usage
    # row under its own request id, every refusal one count, and nothing more.
    auth = {"Authorization": f"Bearer {key}"}
    hi = [{"role": "user", "content": "hi"}]

    async def answer() -> str:
        async with gateway.post(
            "/v1/chat/completions", json={"model": "demo", "messages": hi}, headers=auth
        ) as resp:
            assert resp.status == 200
            await resp.read()
            return resp.headers["X-Request-ID"]

    async def stream(drop: bool) -> str:
        body = {"model": "demo", "messages": hi, "stream": True}
        async with gateway.post("/v1/chat/completions", json=body, headers=auth) as resp:
            assert resp.status == 200
            if drop:
                await resp.content.readany()
                resp.close()
            else:
                assert (await resp.read()).endswith(b"data: [DONE]\n\n")
            return resp.headers["X-Request-ID"]

    async def refused() -> None:
        body = {"model": "no-such-model", "messages": hi}
        async with gateway.post("/v1/chat/completions", json=body, headers=auth) as resp:
            assert resp.status in (400, 404)
            assert "error" in await resp.json()

    work: list[Any] = []
    for _ in range(60):
        work += [answer(), stream(False), stream(True), refused()]
    async with asyncio.timeout(NEVER_HANG):
        results = await asyncio.gather(*work)
        ids = [rid for rid in results if rid is not None]
        assert len(set(ids)) == 180
        await app_of(gateway)[USAGE_KEY].wait_recorded(180)
        await app_of(gateway)[USAGE_KEY].flush()
    rows = await usage_rows(gateway)
    assert sorted(r["request_id"] for r in rows) == sorted(ids)
    assert {r["status"] for r in rows} <= {200, 499}
    assert sum((await refusal_counts(gateway)).values()) == 60
