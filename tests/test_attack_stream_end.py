"""The end of a stream (`data: [DONE]` with the chunked terminator, in one write) and the
connection under it, attacked from outside with a raw HTTP client: what follows a stream on
a kept-alive connection is the next response and nothing else, also when the end's write
waits for a slow client and the gateway shuts down meanwhile, or the client hangs up."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.pytest_plugin import AiohttpClient
from aiohttp.test_utils import TestClient
from aiohttp.web_protocol import RequestHandler
from structlog.testing import capture_logs

from gateway import server
from gateway.app import create_app
from gateway.settings import ModelConfig, Target
from tests.conftest import (
    NEVER_HANG,
    MakeSettings,
    app_of,
    create_key,
    provider_config,
    start_gateway,
    usage_rows,
)
from tests.test_attack_upstream import (
    COMPLETION,
    UPSTREAM_KEY,
    Answer,
    RawUpstream,
    chunk,
    http,
    sends,
    sse,
    until_close,
    whole,
)

STOP = (
    b'{"id":"c","object":"chat.completion.chunk","created":1,"model":"m-1","choices":'
    b'[{"index":0,"delta":{},"finish_reason":"stop"}]}'
)
USAGE = (
    b'{"id":"c","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}}'
)
STREAM = sse(chunk("a"), chunk("b"), STOP, USAGE, b"[DONE]")


@dataclass
class Gateway:
    client: TestClient[Any, Any]
    key: str

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection(self.client.host, self.client.port)

    def request(self, *, stream: bool) -> bytes:
        body = b'{"model":"m","messages":[{"role":"user","content":"hi"}],"stream":%b}' % (
            b"true" if stream else b"false"
        )
        return (
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer %b\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%b"
        ) % (self.key.encode(), len(body), body)

    def connections(self) -> list[RequestHandler]:
        runner = self.client.server.runner
        assert runner is not None and runner.server is not None
        return list(runner.server.connections)


Make = Callable[..., Awaitable[Gateway]]


@pytest.fixture
async def make(aiohttp_client: AiohttpClient, make_settings: MakeSettings) -> AsyncIterator[Make]:
    upstreams: list[RawUpstream] = []

    async def build(answer: Answer, **server: Any) -> Gateway:
        upstream = RawUpstream(answer)
        await upstream.start()
        upstreams.append(upstream)
        base = f"http://127.0.0.1:{upstream.port}/v1"
        provider = provider_config("openai", name="up", base_url=base, api_keys=(UPSTREAM_KEY,))
        model = ModelConfig(name="m", targets=(Target(provider="up", model="m-1"),))
        settings = make_settings(providers=(provider,), models=(model,), **server)
        client = await start_gateway(aiohttp_client, settings)
        return Gateway(client, await create_key(client))

    yield build
    for upstream in upstreams:
        assert upstream.server is not None
        upstream.server.close()


async def read_response(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """One HTTP/1.1 response read exactly to its end: its head and its (de-chunked) body."""
    head = await reader.readuntil(b"\r\n\r\n")
    if b"transfer-encoding: chunked" not in head.lower():
        length = next(
            int(line.split(b":")[1])
            for line in head.lower().split(b"\r\n")
            if line.startswith(b"content-length:")
        )
        return head, await reader.readexactly(length)
    body = b""
    while True:
        size = int((await reader.readuntil(b"\r\n"))[:-2], 16)
        data = await reader.readexactly(size + 2)
        assert data.endswith(b"\r\n"), data
        if not size:
            return head, body
        body += data[:-2]


async def stream_or_hi(request: bytes, writer: asyncio.StreamWriter) -> None:
    """The upstream: STREAM to a streaming request, a completion saying "hi" to another."""
    if b'"stream":true' in request:
        writer.write(until_close(STREAM))
    else:
        writer.write(whole(COMPLETION % b"hi"))
    await writer.drain()
    writer.close()


async def test_a_kept_alive_connection_carries_the_next_response_clean_after_a_stream(
    make: Make,
) -> None:
    gateway = await make(stream_or_hi)
    reader, writer = await gateway.connect()
    async with asyncio.timeout(NEVER_HANG):
        for stream in (True, True, False, True):
            writer.write(gateway.request(stream=stream))
            head, body = await read_response(reader)
            assert head.startswith(b"HTTP/1.1 200 OK\r\n"), head
            if stream:
                assert body == sse(chunk("a"), chunk("b"), STOP, b"[DONE]")
            else:
                assert b'"content":"hi"' in body
        writer.write_eof()
        assert await reader.read() == b""  # nothing after the last response's end
    writer.close()
    assert [row["status"] for row in await usage_rows(gateway.client)] == [200] * 4


async def test_requests_pipelined_behind_a_stream_are_answered_in_order_after_its_end(
    make: Make,
) -> None:
    gateway = await make(stream_or_hi)
    reader, writer = await gateway.connect()
    async with asyncio.timeout(NEVER_HANG):
        writer.write(
            gateway.request(stream=True)
            + gateway.request(stream=False)
            + gateway.request(stream=True)
        )
        answers = [await read_response(reader) for _ in range(3)]
        writer.write_eof()
        assert await reader.read() == b""
    writer.close()
    assert all(head.startswith(b"HTTP/1.1 200 OK\r\n") for head, _ in answers)
    assert answers[0][1] == answers[2][1] == sse(chunk("a"), chunk("b"), STOP, b"[DONE]")
    assert b'"content":"hi"' in answers[1][1]


async def test_a_shutdown_while_the_end_waits_for_a_slow_client_adds_nothing_after_it(
    make: Make,
) -> None:
    # The end went out (the kernel took it) but its write waits for the client to drain:
    # the shutdown that cancels the stream then must not write an error event after the
    # chunked terminator, where the client would read it as the next response.
    release = asyncio.Event()

    async def answer(request: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(http("200 OK", {"Content-Type": "text/event-stream", "Connection": "close"}))
        writer.write(sse(chunk("a")))
        await writer.drain()
        await release.wait()
        writer.write(sse(STOP, USAGE, b"[DONE]"))
        await writer.drain()
        writer.close()

    gateway = await make(answer, shutdown_grace_seconds=0.01)
    reader, writer = await gateway.connect()
    async with asyncio.timeout(NEVER_HANG):
        writer.write(gateway.request(stream=True))
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 OK\r\n")
        assert b"data: " in await reader.readuntil(b"\n\n\r\n")
        (protocol,) = gateway.connections()
        protocol.pause_writing()  # as the transport does when the client reads nothing
        release.set()
        rest = await reader.readuntil(b"data: [DONE]\n\n\r\n0\r\n\r\n")
        await app_of(gateway.client).shutdown()  # cancels the stream still writing its end
        protocol.resume_writing()
        after = await reader.read()
    writer.close()
    assert b'"error"' not in rest
    assert after == b""
    assert [row["status"] for row in await usage_rows(gateway.client)] == [200]  # it was whole


async def test_a_client_gone_just_before_the_end_is_counted_and_logs_no_error(
    make: Make,
) -> None:
    release, sent = asyncio.Event(), asyncio.Event()

    async def answer(request: bytes, writer: asyncio.StreamWriter) -> None:
        if b'"stream":false' in request:
            writer.write(whole(COMPLETION % b"hi"))
        else:
            writer.write(http("200 OK", {"Content-Type": "text/event-stream"}))
            writer.write(sse(chunk("a")))
            await writer.drain()
            await release.wait()
            writer.write(sse(STOP, USAGE, b"[DONE]"))
            await writer.drain()
            sent.set()
        await writer.drain()
        writer.close()

    gateway = await make(answer)
    with capture_logs() as logs:
        async with asyncio.timeout(NEVER_HANG):
            reader, writer = await gateway.connect()
            writer.write(gateway.request(stream=True))
            await reader.readuntil(b"\n\n\r\n")
            writer.transport.abort()  # a reset, not a polite close
            release.set()
            await sent.wait()
            reader, writer = await gateway.connect()  # the gateway serves on
            writer.write(gateway.request(stream=False))
            head, _ = await read_response(reader)
            writer.close()
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    rows = await usage_rows(gateway.client)
    assert [row["status"] for row in rows] == [499, 200]
    assert not [log for log in logs if log["log_level"] in ("error", "critical")], logs


# --- the kernel's send timeout, set once per client connection --------------------------------


async def connect_small(gateway: Gateway) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A client whose receive window is small, so an answer it does not read fills up the
    gateway's side soon (the window is set before the handshake, where it is agreed)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (gateway.client.host, gateway.client.port))
    return await asyncio.open_connection(sock=sock)


async def until(condition: Callable[[], bool]) -> None:
    """Wait for a state of the server's connections that no event announces."""
    while not condition():  # noqa: ASYNC110 (the kernel's state: no event tells of it)
        await asyncio.sleep(0.01)


LARGE = b"x" * (8 * 1024 * 1024)


async def test_a_client_that_pauses_reading_a_large_answer_still_gets_it_whole(
    make: Make,
) -> None:
    gateway = await make(sends(whole(COMPLETION % LARGE)))
    async with asyncio.timeout(NEVER_HANG):
        reader, writer = await connect_small(gateway)
        writer.write(gateway.request(stream=False))
        await until(lambda: any(p.writing_paused for p in gateway.connections()))
        head, body = await read_response(reader)  # the client reads again
        writer.close()
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert json.loads(body)["choices"][0]["message"]["content"] == LARGE.decode()


@pytest.mark.skipif(not hasattr(socket, "TCP_USER_TIMEOUT"), reason="TCP_USER_TIMEOUT is Linux's")
async def test_a_client_that_takes_nothing_of_a_large_answer_is_dropped_without_an_error(
    make: Make, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # The send timeout now covers every answer, not only streams: a client that takes
    # nothing for that long is gone, and its connection is let go quietly.
    monkeypatch.setattr(server, "SEND_TIMEOUT", 0.5)
    gateway = await make(sends(whole(COMPLETION % LARGE)))
    with capture_logs() as logs, caplog.at_level(logging.WARNING):
        async with asyncio.timeout(NEVER_HANG):
            _, writer = await connect_small(gateway)
            writer.write(gateway.request(stream=False))
            await until(lambda: any(p.writing_paused for p in gateway.connections()))
            await until(lambda: not gateway.connections())  # the kernel gave up on it
            other, other_writer = await gateway.connect()
            other_writer.write(gateway.request(stream=False))
            head, _ = await read_response(other)
            other_writer.close()
            writer.close()
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert not [log for log in logs if log["log_level"] in ("error", "critical")], logs
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.records


async def test_connections_reset_right_after_accept_log_no_error(
    make: Make, caplog: pytest.LogCaptureFixture
) -> None:
    gateway = await make(sends(whole(COMPLETION % b"hi")))
    loop = asyncio.get_running_loop()
    with capture_logs() as logs, caplog.at_level(logging.WARNING):
        async with asyncio.timeout(NEVER_HANG):
            for _ in range(20):
                sock = socket.socket()
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.setblocking(False)
                await loop.sock_connect(sock, (gateway.client.host, gateway.client.port))
                sock.close()  # lingering 0 s: a reset
            reader, writer = await gateway.connect()  # accepted after the ones before
            writer.write(gateway.request(stream=False))
            head, _ = await read_response(reader)
            writer.close()
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert not [log for log in logs if log["log_level"] in ("error", "critical")], logs
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.records


async def test_a_connection_that_is_not_tcp_is_served(
    make_settings: MakeSettings, tmp_path: Any
) -> None:
    # No `gateway serve` path listens on anything but TCP; an embedder's Unix socket must not
    # trip over the TCP-only send timeout.
    runner = server.GatewayRunner(create_app(make_settings()), handler_cancellation=True)
    await runner.setup()
    path = str(tmp_path / "gw.sock")
    try:
        await web.UnixSite(runner, path).start()
        async with (
            asyncio.timeout(NEVER_HANG),
            aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=path)) as session,
            session.get("http://gw/healthz") as resp,
        ):
            assert resp.status == 200
    finally:
        await runner.cleanup()
