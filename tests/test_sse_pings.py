"""Keep-alive pings of client event streams: one task for all streams, only during silences."""

from __future__ import annotations

import asyncio
import json
import socket
from typing import Any

import pytest
from aiohttp import web
from aiohttp.pytest_plugin import AiohttpClient, AiohttpServer

from gateway import sse_pings
from gateway.sse import _EventStream
from gateway.sse_pings import PING, SEND_TIMEOUT, StreamPings
from gateway.state import PINGS_KEY
from tests.conftest import NEVER_HANG, MakeSettings, app_of, openai_client, sse_events
from tests.test_openai_provider import HI, Rig, make_rig

INTERVAL = 0.06


@pytest.fixture
async def rig(
    aiohttp_server: AiohttpServer, aiohttp_client: AiohttpClient, make_settings: MakeSettings
) -> Rig:
    rig = await make_rig(aiohttp_server, aiohttp_client, make_settings)
    app_of(rig.gateway)[PINGS_KEY].interval = INTERVAL
    return rig


async def test_a_silent_stream_is_pinged_and_the_sdk_reads_it_whole(rig: Rig) -> None:
    rest = asyncio.Event()
    rig.fake.always(hold=rest, hold_after=1)  # a first chunk, then a long silence
    pings = app_of(rig.gateway)[PINGS_KEY]
    async with rig.post({**HI, "stream": True}) as resp:
        async with asyncio.timeout(NEVER_HANG):
            first = await resp.content.readuntil(b"\n\n")
            ping = await resp.content.readuntil(b"\n\n")  # the upstream is still silent
        assert ping == PING and len(pings) == 1
        rest.set()
        events = sse_events(first + ping + await resp.read())
    assert events[0]["choices"][0]["delta"]["role"] == "assistant" and len(events) > 2
    assert len(pings) == 0  # the stream ended: it is no longer watched
    watcher = pings._task
    assert watcher is not None
    async with asyncio.timeout(NEVER_HANG):
        await watcher  # it stops by itself once nothing is open


async def test_the_openai_sdk_skips_the_pings(rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    pinged = asyncio.Event()
    send = sse_pings._send

    async def send_and_tell(response: Any, writer: Any) -> None:
        await send(response, writer)
        pinged.set()

    monkeypatch.setattr(sse_pings, "_send", send_and_tell)
    rest = asyncio.Event()
    rig.fake.always(content="one two three", hold=rest, hold_after=1)
    oai: Any = openai_client(rig.gateway, rig.key)
    stream = await oai.chat.completions.create(model="gpt", messages=HI["messages"], stream=True)
    chunks = [await anext(stream)]
    async with asyncio.timeout(NEVER_HANG):
        await pinged.wait()  # the SDK is reading a stream that sent a ping after its chunk
    rest.set()
    chunks += [chunk async for chunk in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "one two three"
    await oai.close()


async def test_a_busy_stream_gets_no_ping(rig: Rig) -> None:
    # A chunk every third of the interval for about three intervals: never a silence.
    rig.fake.always(content=" ".join(["w"] * 9), chunk_delay=INTERVAL / 3)
    async with rig.post({**HI, "stream": True}) as resp:
        body = await resp.read()
    assert PING not in body and sse_events(body)


async def test_pings_stop_with_the_stream_and_never_follow_its_end(rig: Rig) -> None:
    rig.fake.always(content="a b")
    for _ in range(3):
        async with rig.post({**HI, "stream": True}) as resp:
            body = await resp.read()
        assert body.endswith(b"data: [DONE]\n\n") and PING not in body
    assert len(app_of(rig.gateway)[PINGS_KEY]) == 0


async def test_a_ping_due_as_a_slow_stream_ends_never_follows_its_last_chunk(
    aiohttp_server: AiohttpServer,
) -> None:
    """A ping the watcher started just before the stream ended runs while the end waits for
    a slow client to drain: it must write nothing, or its bytes would follow the terminating
    chunk and be read as the start of the next response on the connection."""
    pings = StreamPings(INTERVAL)
    pinged: list[asyncio.Task[None]] = []

    async def stream(request: web.Request) -> web.StreamResponse:
        resp = _EventStream(pings)
        writer = await resp.prepare(request)
        assert writer is not None
        await resp.write(b"data: 1\n\n")
        pings._ping(resp, writer)  # the watcher found it silent: a ping is due this turn
        pinged.extend(pings._pings)
        request.protocol.pause_writing()  # the client is slow: the end waits for a drain

        async def client_reads_again() -> None:
            await asyncio.gather(*pinged)  # the ping ran while the end was waiting
            request.protocol.resume_writing()

        reads = asyncio.create_task(client_reads_again())
        resp.stop_streaming()
        await resp.write_eof()  # the last chunk goes out, then waits for the drain
        await reads
        return resp

    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="next")

    app = web.Application()
    app.router.add_get("/stream", stream)
    app.router.add_get("/next", hello)
    server = await aiohttp_server(app)
    reader, writer = await asyncio.open_connection(server.host, server.port)
    try:
        async with asyncio.timeout(NEVER_HANG):
            writer.write(b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n")
            first = await reader.readuntil(b"\r\n0\r\n\r\n")
            writer.write(b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n")
            head = await reader.readuntil(b"\r\n\r\n")
    finally:
        writer.close()
        await pings.close()
    assert b"data: 1" in first and PING not in first and len(pinged) == 1
    assert head.startswith(b"HTTP/1.1 200"), head  # not ping bytes left over from the stream


STREAMING = {
    "/v1/completions": {"model": "gpt", "prompt": "hello world", "stream": True},
    "/v1/responses": {"model": "gpt", "input": "hello world", "stream": True},
    "/v1/messages": {
        "model": "gpt",
        "max_tokens": 50,
        "messages": [{"role": "user", "content": "hello world"}],
        "stream": True,
    },
}


@pytest.mark.parametrize("path", STREAMING)
async def test_every_streaming_endpoint_is_pinged_in_a_silence_and_ends_cleanly(
    rig: Rig, path: str
) -> None:
    rest = asyncio.Event()
    rig.fake.always(content="one two three", hold=rest, hold_after=1)
    pings = app_of(rig.gateway)[PINGS_KEY]
    async with rig.gateway.post(path, json=STREAMING[path], headers=rig.headers) as resp:
        assert resp.status == 200, await resp.text()
        async with asyncio.timeout(NEVER_HANG):
            first = await resp.content.readuntil(b"\n\n")
            while (event := await resp.content.readuntil(b"\n\n")) != PING:
                first += event  # (a stream may open with a few events of its own)
        rest.set()
        tail = await resp.read()
    assert PING not in first and PING not in tail
    assert b'"type":"error"' not in tail and b'{"error"' not in tail and len(pings) == 0
    assert tail.rstrip().endswith((b"[DONE]", b"}"))  # a whole last event, nothing after it


async def test_hundreds_of_silent_streams_are_each_pinged_and_all_end_cleanly(rig: Rig) -> None:
    from aiohttp import ClientSession, TCPConnector

    count = 300
    rest = asyncio.Event()
    rig.fake.always(content="one two", hold=rest, hold_after=1)
    pings = app_of(rig.gateway)[PINGS_KEY]
    base = f"http://{rig.gateway.host}:{rig.gateway.port}"
    pinged = 0

    async def one(session: ClientSession) -> bytes:
        nonlocal pinged
        async with session.post("/v1/chat/completions", json={**HI, "stream": True}) as resp:
            first = await resp.content.readuntil(b"\n\n")
            assert await resp.content.readuntil(b"\n\n") == PING
            pinged += 1
            if pinged == count:
                rest.set()  # every stream was pinged: the upstream goes on
            return first + await resp.read()

    async with ClientSession(base, connector=TCPConnector(limit=0), headers=rig.headers) as s:
        async with asyncio.timeout(NEVER_HANG * 4):
            bodies = await asyncio.gather(*(one(s) for _ in range(count)))
    for body in bodies:
        assert body.endswith(b"data: [DONE]\n\n")  # (more pings while the others waited)
        text = "".join(
            e["choices"][0]["delta"].get("content") or "" for e in sse_events(body) if e["choices"]
        )
        assert text == "one two"
    assert len(pings) == 0


async def test_a_client_that_stops_reading_in_a_silence_then_reads_gets_it_all_in_order(
    aiohttp_server: AiohttpServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stalled client during a silence: the pings wait in the buffer with the stream (a
    ping's write never waits for the client: no task piles up), and once it reads again it
    gets them, then the rest of the stream, then its end."""
    pings = StreamPings(INTERVAL)
    sent: list[int] = []
    several = asyncio.Event()
    send = sse_pings._send

    async def counted(response: Any, writer: Any) -> None:
        sent.append(1)
        await send(response, writer)
        if len(sent) == 3:
            several.set()

    monkeypatch.setattr(sse_pings, "_send", counted)

    async def stream(request: web.Request) -> web.StreamResponse:
        resp = _EventStream(pings)
        await resp.prepare(request)
        await resp.write(b"data: 1\n\n")
        request.protocol.pause_writing()  # the client takes nothing (its buffers are full)
        await several.wait()
        assert len(pings._pings) == 1  # only the ping now running: none waits for the client
        request.protocol.resume_writing()  # it reads again
        await resp.write(b"data: 2\n\n")
        resp.stop_streaming()
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_get("/stream", stream)
    server = await aiohttp_server(app)
    reader, writer = await asyncio.open_connection(server.host, server.port)
    try:
        async with asyncio.timeout(NEVER_HANG):
            writer.write(b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n")
            body = await reader.readuntil(b"\r\n0\r\n\r\n")
    finally:
        writer.close()
        await pings.close()
    assert body.count(PING) == len(sent) >= 3
    assert body.index(b"data: 1") < body.index(PING) and body.rindex(PING) < body.index(b"data: 2")


async def test_a_client_gone_during_a_silence_is_counted_as_gone(rig: Rig) -> None:
    from tests.conftest import usage_rows

    rest = asyncio.Event()
    rig.fake.always(content="one two three", hold=rest, hold_after=1)
    pings = app_of(rig.gateway)[PINGS_KEY]
    reader, writer = await asyncio.open_connection(rig.gateway.host, rig.gateway.port)
    body = json.dumps({**HI, "stream": True}).encode()
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {rig.key}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    async with asyncio.timeout(NEVER_HANG):
        writer.write(head + body)
        await reader.readuntil(b"data: ")  # the stream began
        writer.close()  # and its client is gone in the silence that follows
        await writer.wait_closed()
        await asyncio.sleep(INTERVAL * 4)  # a silence long enough for pings to be due
        rest.set()
        rows: list[dict[str, Any]] = []
        while not rows or len(pings):
            await asyncio.sleep(INTERVAL / 3)  # the row is written after the end
            rows = await usage_rows(rig.gateway)
    assert rows[-1]["status"] == 499  # counted as the client's hang-up, not a gateway failure


@pytest.mark.skipif(not hasattr(socket, "TCP_USER_TIMEOUT"), reason="TCP_USER_TIMEOUT is Linux's")
async def test_a_stalled_peer_is_dropped_by_the_kernel_on_every_client_connection(
    rig: Rig,
) -> None:
    """The send timeout is set once per connection, before and after a stream alike: no
    stream pays the system calls to set it and put it back."""
    runner = rig.gateway.server.runner
    assert runner is not None and runner.server is not None
    server = runner.server

    def user_timeouts() -> list[int]:
        return [
            proto.transport.get_extra_info("socket").getsockopt(
                socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT
            )
            for proto in server.connections
            if proto.transport is not None
        ]

    async with rig.post(HI) as resp:
        assert resp.status == 200
        assert user_timeouts() == [int(SEND_TIMEOUT * 1000)]
    async with rig.post({**HI, "stream": True}) as resp:
        await resp.read()
    assert user_timeouts() == [int(SEND_TIMEOUT * 1000)]  # the same connection, kept as it was
