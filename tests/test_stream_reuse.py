"""How a stream's upstream connection is read and reused.

A stream's upstream connection goes back to the pool when the upstream ends it well, also
when its `data: [DONE]` and the end of its chunked body come in separate reads; an upstream
that sends `[DONE]` and then holds the connection open costs the client no wait, and has
its connection closed after `_http.LINGER_SECONDS`; until its connection is back in the pool or
closed, it counts against `max_connections`. A stream that fills the reader's buffer
has its connection paused and resumed (`_http._ResumeWhenPaused` passes on only the resumes
that can do anything) and arrives whole; several chunks read at once are taken as aiohttp's
`readany()` takes them (`_http._take`)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiohttp import StreamReader
from aiohttp.client_proto import ResponseHandler
from aiohttp.pytest_plugin import AiohttpClient

from gateway.providers import _http
from gateway.providers._http import _take
from gateway.settings import ModelConfig, Target
from tests.bench_servers import message_events
from tests.conftest import (
    NEVER_HANG,
    MakeSettings,
    create_key,
    provider_config,
    start_gateway,
    usage_rows,
)
from tests.test_attack_upstream import (
    HI,
    KINDS,
    UPSTREAM_KEY,
    Answer,
    RawUpstream,
    Rig as Rig,
    chunk,
    http,
    sse,
)

STOP = (
    b'{"id":"c","object":"chat.completion.chunk","created":1,"model":"m-1","choices":'
    b'[{"index":0,"delta":{},"finish_reason":"stop"}]}'
)
USAGE = (
    b'{"id":"c","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}}'
)
ADMIN_KEY = "admin-0123456789abcdef"
HEAD = http("200 OK", {"Content-Type": "text/event-stream", "Transfer-Encoding": "chunked"})
TERMINATOR = b"0\r\n\r\n"


def chunked(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)


# A stream up to its `[DONE]`, the end of its body (TERMINATOR) not sent yet; and what the
# client reads of it (the usage chunk it did not ask for left out).
UNTIL_DONE = HEAD + chunked(sse(chunk("a"), STOP, USAGE)) + chunked(sse(b"[DONE]"))
READ = sse(chunk("a"), STOP, b"[DONE]")


class CountingUpstream(RawUpstream):
    """A `RawUpstream` that keeps, for each connection it was opened, an event set once that
    connection is gone."""

    def __init__(self, answer: Answer) -> None:
        super().__init__(answer)
        self.connections: list[asyncio.Event] = []

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        gone = asyncio.Event()
        self.connections.append(gone)
        try:
            await super()._serve(reader, writer)
        finally:
            gone.set()


Build = Callable[..., Awaitable[Rig]]


@pytest.fixture
async def build(aiohttp_client: AiohttpClient, make_settings: MakeSettings) -> AsyncIterator[Build]:
    servers: list[asyncio.Server] = []

    async def make(answer: Answer, kind: str = "openai", **more: Any) -> Rig:
        upstream = CountingUpstream(answer)
        await upstream.start()
        assert upstream.server is not None
        servers.append(upstream.server)
        base = f"http://127.0.0.1:{upstream.port}{KINDS[kind]}"
        fields: dict[str, object] = {"responses_api": True} if kind == "responses" else {}
        fields |= more
        config_kind = "openai" if kind == "responses" else kind
        provider = provider_config(
            config_kind, name="up", base_url=base, api_keys=(UPSTREAM_KEY,), **fields
        )
        model = ModelConfig(name="m", targets=(Target(provider="up", model="m-1"),))
        gateway = await start_gateway(
            aiohttp_client,
            make_settings(providers=(provider,), models=(model,), admin_key=ADMIN_KEY),
        )
        return Rig(gateway, await create_key(gateway), kind, upstream)

    yield make
    for server in servers:
        server.close()


def connections(rig: Rig) -> list[asyncio.Event]:
    upstream = rig.upstream
    assert isinstance(upstream, CountingUpstream)
    return upstream.connections


async def upstream_stats(rig: Rig) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    async with rig.gateway.get("/admin/stats", headers=headers) as resp:
        assert resp.status == 200
        stats: dict[str, Any] = (await resp.json())["providers"]["up"]
        return stats


async def settled(rig: Rig) -> dict[str, Any]:
    """The provider's stats once no slot is in use or waited for (the test's timeout bounds
    the wait: a leaked slot hangs here)."""
    while True:
        now = await upstream_stats(rig)
        if now["in_use"] == 0 and now["waiting"] == 0:
            return now
        await asyncio.sleep(0.01)


async def stream(rig: Rig) -> bytes:
    status, body = await rig.call(stream=True)
    assert status == 200, body
    return body


@pytest.mark.parametrize("fast", [True, False], ids=["fast-reads", "aiohttp-reads"])
async def test_a_stream_whose_body_ends_after_its_done_keeps_its_connection(
    build: Build, monkeypatch: pytest.MonkeyPatch, fast: bool
) -> None:
    monkeypatch.setattr(_http, "FAST_READS", fast)
    # The body's end follows `[DONE]` only once the client has the whole stream: without the
    # linger the gateway would already have dropped the connection and opened a new one for
    # each stream.
    taken = asyncio.Event()
    ended = asyncio.Event()

    async def answer(request: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(UNTIL_DONE)
        await writer.drain()
        await taken.wait()
        writer.write(TERMINATOR)
        await writer.drain()
        ended.set()

    rig = await build(answer)
    async with asyncio.timeout(NEVER_HANG):
        for _ in range(5):
            taken.clear()
            ended.clear()
            body = await stream(rig)
            assert body == READ
            taken.set()
            await ended.wait()
            await asyncio.sleep(0)  # (one turn of the loop: the gateway reads the body's end)
    assert len(connections(rig)) == 1
    assert len(rig.upstream.requests) == 5
    rows = await usage_rows(rig.gateway)
    assert [(row["status"], row["completion_tokens"]) for row in rows] == [(200, 2)] * 5


async def test_a_stream_whose_body_ends_with_its_done_keeps_its_connection(build: Build) -> None:
    async def answer(request: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(HEAD + chunked(sse(chunk("a"), STOP, USAGE, b"[DONE]")) + TERMINATOR)
        await writer.drain()

    rig = await build(answer)
    async with asyncio.timeout(NEVER_HANG):
        for _ in range(5):
            assert await stream(rig) == READ
    assert len(connections(rig)) == 1


async def test_an_upstream_that_holds_its_connection_after_done_costs_no_wait(
    build: Build, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Hostile: `[DONE]`, then neither the body's end nor a close. The client has its whole
    # stream at once; the gateway closes that connection after the linger, and the next
    # stream gets a new one.
    monkeypatch.setattr(_http, "LINGER_SECONDS", 0.05)

    async def answer(request: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(UNTIL_DONE)
        await writer.drain()

    rig = await build(answer)
    async with asyncio.timeout(NEVER_HANG):
        assert await stream(rig) == READ
        await connections(rig)[0].wait()  # closed by the gateway
        assert await stream(rig) == READ
        await connections(rig)[1].wait()
    assert len(connections(rig)) == 2
    assert len(rig.upstream.requests) == 2
    rows = await usage_rows(rig.gateway)
    assert [row["status"] for row in rows] == [200, 200]


async def test_a_lingering_connection_counts_against_max_connections(
    build: Build, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `max_connections = 1` is a promise to the upstream: one connection at most. A stream
    # whose body is still open after `[DONE]` holds its connection, so the next request waits
    # for it (on the record), and gets it, reused, once the body ends.
    monkeypatch.setattr(_http, "LINGER_SECONDS", NEVER_HANG)
    end = asyncio.Event()

    async def answer(request: bytes, writer: asyncio.StreamWriter) -> None:
        end.clear()
        writer.write(UNTIL_DONE)
        await writer.drain()
        await end.wait()
        writer.write(TERMINATOR)
        await writer.drain()

    rig = await build(answer, max_connections=1, pool_timeout=NEVER_HANG)
    async with asyncio.timeout(NEVER_HANG):
        assert await stream(rig) == READ
        assert (await upstream_stats(rig))["in_use"] == 1  # the connection lingers
        second = asyncio.ensure_future(stream(rig))
        while not (await upstream_stats(rig))["waiting"]:  # noqa: ASYNC110 (a counter)
            await asyncio.sleep(0.01)
        end.set()  # the first body ends: its connection goes back to the pool, and its slot
        assert await second == READ
        end.set()
        stats = await settled(rig)
    assert len(connections(rig)) == 1  # the second stream had the first's connection
    assert (stats["waited"], stats["pool_timeouts"]) == (1, 0)


async def test_a_connection_held_after_done_frees_its_slot_when_closed(
    build: Build, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Hostile: `[DONE]`, then the body held open for good. The linger closes the connection
    # and frees its slot: with `max_connections = 1` the provider goes on serving.
    monkeypatch.setattr(_http, "LINGER_SECONDS", 0.05)

    async def answer(request: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(UNTIL_DONE)
        await writer.drain()

    rig = await build(answer, max_connections=1, pool_timeout=NEVER_HANG)
    async with asyncio.timeout(NEVER_HANG):
        for _ in range(3):
            assert await stream(rig) == READ
        for gone in connections(rig):
            await gone.wait()
        stats = await settled(rig)
    assert len(connections(rig)) == 3
    assert stats["pool_timeouts"] == 0


@pytest.mark.parametrize("fast", [True, False], ids=["fast-reads", "aiohttp-reads"])
async def test_a_stream_that_fills_the_readers_buffer_is_paused_resumed_and_whole(
    build: Build, monkeypatch: pytest.MonkeyPatch, fast: bool
) -> None:
    # Thousands of events of one chunk each, all at once: more than the reader holds before
    # it pauses the connection (twice the session's read_bufsize). Without FAST_READS (an
    # aiohttp other than the one `_take` knows) the stream reads through aiohttp's own
    # `readany()`, the same.
    monkeypatch.setattr(_http, "FAST_READS", fast)
    pauses: list[bool] = []
    pause = ResponseHandler.pause_reading

    def counting(self: ResponseHandler) -> None:
        pauses.append(True)
        pause(self)

    monkeypatch.setattr(ResponseHandler, "pause_reading", counting)
    words = [chunk(f"word{i:05d} " + "x" * 150) for i in range(3000)]

    async def answer(request: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(HEAD + b"".join(chunked(sse(word)) for word in words))
        writer.write(chunked(sse(STOP, USAGE)) + chunked(sse(b"[DONE]")) + TERMINATOR)
        await writer.drain()

    rig = await build(answer)
    async with asyncio.timeout(NEVER_HANG):
        for _ in range(2):
            assert await stream(rig) == sse(*words, STOP, b"[DONE]")
    assert pauses  # the buffer did fill: the resumes that matter were passed on
    assert len(connections(rig)) == 1
    rows = await usage_rows(rig.gateway)
    assert [(row["status"], row["completion_tokens"]) for row in rows] == [(200, 2)] * 2


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/messages"])
async def test_an_anthropic_stream_whose_body_ends_after_message_stop_keeps_its_connection(
    build: Build, path: str
) -> None:
    # Translated (chat completions) or passed through (messages): the stream ends at
    # `message_stop`, and its connection goes back to the pool when the body ends.
    taken = asyncio.Event()
    ended = asyncio.Event()
    *events, stop = message_events()

    async def answer(request: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(HEAD + chunked(b"".join(events)) + chunked(stop))
        await writer.drain()
        await taken.wait()
        writer.write(TERMINATOR)
        await writer.drain()
        ended.set()

    rig = await build(answer, "anthropic")
    body: dict[str, object] = {"model": "m", "messages": HI, "stream": True, "max_tokens": 50}
    async with asyncio.timeout(NEVER_HANG):
        for _ in range(3):
            taken.clear()
            ended.clear()
            status, data = await rig.post(path, body)
            assert status == 200, data
            end = b"data: [DONE]\n\n" if path == "/v1/chat/completions" else stop
            assert data.endswith(end), data[-200:]
            taken.set()
            await ended.wait()
            await asyncio.sleep(0)  # (one turn of the loop: the gateway reads the body's end)
    assert len(connections(rig)) == 1
    assert len(rig.upstream.requests) == 3
    rows = await usage_rows(rig.gateway)
    assert [row["status"] for row in rows] == [200] * 3


async def test_a_responses_stream_whose_body_ends_after_its_last_event_keeps_its_connection(
    build: Build,
) -> None:
    taken = asyncio.Event()
    ended = asyncio.Event()
    usage = {"input_tokens": 1, "output_tokens": 1, "total_tokens": 2}
    # (in the order the `openai` SDK builds a response from, which the relay checks)
    item = {"type": "message", "id": "m", "role": "assistant", "content": []}
    part = {"type": "output_text", "text": "", "annotations": []}
    events = [
        {"type": "response.created", "response": {"id": "r", "status": "in_progress"}},
        {"type": "response.output_item.added", "output_index": 0, "item": item},
        {
            "type": "response.content_part.added",
            "output_index": 0,
            "content_index": 0,
            "item_id": "m",
            "part": part,
        },
        {
            "type": "response.output_text.delta",
            "item_id": "m",
            "output_index": 0,
            "content_index": 0,
            "delta": "a",
        },
        {"type": "response.output_item.done", "output_index": 0, "item": item},
    ]
    last = {"type": "response.completed", "response": {"id": "r", "status": "completed"}}
    last["response"]["usage"] = usage  # type: ignore[index]

    def frame(event: dict[str, object]) -> bytes:
        return b"event: %s\ndata: %s\n\n" % (
            str(event["type"]).encode(),
            json.dumps(event).encode(),
        )

    async def answer(request: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(HEAD + chunked(b"".join(frame(e) for e in events)) + chunked(frame(last)))
        await writer.drain()
        await taken.wait()
        writer.write(TERMINATOR)
        await writer.drain()
        ended.set()

    rig = await build(answer, "responses")
    async with asyncio.timeout(NEVER_HANG):
        for _ in range(3):
            taken.clear()
            ended.clear()
            status, data = await rig.call(stream=True)
            assert status == 200, data
            assert b"response.completed" in data
            taken.set()
            await ended.wait()
            await asyncio.sleep(0)  # (one turn of the loop: the gateway reads the body's end)
    assert len(connections(rig)) == 1
    assert len(rig.upstream.requests) == 3


class _Protocol:
    """What a body reader asks of its connection, recorded."""

    def __init__(self) -> None:
        self.resumes = 0
        self._reading_paused = False
        self._buffer_paused = False

    def resume_reading(self, resume_parser: bool = True) -> None:
        self.resumes += 1

    def pause_reading(self) -> None:
        self._reading_paused = True


def _reader(chunks: list[bytes], limit: int) -> tuple[StreamReader, _Protocol]:
    protocol = _Protocol()
    reader = StreamReader(protocol, limit, loop=asyncio.get_running_loop())  # type: ignore[arg-type]
    reader.begin_http_chunk_receiving()
    for data in chunks:
        reader.feed_data(data)
        reader.end_http_chunk_receiving()
    return reader, protocol


def _state(reader: StreamReader) -> tuple[object, ...]:
    r: Any = reader
    return (r._size, r._cursor, list(r._http_chunk_splits), list(r._buffer), r.total_bytes)


@pytest.mark.parametrize("limit", [2**16, 8], ids=["below-low-water", "above-low-water"])
async def test_several_chunks_are_taken_as_readany_takes_them(limit: int) -> None:
    # `_take` stands in for aiohttp's `readany()` when the reader holds several chunks: the
    # same bytes, the reader left in the same state, and the connection resumed when aiohttp
    # would resume it (once, not once a chunk).
    chunks = [sse(chunk(f"w{i}")) for i in range(5)]
    theirs, their_protocol = _reader(chunks, limit)
    ours, our_protocol = _reader(chunks, limit)
    assert await theirs.readany() == _take(ours) == b"".join(chunks)
    assert _state(ours) == _state(theirs)
    assert bool(our_protocol.resumes) == bool(their_protocol.resumes)
    for reader in (theirs, ours):
        reader.feed_data(b"more")
        reader.end_http_chunk_receiving()
        reader.feed_eof()
    assert await theirs.readany() == await ours.readany() == b"more"
    assert _state(ours) == _state(theirs)
