"""Hostile clients at the HTTP layer, over raw sockets where no HTTP client would send the bytes:
malformed requests, slow or endless heads and bodies, oversized bodies, and limits that must hold
before a body is read."""

from __future__ import annotations

import asyncio
import gzip
import logging
from typing import Any

import pytest
import structlog
from aiohttp.pytest_plugin import AiohttpClient
from aiohttp.test_utils import TestClient

from gateway.server import GatewayProtocol, LogThrottle
from gateway.state import GATE_KEY, KEYS_KEY
from tests.conftest import (
    NEVER_HANG,
    MakeSettings,
    app_of,
    create_key,
    raw_request,
    read_reply,
    refusal_counts,
    sse_events,
    start_gateway,
)

CHAT = "/v1/chat/completions"
HEAD = "POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\n"


def head(secret: str, *extra: str) -> bytes:
    lines = [f"Authorization: Bearer {secret}", *extra]
    return (HEAD + "".join(f"{line}\r\n" for line in lines) + "\r\n").encode()


def assert_openai_error(reply: Any, status: int, code: str) -> dict[str, Any]:
    assert reply.status == status
    assert reply.headers["content-type"].startswith("application/json")
    assert reply.headers["x-request-id"].startswith("req_")
    assert reply.headers["server"] == "token-kiosk"
    error: dict[str, Any] = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code
    return error


MALFORMED = {
    "nul in a header": b"Authorization: Bearer {secret}\x00tail\r\n",
    "header line too long": b"X-Pad: " + b"a" * 20_000 + b"\r\nAuthorization: Bearer {secret}\r\n",
    "bad header name": b"Bad Name{secret}: x\r\n",
    "bad content-length": b"Content-Length: 12{secret}\r\n",
    "bad chunk size": b"Transfer-Encoding: chunked\r\n\r\nzz{secret}zz\r\n",
}


@pytest.mark.parametrize("case", MALFORMED)
async def test_malformed_requests_are_json_400s_that_quote_nothing(
    gateway: TestClient[Any, Any], key: str, case: str, caplog: pytest.LogCaptureFixture
) -> None:
    raw = HEAD.encode() + MALFORMED[case].replace(b"{secret}", key.encode())
    if not raw.endswith(b"\r\n\r\n"):
        raw += b"\r\n"
    with structlog.testing.capture_logs() as logs, caplog.at_level(logging.DEBUG):
        reply = await raw_request(gateway, raw)
    error = assert_openai_error(reply, 400, "malformed_request")
    assert error["type"] == "invalid_request_error"
    assert key.encode() not in reply.body and b"tail" not in reply.body
    logged = repr(logs) + caplog.text
    assert key not in logged and key[-12:] not in logged
    assert [e["event"] for e in logs] == ["bad_http_request"]
    assert logs[0]["status"] == 400 and logs[0]["request_id"] == reply.headers["x-request-id"]


def entered(client: TestClient[Any, Any], monkeypatch: pytest.MonkeyPatch, count: int) -> Any:
    """An event set once `count` requests have entered the gate: from there on, each is
    reading its body (the next thing it does)."""
    limiter = app_of(client)[GATE_KEY].limiter
    enter = limiter.enter
    event = asyncio.Event()
    seen = [0]

    def counting(key: Any) -> None:
        enter(key)
        seen[0] += 1
        if seen[0] >= count:
            event.set()

    monkeypatch.setattr(limiter, "enter", counting)
    return event


async def test_a_bad_chunk_inside_a_body_being_read_is_a_400(
    gateway: TestClient[Any, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    key = await create_key(gateway, max_concurrency=5)
    reading = entered(gateway, monkeypatch, 1)
    reader, writer = await asyncio.open_connection(gateway.host, gateway.port)
    with structlog.testing.capture_logs() as logs:
        writer.write(head(key, "Transfer-Encoding: chunked") + b'5\r\n{"mod\r\n')
        async with asyncio.timeout(NEVER_HANG):
            await reading.wait()
            writer.write(b"zz" + key.encode() + b"\r\n")
            reply = await read_reply(reader)
    writer.close()
    error = assert_openai_error(reply, 400, "malformed_body")
    assert "framing" in error["message"] and key.encode() not in reply.body
    assert key not in repr(logs)


async def test_a_bad_chunk_right_after_the_head_is_a_400_before_the_handler_runs(
    gateway: TestClient[Any, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The bad chunk reaches the server in the loop turn after the head's, while aiohttp has
    queued the request but not started its handler (a loaded machine's timing, made certain
    here): it still fails that request's body at once, not at the body timeout (a 408)."""
    key = await create_key(gateway)
    reader, writer = await asyncio.open_connection(gateway.host, gateway.port)
    data_received = GatewayProtocol.data_received
    sent: list[bool] = []

    def then_the_bad_chunk(protocol: GatewayProtocol, data: bytes) -> None:
        data_received(protocol, data)
        if protocol._messages and not sent:  # the head is queued: the server reads the
            sent.append(True)  # bad chunk in its next loop turn, before the handler starts
            writer.write(b"zz" + key.encode() + b"\r\n")

    monkeypatch.setattr(GatewayProtocol, "data_received", then_the_bad_chunk)
    writer.write(head(key, "Transfer-Encoding: chunked"))
    async with asyncio.timeout(NEVER_HANG):
        reply = await read_reply(reader)
    writer.close()
    error = assert_openai_error(reply, 400, "malformed_body")
    assert "framing" in error["message"] and key.encode() not in reply.body


async def test_a_body_not_in_its_content_encoding_is_a_400(
    gateway: TestClient[Any, Any], key: str
) -> None:
    headers = {"Authorization": f"Bearer {key}", "Content-Encoding": "gzip"}
    async with gateway.post(CHAT, data=b'{"model": "demo"}', headers=headers) as resp:
        assert resp.status == 400
        assert (await resp.json())["error"]["code"] == "malformed_body"
    bomb = gzip.compress(b" " * (2 * 1024 * 1024))  # 2 MiB of spaces in a few kB
    app_limit = 1024 * 1024
    assert len(bomb) < app_limit
    async with gateway.post(CHAT, data=bomb, headers=headers) as resp:
        assert resp.status == 400  # JSON of only spaces: read whole (it is under 32 MiB)


async def test_a_decompressed_body_over_the_limit_is_a_413(
    aiohttp_client: AiohttpClient, make_settings: MakeSettings
) -> None:
    gw = await start_gateway(aiohttp_client, make_settings(max_body_bytes=64 * 1024))
    secret = await create_key(gw)
    bomb = gzip.compress(b" " * (1024 * 1024))
    headers = {"Authorization": f"Bearer {secret}", "Content-Encoding": "gzip"}
    async with gw.post(CHAT, data=bomb, headers=headers) as resp:
        assert resp.status == 413
        assert (await resp.json())["error"]["code"] == "request_too_large"


async def test_headers_that_never_finish_get_a_408(
    aiohttp_client: AiohttpClient, make_settings: MakeSettings
) -> None:
    gw = await start_gateway(aiohttp_client, make_settings(client_header_timeout=0.2))
    reply = await raw_request(gw, HEAD.encode() + b"Authorization: Bear")
    error = assert_openai_error(reply, 408, "request_timeout")
    assert "headers" in error["message"]


async def test_a_connection_that_sends_nothing_is_closed_after_the_header_timeout(
    aiohttp_client: AiohttpClient, make_settings: MakeSettings
) -> None:
    gw = await start_gateway(aiohttp_client, make_settings(client_header_timeout=0.2))
    reader, writer = await asyncio.open_connection(gw.host, gw.port)
    async with asyncio.timeout(NEVER_HANG):
        reply = await read_reply(reader)
        assert await reader.read() == b""  # then closed
    writer.close()
    assert reply.status == 408


async def test_a_kept_alive_connection_times_out_only_once_a_request_begins(
    aiohttp_client: AiohttpClient, make_settings: MakeSettings
) -> None:
    gw = await start_gateway(aiohttp_client, make_settings(client_header_timeout=0.3))
    reader, writer = await asyncio.open_connection(gw.host, gw.port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: gw\r\n\r\n")
    async with asyncio.timeout(NEVER_HANG):
        assert (await read_reply(reader)).status == 200
        writer.write(b"GET /healthz HTTP/1.1\r\nHo")  # a second request that stalls
        reply = await read_reply(reader)
    writer.close()
    assert reply.status == 408


async def test_a_body_that_never_finishes_gets_a_408(
    aiohttp_client: AiohttpClient, make_settings: MakeSettings
) -> None:
    gw = await start_gateway(aiohttp_client, make_settings(client_body_timeout=0.2))
    secret = await create_key(gw, max_concurrency=1)
    reply = await raw_request(gw, head(secret, "Content-Length: 1000"), b'{"model": ')
    error = assert_openai_error(reply, 408, "request_timeout")
    assert "body" in error["message"]
    assert reply.headers["connection"] == "close"
    # The slot it held is free again.
    async with gw.post(
        CHAT,
        json={"model": "demo", "messages": [{"role": "user", "content": "hi"}]},
        headers={"Authorization": f"Bearer {secret}"},
    ) as resp:
        assert resp.status == 200


async def test_content_length_over_the_limit_is_413_before_any_byte_is_read(
    aiohttp_client: AiohttpClient, make_settings: MakeSettings
) -> None:
    gw = await start_gateway(aiohttp_client, make_settings(max_body_bytes=1000))
    secret = await create_key(gw)
    # Only the head is sent: the answer cannot depend on the body.
    reply = await raw_request(gw, head(secret, "Content-Length: 1000000000"))
    assert_openai_error(reply, 413, "request_too_large")
    assert reply.headers["connection"] == "close"


async def test_concurrency_is_checked_before_the_body_is_read(
    aiohttp_client: AiohttpClient, make_settings: MakeSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A key limited to 2 requests in flight: 2 stalled uploads hold its slots; 48 more are
    refused on their heads alone, so nothing of their bodies is ever buffered."""
    gw = await start_gateway(aiohttp_client, make_settings(client_body_timeout=NEVER_HANG))
    secret = await create_key(gw, max_concurrency=2)
    reading = entered(gw, monkeypatch, 2)
    upload = head(secret, "Content-Length: 1000000")
    stalled = []
    for _ in range(2):
        reader, writer = await asyncio.open_connection(gw.host, gw.port)
        writer.write(upload + b'{"model": "demo", "messages": [')
        await writer.drain()
        stalled.append((reader, writer))
    async with asyncio.timeout(NEVER_HANG):
        await reading.wait()  # both are inside, reading their bodies
    record = app_of(gw)[KEYS_KEY].lookup(secret)
    assert record is not None
    replies = await asyncio.gather(*(raw_request(gw, upload) for _ in range(48)))
    for reply in replies:
        error = assert_openai_error(reply, 429, "rate_limit_exceeded")
        assert "in flight" in error["message"]
    for _, writer in stalled:
        writer.close()
    assert (await refusal_counts(gw))[record.id, 429] == 48  # (and 499s for the two stalled)


async def test_request_rate_is_checked_before_the_body_is_read(
    gateway: TestClient[Any, Any],
) -> None:
    secret = await create_key(gateway, rpm=1)
    async with gateway.post(
        CHAT,
        json={"model": "demo", "messages": [{"role": "user", "content": "hi"}]},
        headers={"Authorization": f"Bearer {secret}"},
    ) as resp:
        assert resp.status == 200
    reply = await raw_request(gateway, head(secret, "Content-Length: 1000000"))
    error = assert_openai_error(reply, 429, "rate_limit_exceeded")
    assert "requests per minute" in error["message"]
    assert int(reply.headers["retry-after"]) >= 1


async def test_unknown_keys_are_refused_before_the_body_is_read(
    gateway: TestClient[Any, Any],
) -> None:
    reply = await raw_request(gateway, head("sk-kiosk-nobody", "Content-Length: 1000000"))
    assert_openai_error(reply, 401, "invalid_api_key")


async def test_405_names_the_allowed_methods(gateway: TestClient[Any, Any], key: str) -> None:
    async with gateway.put(CHAT, headers={"Authorization": f"Bearer {key}"}) as resp:
        assert resp.status == 405
        assert resp.headers["Allow"] == "POST"
        assert (await resp.json())["error"]["code"] == "method_not_allowed"
    async with gateway.delete("/v1/models") as resp:
        assert resp.status in (401, 405)


async def test_the_server_header_names_no_versions(gateway: TestClient[Any, Any], key: str) -> None:
    auth = {"Authorization": f"Bearer {key}"}
    body = {"model": "demo", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    async with gateway.post(CHAT, json=body, headers=auth) as resp:
        sse_events(await resp.read())
        served = [resp.headers["Server"]]
    for path in ("/healthz", "/nowhere", "/v1/models"):
        async with gateway.get(path) as resp:
            served.append(resp.headers["Server"])
    served.append((await raw_request(gateway, b"\x16\x03\x01garbage\r\n\r\n")).headers["server"])
    assert set(served) == {"token-kiosk"}


async def test_a_flood_of_malformed_requests_logs_a_few_lines(
    gateway: TestClient[Any, Any],
) -> None:
    with structlog.testing.capture_logs() as logs:
        replies = [await raw_request(gateway, b"BAD\x01 / HTTP/1.1\r\n\r\n") for _ in range(40)]
    assert {r.status for r in replies} == {400}
    lines = [e for e in logs if e["event"] == "bad_http_request"]
    assert len(lines) == 10  # the throttle's limit per minute


def test_log_throttle_counts_what_it_holds_back() -> None:
    now = [0.0]
    throttle = LogThrottle(limit=2, period=60.0, clock=lambda: now[0])
    assert [throttle.allow() for _ in range(5)] == [True, True, False, False, False]
    assert throttle.suppressed == 3
    now[0] = 60.0
    assert throttle.allow()


async def test_100_continue_only_once_admitted(gateway: TestClient[Any, Any]) -> None:
    limited = await create_key(gateway, rpm=1)
    body = b'{"model": "demo", "messages": [{"role": "user", "content": "hi"}]}'
    expect = ("Expect: 100-continue", f"Content-Length: {len(body)}")
    reader, writer = await asyncio.open_connection(gateway.host, gateway.port)
    async with asyncio.timeout(NEVER_HANG):
        writer.write(head(limited, *expect))
        assert await reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(body)
        assert (await read_reply(reader)).status == 200
    writer.close()
    # Out of requests: the final answer comes at once, no 100 Continue, no body sent.
    refused = await raw_request(gateway, head(limited, *expect))
    assert_openai_error(refused, 429, "rate_limit_exceeded")
    odd = await raw_request(gateway, head(limited, "Expect: something-else", "Content-Length: 2"))
    assert odd.status in (417, 429)
    fresh = await create_key(gateway)
    odd = await raw_request(gateway, head(fresh, "Expect: something-else", "Content-Length: 2"))
    assert_openai_error(odd, 417, "expectation_failed")


BODY = b'{"model": "demo", "messages": [{"role": "user", "content": "hi"}]}'


async def test_a_body_that_trickles_in_past_the_timeout_gets_a_408(
    aiohttp_client: AiohttpClient, make_settings: MakeSettings
) -> None:
    """The body timer is for the whole body: a byte now and then does not keep it alive."""
    gw = await start_gateway(aiohttp_client, make_settings(client_body_timeout=0.3))
    secret = await create_key(gw)
    reader, writer = await asyncio.open_connection(gw.host, gw.port)
    try:
        async with asyncio.timeout(NEVER_HANG):
            writer.write(head(secret, f"Content-Length: {len(BODY)}"))
            replied = asyncio.create_task(read_reply(reader))
            for byte in BODY:
                if replied.done():
                    break
                writer.write(bytes([byte]))
                await asyncio.sleep(0.05)  # a byte every 50 ms: done after ~3 s, not 0.3
            reply = await replied
    finally:
        writer.close()
    assert_openai_error(reply, 408, "request_timeout")


@pytest.mark.parametrize("chunked", [False, True])
async def test_a_body_sent_with_its_head_and_100_continue_is_answered(
    gateway: TestClient[Any, Any], chunked: bool
) -> None:
    """A client that asks for 100 Continue but sends its (whole) body with the head anyway:
    the body is here, so no timer, one answer (after an optional 100 Continue)."""
    secret = await create_key(gateway)
    if chunked:
        framing = "Transfer-Encoding: chunked"
        body = b"%x\r\n%b\r\n0\r\n\r\n" % (len(BODY), BODY)
    else:
        framing, body = f"Content-Length: {len(BODY)}", BODY
    reader, writer = await asyncio.open_connection(gateway.host, gateway.port)
    try:
        async with asyncio.timeout(NEVER_HANG):
            writer.write(head(secret, "Expect: 100-continue", framing) + body)
            reply = await read_reply(reader)
            if reply.status == 100:
                reply = await read_reply(reader)
    finally:
        writer.close()
    assert reply.status == 200 and reply.json()["object"] == "chat.completion"


async def test_a_chunked_body_that_never_ends_gets_a_408(
    aiohttp_client: AiohttpClient, make_settings: MakeSettings
) -> None:
    gw = await start_gateway(aiohttp_client, make_settings(client_body_timeout=0.2))
    secret = await create_key(gw)
    first = b"%x\r\n%b\r\n" % (len(BODY), BODY)  # a whole chunk, but never the last one
    reply = await raw_request(gw, head(secret, "Transfer-Encoding: chunked") + first)
    assert_openai_error(reply, 408, "request_timeout")


async def test_a_chunked_body_over_the_limit_is_a_413(
    aiohttp_client: AiohttpClient, make_settings: MakeSettings
) -> None:
    gw = await start_gateway(aiohttp_client, make_settings(max_body_bytes=1024))
    secret = await create_key(gw)
    big = b'{"model": "demo", "pad": "' + b"a" * 4000 + b'"}'
    body = b"%x\r\n%b\r\n0\r\n\r\n" % (len(big), big)  # whole, with the head: no timer
    reply = await raw_request(gw, head(secret, "Transfer-Encoding: chunked") + body)
    assert_openai_error(reply, 413, "request_too_large")
