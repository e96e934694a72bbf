"""This session's changes attacked from outside: the one request path (`middleware.gateway`)
and its catch-all route, and the one-generator stream path, over raw sockets."""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp.test_utils import TestClient

from gateway.state import USAGE_KEY
from tests.conftest import NEVER_HANG, app_of, sse_events, usage_rows

STREAM = b'{"model":"demo","stream":true,"messages":[{"role":"user","content":"hi"}]}'


async def test_an_http_1_0_client_gets_its_stream_until_the_connection_closes(
    gateway: TestClient[Any, Any], key: str
) -> None:
    # HTTP/1.0 has no chunked encoding: the stream's body ends where the connection does.
    reader, writer = await asyncio.open_connection(gateway.host, gateway.port)
    writer.write(
        b"POST /v1/chat/completions HTTP/1.0\r\nHost: gw\r\nContent-Type: application/json\r\n"
        b"Authorization: Bearer %b\r\nContent-Length: %d\r\n\r\n%b"
        % (key.encode(), len(STREAM), STREAM)
    )
    async with asyncio.timeout(NEVER_HANG):
        answer = await reader.read()
    writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith((b"HTTP/1.0 200", b"HTTP/1.1 200")), head
    assert b"transfer-encoding" not in head.lower()
    assert b"server: token-kiosk" in head.lower()
    assert body.endswith(b"data: [DONE]\n\n")
    events = sse_events(body)
    assert events[0]["object"] == "chat.completion.chunk"
    assert events[-1]["choices"][0]["finish_reason"] == "stop"
    await app_of(gateway)[USAGE_KEY].wait_recorded(1)
    rows = await usage_rows(gateway)
    assert [(r["status"], r["stream"]) for r in rows] == [(200, 1)]
