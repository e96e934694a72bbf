"""Issue 13's work (speed under real LLM load) attacked from outside: the connection gate and
a stream's lingering connection, the watchdog, pass-through streams and the batched usage rows,
against a raw upstream that misbehaves on the wire, hostile clients and the `openai` SDK."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import socket
import sqlite3
import subprocess
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp.pytest_plugin import AiohttpClient

from gateway.providers import _http
from gateway.settings import ModelConfig, RoutingSettings, Target
from gateway.state import INFLIGHT_KEY, USAGE_KEY
from tests.bench_servers import message_events
from tests.conftest import (
    NEVER_HANG,
    ONE_ATTEMPT,
    MakeSettings,
    app_of,
    cli_key,
    create_key,
    free_port,
    openai_client,
    provider_config,
    start_gateway,
    start_serve,
    usage_rows,
)
from tests.test_attack_upstream import (
    HI,
    KINDS,
    UPSTREAM_KEY,
    Answer,
    RawUpstream,
    Rig,
    chunk,
    http,
    sse,
)
from tests.test_stream_reuse import (
    ADMIN_KEY,
    HEAD,
    READ,
    STOP,
    TERMINATOR,
    UNTIL_DONE,
    USAGE,
    chunked,
    settled,
    upstream_stats,
)

MiB = 1024 * 1024
STREAM = sse(chunk("a"), STOP, USAGE, b"[DONE]")


async def first_chunk_then(
    writer: asyncio.StreamWriter, go: asyncio.Event, text: str = "a"
) -> None:
    """A stream whose first chunk comes at once and the rest (stop, usage, `[DONE]` and the
    body's end) once `go` is set: it holds its connection until then."""
    writer.write(HEAD + chunked(sse(chunk(text))))
    await writer.drain()
    await go.wait()
    writer.write(chunked(sse(STOP, USAGE, b"[DONE]")) + TERMINATOR)
    await writer.drain()


def _open(sock: socket.socket) -> bool:
    """Whether the gateway still holds its end of this connection (no FIN or RST yet)."""
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) != b""
    except BlockingIOError:
        return True
    except OSError:
        return False


class PeerUpstream(RawUpstream):
    """A `RawUpstream` that counts its connections, and the most the gateway held open at
    once (looked at when each one is accepted: a connection the gateway has closed has its FIN
    here by then, on loopback)."""

    def __init__(self, answer: Answer) -> None:
        super().__init__(answer)
        self.accepted = 0
        self.peak = 0
        self._socks: list[socket.socket] = []

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")._sock
        self._socks = [s for s in self._socks if s.fileno() >= 0 and _open(s)]
        self._socks.append(sock)
        self.accepted += 1
        self.peak = max(self.peak, len(self._socks))
        await super()._serve(reader, writer)


def serve_config(
    tmp_path: Path, upstream: PeerUpstream, server: str, *, routing: str = "", provider: str = ""
) -> tuple[Path, Path]:
    """A config for a real `gateway serve` in front of `upstream` (one OpenAI provider, "up")
    with these lines in its sections, and its database, both in `tmp_path`."""
    db = tmp_path / "keys.db"
    config = tmp_path / "gateway.toml"
    config.write_text(
        f'[server]\ndatabase = "{db}"\n{server}\n'
        + (f"[routing]\n{routing}\n" if routing else "")
        + f'[[providers]]\nname = "up"\ntype = "openai"\napi_keys = ["{UPSTREAM_KEY}"]\n'
        f'base_url = "http://127.0.0.1:{upstream.port}/v1"\n{provider}'
    )
    return config, db


Build = Callable[..., Awaitable[Rig]]


@pytest.fixture
async def build(aiohttp_client: AiohttpClient, make_settings: MakeSettings) -> AsyncIterator[Build]:
    servers: list[asyncio.Server] = []

    async def make(
        answer: Answer, routing: RoutingSettings = ONE_ATTEMPT, kind: str = "openai", **more: Any
    ) -> Rig:
        upstream = PeerUpstream(answer)
        await upstream.start()
        assert upstream.server is not None
        servers.append(upstream.server)
        provider = provider_config(
            kind,
            name="up",
            base_url=f"http://127.0.0.1:{upstream.port}{KINDS[kind]}",
            api_keys=(UPSTREAM_KEY,),
            **more,
        )
        model = ModelConfig(name="m", targets=(Target(provider="up", model="m-1"),))
        gateway = await start_gateway(
            aiohttp_client,
            make_settings(
                providers=(provider,), models=(model,), routing=routing, admin_key=ADMIN_KEY
            ),
        )
        return Rig(gateway, await create_key(gateway), kind, upstream)

    yield make
    for server in servers:
        server.close()


def peers(rig: Rig) -> PeerUpstream:
    assert isinstance(rig.upstream, PeerUpstream)
    return rig.upstream


async def rows_of(rig: Rig, count: int) -> list[dict[str, Any]]:
    from gateway.state import USAGE_KEY
    from tests.conftest import app_of

    async with asyncio.timeout(NEVER_HANG):
        await app_of(rig.gateway)[USAGE_KEY].wait_recorded(count)
        return await usage_rows(rig.gateway)


def auth(rig: Rig) -> dict[str, str]:
    return {"Authorization": f"Bearer {rig.key}"}


BODY = {"model": "m", "messages": HI, "stream": True}


# --- A connection that lingers after [DONE] and then dies --------------------------------------


@pytest.mark.parametrize("death", ["reset", "close", "garbage"])
async def test_a_lingering_connection_that_dies_frees_its_slot_at_once(
    build: Build, monkeypatch: pytest.MonkeyPatch, death: str
) -> None:
    # `[DONE]`, the client has its whole stream, then the upstream's connection dies instead
    # of ending its body: reset, closed, or bytes that are no HTTP chunk. Nothing is open to
    # the upstream any more, so with max_connections = 1 the next request must get a
    # connection at once, not a 503 for a slot held by a dead connection until the linger ends.
    monkeypatch.setattr(_http, "LINGER_SECONDS", NEVER_HANG)
    served = asyncio.Event()
    dead = asyncio.Event()
    first = True

    async def answer(request: bytes, writer: asyncio.StreamWriter) -> None:
        nonlocal first
        if not first:
            writer.write(HEAD + chunked(STREAM) + TERMINATOR)
            await writer.drain()
            return
        first = False
        writer.write(UNTIL_DONE)
        await writer.drain()
        await served.wait()
        if death == "reset":
            sock = writer.get_extra_info("socket")
            sock.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
            )
            writer.transport.abort()
        elif death == "close":
            writer.close()
        else:
            writer.write(b"zz\r\nnot a chunk\r\n\r\n")
            await writer.drain()
        dead.set()

    rig = await build(answer, max_connections=1, pool_timeout=0.5)
    async with asyncio.timeout(NEVER_HANG):
        status, body = await rig.call(stream=True)
        assert (status, body) == (200, READ)
        served.set()
        await dead.wait()
        async with asyncio.timeout(0.5):  # far less than the linger
            await settled(rig)
        status, body = await rig.call(stream=True)
        assert status == 200, body
        await settled(rig)
    assert peers(rig).peak == 1
    rows = await rows_of(rig, 2)
    assert [(r["status"], r["completion_tokens"]) for r in rows] == [(200, 2)] * 2


async def test_a_second_response_after_the_body_s_end_never_reaches_another_request(
    build: Build,
) -> None:
    # `[DONE]`, the body's end, then a whole second response nobody asked for on the same
    # connection: the next request must get its own answer, never that one.
    count = 0

    async def answer(request: bytes, writer: asyncio.StreamWriter) -> None:
        nonlocal count
        count += 1
        own = sse(chunk(f"answer {count}"), STOP, USAGE, b"[DONE]")
        evil = HEAD + chunked(sse(chunk("smuggled"), STOP, USAGE, b"[DONE]")) + TERMINATOR
        writer.write(HEAD + chunked(own) + TERMINATOR + evil)
        await writer.drain()

    rig = await build(answer)
    async with asyncio.timeout(NEVER_HANG):
        for n in range(1, 4):
            status, body = await rig.call(stream=True)
            assert status == 200
            assert b"smuggled" not in body
            assert f"answer {len(rig.upstream.requests)}".encode() in body, (n, body)
        await settled(rig)


# --- Many streams against max_connections = 2 ---------------------------------------------------


async def test_a_storm_of_streams_and_hang_ups_never_opens_more_than_max_connections(
    build: Build, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 40 streams at once against max_connections = 2, the upstream's answers of every shape
    # (whole, [DONE] then the body's end later, [DONE] then nothing until the linger closes
    # it, [DONE] then a reset), a quarter of the clients hanging up mid-stream and some while
    # they wait for a slot. The upstream never sees more than 2 connections at once, every
    # slot comes back (in_use and waiting 0), and each request that ran has one usage row.
    monkeypatch.setattr(_http, "LINGER_SECONDS", 0.05)
    shapes = ["whole", "late-end", "never-ends", "reset"]
    served = 0

    async def answer(request: bytes, writer: asyncio.StreamWriter) -> None:
        nonlocal served
        shape = shapes[served % len(shapes)]
        served += 1
        if shape == "whole":
            writer.write(HEAD + chunked(STREAM) + TERMINATOR)
            await writer.drain()
            return
        writer.write(HEAD + chunked(sse(chunk("a"), STOP, USAGE)))
        await writer.drain()
        await asyncio.sleep(0)
        writer.write(chunked(sse(b"[DONE]")))
        await writer.drain()
        if shape == "late-end":
            await asyncio.sleep(0.01)
            writer.write(TERMINATOR)
            await writer.drain()
        elif shape == "reset":
            writer.transport.abort()
        else:
            await asyncio.sleep(NEVER_HANG)

    rig = await build(answer, max_connections=2, pool_timeout=NEVER_HANG)
    url = rig.gateway.make_url("/v1/chat/completions")

    async def one(n: int, session: aiohttp.ClientSession) -> int:
        async with session.post(url, json=BODY, headers=auth(rig)) as resp:
            if n % 4 == 3:
                await resp.content.readuntil(b"\n\n")  # then hangs up
                return -1
            body = await resp.read()
            assert resp.status == 200 and body == READ, body
            return resp.status

    async def hang_up_waiting(session: aiohttp.ClientSession) -> None:
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.02):
                await session.post(url, json=BODY, headers=auth(rig))

    async with asyncio.timeout(NEVER_HANG):
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            results = await asyncio.gather(
                *[one(n, session) for n in range(40)],
                *[hang_up_waiting(session) for _ in range(5)],
            )
        assert results.count(200) == 30
        now = await settled(rig)
    assert peers(rig).peak <= 2
    assert (now["in_use"], now["waiting"], now["pool_timeouts"]) == (0, 0, 0)
    # A request hung up while it waited has its row if it reached the gateway; on a busy
    # machine its 0.02 s can run out before it is sent (then no row, rightly). Once nothing is
    # in flight (and the finishing callbacks ran), what was recorded is all there will be.
    app = app_of(rig.gateway)
    async with asyncio.timeout(NEVER_HANG):
        while app[INFLIGHT_KEY]:  # noqa: ASYNC110 - nothing signals it empty; as `settled`
            await asyncio.sleep(0.01)
        await asyncio.sleep(0)
    handled = app[USAGE_KEY].recorded
    assert 40 <= handled <= 45
    rows = await rows_of(rig, handled)
    assert len(rows) == handled
    assert sorted({r["status"] for r in rows}) in ([200, 499], [200])
    assert sum(r["status"] == 200 for r in rows) >= 30


# --- Pass-through streams as the SDK reads them ------------------------------------------------


def upstream_chunks(*pieces: bytes) -> Answer:
    """A chunked stream answer, each piece an HTTP chunk and a write of its own."""

    async def answer(request: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(HEAD)
        for piece in pieces:
            writer.write(chunked(piece))
            await writer.drain()
            await asyncio.sleep(0)
        writer.write(TERMINATOR)
        await writer.drain()

    return answer


@pytest.mark.parametrize("include_usage", [True, False, None])
async def test_the_sdk_gets_usage_only_when_it_asked_and_the_row_counts_it(
    build: Build, include_usage: bool | None
) -> None:
    rig = await build(
        upstream_chunks(sse(chunk("hé"), chunk("llo")), sse(STOP), sse(USAGE), sse(b"[DONE]"))
    )
    options: Any = {} if include_usage is None else {"include_usage": include_usage}
    async with asyncio.timeout(NEVER_HANG), openai_client(rig.gateway, rig.key) as client:
        chunks = [
            c
            async for c in await client.chat.completions.create(
                model="m", messages=HI, stream=True, stream_options=options or openai.NOT_GIVEN
            )
        ]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "héllo"
    usage = [c.usage for c in chunks if c.usage is not None]
    if include_usage:
        assert [(u.prompt_tokens, u.completion_tokens) for u in usage] == [(3, 2)]
        assert chunks[-1].choices == []
    else:
        assert usage == []
        assert all(c.choices for c in chunks)
    sent = json.loads(rig.upstream.requests[0].partition(b"\r\n\r\n")[2])
    assert sent["stream_options"]["include_usage"] is True
    rows = await rows_of(rig, 1)
    assert [(r["status"], r["prompt_tokens"], r["completion_tokens"]) for r in rows] == [
        (200, 3, 2)
    ]


@pytest.mark.parametrize("cut", range(1, 8))
async def test_an_event_split_inside_a_utf8_character_arrives_whole(build: Build, cut: int) -> None:
    # "é€😀" split at every byte of its first characters, across HTTP chunks (and reads).
    events = sse(chunk("é€😀".encode()), STOP, USAGE, b"[DONE]")
    at = events.index("é".encode()) + cut
    rig = await build(upstream_chunks(events[:at], events[at:]))
    async with asyncio.timeout(NEVER_HANG):
        chunks = await rig.sdk(stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "é€😀"
    rows = await rows_of(rig, 1)
    assert [(r["status"], r["completion_tokens"]) for r in rows] == [(200, 2)]


@pytest.mark.parametrize("cut", [3, 10, len(UPSTREAM_KEY) - 1])
async def test_the_upstream_key_split_across_reads_never_reaches_the_client(
    build: Build, cut: int
) -> None:
    events = sse(chunk(f"my key is {UPSTREAM_KEY}!"), STOP, USAGE, b"[DONE]")
    at = events.index(UPSTREAM_KEY.encode()) + cut
    rig = await build(upstream_chunks(events[:at], events[at:]))
    async with asyncio.timeout(NEVER_HANG):
        status, body = await rig.call(stream=True)
    assert status == 200
    assert UPSTREAM_KEY.encode() not in body
    assert b"my key is [redacted]!" in body


async def test_an_event_that_grows_past_max_event_bytes_ends_the_stream_with_an_error(
    build: Build,
) -> None:
    # An event that has not ended when the gateway holds more than max_event_bytes of it (the
    # most it buffers of one event): an error event after the first one, not more memory.
    big = sse(chunk("x" * 5000))
    pieces = [big[i : i + 900] for i in range(0, len(big), 900)]
    rig = await build(
        upstream_chunks(sse(chunk("a")), *pieces, sse(STOP, USAGE, b"[DONE]")),
        max_event_bytes=1000,
    )
    async with asyncio.timeout(NEVER_HANG):
        chunks = await rig.sdk(stream=True)
    assert isinstance(chunks, openai.APIError)
    assert "max_event_bytes" in chunks.message
    await settled(rig)
    rows = await rows_of(rig, 1)
    assert [r["status"] for r in rows] == [502]


# --- Every way a stream fails gives its slot back ----------------------------------------------

FAILURES: dict[str, tuple[bytes, int]] = {
    # what the upstream sends (then it closes), the status of the request's usage row
    "redirect": (http("302 Found", {"Location": "http://evil/", "Content-Length": "0"}), 502),
    "error-500": (
        http("500 Oops", {"Content-Type": "application/json", "Content-Length": "2"}, b"{}"),
        503,
    ),
    "error-event": (HEAD + chunked(sse(chunk("a"), b'{"error":{"message":"boom"}}')), 502),
    "cut-short": (HEAD + chunked(sse(chunk("a"))) + TERMINATOR, 502),
    "not-json": (HEAD + chunked(sse(chunk("a"), b"{nope")) + TERMINATOR, 502),
    "bad-chunk": (HEAD + chunked(sse(chunk("a"))) + b"zz\r\n", 502),
    "switch": (http("101 Switching Protocols", {"Upgrade": "x", "Connection": "upgrade"}), 502),
    "silent-head": (b"", 504),
    "length-and-chunks": (
        http(
            "200 OK",
            {
                "Content-Type": "text/event-stream",
                "Content-Length": "5",
                "Transfer-Encoding": "chunked",
            },
        )
        + chunked(STREAM)
        + TERMINATOR,
        502,
    ),
    "pings-only": (HEAD + chunked(b": ping\n\n" * 1000), 502),  # then closed: no event
}


@pytest.mark.parametrize("failure", FAILURES)
async def test_a_stream_that_fails_gives_its_slot_back_and_the_next_is_served(
    build: Build, failure: str
) -> None:
    data, status = FAILURES[failure]
    calls = 0

    async def answer(request: bytes, writer: asyncio.StreamWriter) -> None:
        nonlocal calls
        calls += 1
        if calls > 1:
            writer.write(HEAD + chunked(STREAM) + TERMINATOR)
            await writer.drain()
            return
        if data:
            writer.write(data)
            await writer.drain()
            writer.close()
        else:
            await asyncio.sleep(NEVER_HANG)

    rig = await build(answer, max_connections=1, pool_timeout=0.5, first_byte_timeout=0.2)
    async with asyncio.timeout(NEVER_HANG):
        got, body = await rig.call(stream=True)
        if got == 200:  # failed after its first event: an error event ends it
            error = json.loads(body.split(b"data: ")[-1])["error"]
        else:
            error = json.loads(body)["error"]
            assert got == status
        assert error["message"] and UPSTREAM_KEY not in json.dumps(error)
        await settled(rig)
        got, body = await rig.call(stream=True)
        assert (got, body) == (200, READ)
        now = await settled(rig)
    assert peers(rig).peak == 1
    assert now["pool_timeouts"] == 0
    rows = await rows_of(rig, 2)
    assert [r["status"] for r in rows] == [status, 200]


# --- A real `gateway serve` on uvloop -----------------------------------------------------------


@pytest.mark.parametrize("use_uvloop", [True, False], ids=["uvloop", "asyncio"])
async def test_a_real_serve_process_on_its_loop_survives_hostile_streams_and_loses_no_row(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], use_uvloop: bool
) -> None:
    # The suite's gateway runs on pytest's asyncio loop; `gateway serve` runs on uvloop.
    # The same attacks on both: a stream whose connection lingers after [DONE] and is reset,
    # one that never sends its first byte, SDK streams with and without usage, against
    # max_connections = 1 and a pool_timeout shorter than the linger. Then SIGTERM: exit 0,
    # one row per request with its status and tokens, no key in the log.
    async def answer(request: bytes, writer: asyncio.StreamWriter) -> None:
        if b"silent" in request:
            await asyncio.sleep(NEVER_HANG)
            return
        if b"bytewise" in request:  # every byte a write, UTF-8 and the key split
            data = HEAD + chunked(sse(chunk(f"é€😀 {UPSTREAM_KEY}".encode()), STOP, USAGE))
            for i in range(len(data)):
                writer.write(data[i : i + 1])
                await writer.drain()
            writer.write(chunked(sse(b"[DONE]")) + TERMINATOR)
            await writer.drain()
            return
        if b"reset" in request:
            writer.write(HEAD + chunked(sse(chunk(UPSTREAM_KEY), STOP, USAGE, b"[DONE]")))
            await writer.drain()
            await asyncio.sleep(0.05)
            writer.transport.abort()
            return
        writer.write(HEAD + chunked(STREAM) + TERMINATOR)
        await writer.drain()

    upstream = PeerUpstream(answer)
    await upstream.start()
    port = free_port()
    config, db = serve_config(
        tmp_path,
        upstream,
        f'admin_key = "{ADMIN_KEY}"\nuvloop = {str(use_uvloop).lower()}\n',
        routing="max_attempts = 1\nfailure_threshold = 1000\n",
        provider="max_connections = 1\npool_timeout = 0.5\nfirst_byte_timeout = 0.3\n",
    )
    secret = await cli_key(db, capsys)
    log = tmp_path / "gateway.log"
    with log.open("wb") as out:
        proc = await start_serve(config, port, stdout=out)
    try:
        async with asyncio.timeout(NEVER_HANG):
            assert proc.stderr is not None
            assert b"listening" in await proc.stderr.readline()
            client = openai.AsyncOpenAI(
                api_key=secret, base_url=f"http://127.0.0.1:{port}/v1", max_retries=0
            )
            async with client:

                async def chat(word: str, **more: Any) -> Any:
                    messages: Any = [{"role": "user", "content": word}]
                    try:
                        chunks = await client.chat.completions.create(
                            model="up/x", messages=messages, stream=True, **more
                        )
                        return [c async for c in chunks]
                    except openai.APIError as exc:
                        return exc

                first = await chat("ok", stream_options={"include_usage": True})
                assert first[-1].usage.completion_tokens == 2
                reset = await chat("reset")
                assert "".join(c.choices[0].delta.content or "" for c in reset) == "[redacted]"
                again = await chat("ok")  # not a 503: the reset connection's slot is free
                assert all(c.usage is None for c in again) and again[-1].choices
                silent = await chat("silent")
                assert isinstance(silent, openai.APIStatusError) and silent.status_code == 504
                last = await chat("ok")
                assert not isinstance(last, openai.APIError)
                bytewise = await chat("bytewise")
                text = "".join(c.choices[0].delta.content or "" for c in bytewise)
                assert text == "é€😀 [redacted]"
            async with aiohttp.ClientSession() as session:
                stats_url = f"http://127.0.0.1:{port}/admin/stats"
                headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
                async with session.get(stats_url, headers=headers) as resp:
                    now = (await resp.json())["providers"]["up"]
            proc.terminate()
            assert await proc.wait() == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        assert upstream.server is not None
        upstream.server.close()
    assert (now["in_use"], now["waiting"], now["pool_timeouts"]) == (0, 0, 0)
    assert now["stream_timeouts"] == 1
    assert upstream.peak == 1
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT status, completion_tokens FROM usage ORDER BY ts").fetchall()
    assert [status for status, _ in rows] == [200, 200, 200, 504, 200, 200]
    assert [tokens for status, tokens in rows if status == 200] == [2, 2, 2, 2, 2]
    logged = log.read_bytes()
    assert b"loop" in logged
    assert UPSTREAM_KEY.encode() not in logged and secret.encode() not in logged


async def test_a_shutdown_with_streams_running_and_waiting_for_a_slot_loses_no_row(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # SIGTERM while one stream runs (its upstream holds it open after its first event) and
    # two more wait for its one connection (max_connections = 1). Past the grace period each
    # client gets an answer it can parse, the process exits 0, every request has its row,
    # and the upstream never had two connections.
    started = asyncio.Event()

    async def answer(request: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(HEAD + chunked(sse(chunk("a"))))
        await writer.drain()
        started.set()
        await asyncio.sleep(NEVER_HANG)

    upstream = PeerUpstream(answer)
    await upstream.start()
    port = free_port()
    config, db = serve_config(
        tmp_path,
        upstream,
        f'admin_key = "{ADMIN_KEY}"\nshutdown_grace_seconds = 0.2\n',
        routing="max_attempts = 3\nbackoff_initial = 2.0\n",
        provider=f"max_connections = 1\npool_timeout = {NEVER_HANG}\n",
    )
    secret = await cli_key(db, capsys)
    proc = await start_serve(config, port, stdout=subprocess.DEVNULL)
    try:
        async with asyncio.timeout(NEVER_HANG):
            assert proc.stderr is not None
            assert b"listening" in await proc.stderr.readline()
            url = f"http://127.0.0.1:{port}/v1/chat/completions"
            headers = {"Authorization": f"Bearer {secret}"}
            body = {"model": "up/x", "messages": HI, "stream": True}
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

                async def call() -> tuple[int, bytes]:
                    got = b""
                    status = 0
                    try:
                        async with session.post(url, json=body, headers=headers) as resp:
                            status = resp.status
                            async for piece in resp.content.iter_any():
                                got += piece
                            return resp.status, got
                    except aiohttp.ClientError as exc:
                        return -status, repr(exc).encode() + b" GOT " + got

                running = asyncio.ensure_future(call())
                await started.wait()
                waiting = [asyncio.ensure_future(call()) for _ in range(2)]
                stats_url = f"http://127.0.0.1:{port}/admin/stats"
                admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
                while True:
                    async with session.get(stats_url, headers=admin) as resp:
                        if (await resp.json())["providers"]["up"]["waiting"] == 2:
                            break
                    await asyncio.sleep(0.01)
                proc.terminate()
                results = await asyncio.gather(running, *waiting)
            assert await proc.wait() == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        assert upstream.server is not None
        upstream.server.close()
    status, first = results[0]
    assert status == 200 and b"a" in first
    assert json.loads(first.split(b"data: ")[-1])["error"]["message"]
    for status, answer_body in results[1:]:
        assert status == 503, answer_body
        assert json.loads(answer_body)["error"]["message"]
    assert upstream.peak == 1
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT status FROM usage").fetchall()
    assert sorted(status for (status,) in rows) == [503, 503, 503]


# --- The watchdog and the gate together ----------------------------------------------------------


async def test_a_wait_for_a_connection_slot_is_not_counted_as_upstream_silence(
    build: Build,
) -> None:
    # first_byte_timeout bounds the upstream's silence, not the wait for one of
    # max_connections: a stream that waited 0.4 s for its slot and then gets its first event
    # at once is served, not a 504.
    release = asyncio.Event()
    calls = 0

    async def answer(request: bytes, writer: asyncio.StreamWriter) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            await first_chunk_then(writer, release)
        else:
            writer.write(HEAD + chunked(STREAM) + TERMINATOR)
            await writer.drain()

    rig = await build(
        answer, max_connections=1, pool_timeout=NEVER_HANG, first_byte_timeout=0.1, read_timeout=5
    )
    async with asyncio.timeout(NEVER_HANG):
        first = await rig.gateway.post("/v1/chat/completions", json=BODY, headers=auth(rig))
        assert first.status == 200
        second = asyncio.ensure_future(rig.call(stream=True))
        while not (await upstream_stats(rig))["waiting"]:  # noqa: ASYNC110 (a counter)
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.4)  # four first-byte timeouts spent waiting for the slot
        release.set()
        assert (await first.read()).endswith(b"data: [DONE]\n\n")
        status, body = await second
        assert (status, body) == (200, READ)
        now = await settled(rig)
    assert now["stream_timeouts"] == 0 and now["waited"] == 1


@pytest.mark.parametrize("hang_up_after", [0, 1, 2, 3, 4])
async def test_a_client_hanging_up_at_any_point_of_a_stream_frees_everything(
    build: Build, monkeypatch: pytest.MonkeyPatch, hang_up_after: int
) -> None:
    # The upstream answers in steps (its head and first event, the second event and the
    # finish, the usage and [DONE], the body's end), each when the test says; the client
    # hangs up before its answer (0) or after `hang_up_after` steps reached it. With
    # max_connections = 1 every slot must come back, and the next request be served, with
    # never more than one connection at a time.
    monkeypatch.setattr(_http, "LINGER_SECONDS", NEVER_HANG)
    go = asyncio.Semaphore(0)
    steps = [
        HEAD + chunked(sse(chunk("a"))),
        chunked(sse(chunk("b"), STOP)),
        chunked(sse(USAGE, b"[DONE]")),
        TERMINATOR,
    ]
    first = True

    async def answer(request: bytes, writer: asyncio.StreamWriter) -> None:
        nonlocal first
        if not first:
            writer.write(HEAD + chunked(STREAM) + TERMINATOR)
            await writer.drain()
            return
        first = False
        for n, data in enumerate(steps):
            if n:
                await go.acquire()
            writer.write(data)
            await writer.drain()

    rig = await build(answer, max_connections=1, pool_timeout=NEVER_HANG)
    url = rig.gateway.make_url("/v1/chat/completions")
    async with asyncio.timeout(NEVER_HANG):
        async with aiohttp.ClientSession() as session:
            if hang_up_after == 0:  # gone once the upstream has the request
                _, writer = await asyncio.open_connection(rig.gateway.host, rig.gateway.port)
                body = json.dumps(BODY).encode()
                writer.write(
                    b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\n"
                    b"Authorization: Bearer %b\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\n\r\n%b" % (rig.key.encode(), len(body), body)
                )
                while not rig.upstream.requests:  # noqa: ASYNC110 (the upstream's record)
                    await asyncio.sleep(0.001)
                writer.close()
                await writer.wait_closed()
            else:
                resp = await session.post(url, json=BODY, headers=auth(rig))
                assert b'"a"' in await resp.content.readuntil(b"\n\n")
                for _ in range(hang_up_after - 1):
                    go.release()
                    await resp.content.readuntil(b"\n\n")
                resp.close()
        for _ in steps:
            go.release()
        status, body = await rig.call(stream=True)
        assert (status, body) == (200, READ)
        now = await settled(rig)
    assert peers(rig).peak == 1
    assert now["pool_timeouts"] == 0
    rows = await rows_of(rig, 2)
    # a hang-up is 499 (its tokens estimated until the usage came); all read is a 200
    assert [r["status"] for r in rows] == [499 if hang_up_after < 4 else 200, 200]


async def test_a_full_pool_is_not_a_failure_of_the_upstream_account(build: Build) -> None:
    # max_connections is the gateway's own bound, not the upstream failing: requests refused
    # for a full pool (503 upstream_pool_full) must not open the account's breaker, or a
    # burst past max_connections would take a healthy provider out of rotation for its
    # cooldown, refusing requests when its connections are free again.
    release = asyncio.Event()

    async def answer(request: bytes, writer: asyncio.StreamWriter) -> None:
        await first_chunk_then(writer, release)

    routing = RoutingSettings(max_attempts=1, failure_threshold=2, cooldown=NEVER_HANG)
    rig = await build(answer, routing, max_connections=1, pool_timeout=0.05)
    async with asyncio.timeout(NEVER_HANG):
        held = await rig.gateway.post("/v1/chat/completions", json=BODY, headers=auth(rig))
        assert held.status == 200
        for _ in range(3):
            status, body = await rig.call(stream=True)
            assert status == 503
            assert json.loads(body)["error"]["code"] == "upstream_pool_full"
        release.set()
        assert (await held.read()).endswith(b"data: [DONE]\n\n")
        await settled(rig)
        status, body = await rig.call(stream=True)  # a connection is free: served
        assert (status, body) == (200, READ), body


async def test_a_full_pool_does_not_take_a_healthy_provider_out_of_rotation(
    aiohttp_client: AiohttpClient, make_settings: MakeSettings
) -> None:
    # Two routes: "up" (max_connections = 1) first, "other" behind it. While up's one
    # connection is busy, requests find its pool full and are answered by other, as they
    # should; once it is free again, up must serve again: its pool being full was the
    # gateway's own bound, not up failing, and must not open up's breaker for its cooldown.
    release = asyncio.Event()

    async def held(request: bytes, writer: asyncio.StreamWriter) -> None:
        await first_chunk_then(writer, release, "up")

    async def other_answer(request: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(HEAD + chunked(sse(chunk("other"), STOP, USAGE, b"[DONE]")) + TERMINATOR)
        await writer.drain()

    up, other = PeerUpstream(held), PeerUpstream(other_answer)
    providers = []
    for name, upstream, more in (
        ("up", up, {"max_connections": 1, "pool_timeout": 0.05}),
        ("other", other, {}),
    ):
        await upstream.start()
        base = f"http://127.0.0.1:{upstream.port}/v1"
        providers.append(
            provider_config("openai", name=name, base_url=base, api_keys=(UPSTREAM_KEY,), **more)
        )
    model = ModelConfig(
        name="m",
        targets=(
            Target(provider="up", model="m-1", priority=0),
            Target(provider="other", model="m-1", priority=1),
        ),
    )
    routing = RoutingSettings(
        max_attempts=2, failure_threshold=2, cooldown=NEVER_HANG, backoff_initial=0
    )
    settings = make_settings(providers=tuple(providers), models=(model,), routing=routing)
    gateway = await start_gateway(aiohttp_client, settings)
    headers = {"Authorization": f"Bearer {await create_key(gateway)}"}

    async def call() -> bytes:
        async with gateway.post("/v1/chat/completions", json=BODY, headers=headers) as resp:
            assert resp.status == 200
            return await resp.read()

    try:
        async with asyncio.timeout(NEVER_HANG):
            first = await gateway.post("/v1/chat/completions", json=BODY, headers=headers)
            assert first.status == 200
            for _ in range(3):  # up's pool is full: other answers
                assert b'"other"' in await call()
            release.set()
            assert (await first.read()).endswith(b"data: [DONE]\n\n")
            assert b'"up"' in await call()  # up's connection is free again
    finally:
        for upstream in (up, other):
            assert upstream.server is not None
            upstream.server.close()


async def test_a_flood_after_done_is_not_held_in_memory_while_the_connection_lingers(
    build: Build, monkeypatch: pytest.MonkeyPatch
) -> None:
    # [DONE], then 32 MiB more of the body, never ended: the client has its stream at once,
    # nothing reads the rest, so the gateway must stop reading it (flow control) rather than
    # hold it, until the linger closes the connection and frees its slot.
    monkeypatch.setattr(_http, "LINGER_SECONDS", 0.3)
    flooding = asyncio.Event()
    junk = chunked(b"x" * MiB)

    async def answer(request: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(HEAD + chunked(STREAM))
        await writer.drain()
        flooding.set()
        for _ in range(32):
            writer.write(junk)
            await writer.drain()

    rig = await build(answer, max_connections=1, pool_timeout=NEVER_HANG)
    tracemalloc.start()
    try:
        async with asyncio.timeout(NEVER_HANG):
            status, body = await rig.call(stream=True)
            assert (status, body) == (200, READ)
            await flooding.wait()
            tracemalloc.reset_peak()
            await settled(rig)  # the linger closed it
            peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 12 * MiB, f"{peak / MiB:.1f} MiB"
    status, body = await rig.call(stream=True)
    assert status == 200


@pytest.mark.parametrize("include_usage", [True, False])
async def test_a_whole_stream_in_one_read_reaches_the_sdk_as_it_asked(
    build: Build, include_usage: bool
) -> None:
    # The chunks, the finish, the usage chunk and [DONE] in one read (passed through as the
    # upstream's bytes, the usage chunk cut out when the client did not ask for it).
    rig = await build(upstream_chunks(sse(chunk("a"), chunk("b"), STOP, USAGE, b"[DONE]")))
    async with asyncio.timeout(NEVER_HANG), openai_client(rig.gateway, rig.key) as client:
        stream = await client.chat.completions.create(
            model="m",
            messages=HI,
            stream=True,
            stream_options={"include_usage": include_usage},
        )
        chunks = [c async for c in stream]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "ab"
    assert [c.usage.total_tokens for c in chunks if c.usage] == ([5] if include_usage else [])
    rows = await rows_of(rig, 1)
    assert [(r["status"], r["total_tokens"]) for r in rows] == [(200, 5)]


async def test_a_database_locked_for_a_moment_at_shutdown_loses_no_usage_row(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The usage rows wait in the queue (batched off the request path) when SIGTERM comes,
    # while another process (the CLI, a backup) holds the database's write lock for a
    # moment. The server's last flush must still write them: exit 0, every row there, and
    # the refused requests' counts too.
    async def answer(request: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(HEAD + chunked(STREAM) + TERMINATOR)
        await writer.drain()

    upstream = PeerUpstream(answer)
    await upstream.start()
    port = free_port()
    config, db = serve_config(
        tmp_path,
        upstream,
        "usage_flush_seconds = 3600\nusage_batch_size = 1000\nshutdown_grace_seconds = 0\n",
    )
    secret = await cli_key(db, capsys)
    proc = await start_serve(config, port, stdout=subprocess.DEVNULL)
    lock = sqlite3.connect(db, timeout=NEVER_HANG, isolation_level=None)
    try:
        async with asyncio.timeout(NEVER_HANG):
            assert proc.stderr is not None
            assert b"listening" in await proc.stderr.readline()
            url = f"http://127.0.0.1:{port}/v1/chat/completions"
            headers = {"Authorization": f"Bearer {secret}"}
            body = {"model": "up/x", "messages": HI, "stream": True}
            async with aiohttp.ClientSession() as session:
                for _ in range(3):
                    async with session.post(url, json=body, headers=headers) as resp:
                        assert resp.status == 200
                        await resp.read()
                for _ in range(2):  # refused: counted, not a row each
                    refused = {**body, "model": "nope"}
                    async with session.post(url, json=refused, headers=headers) as resp:
                        assert resp.status == 404
            lock.execute("BEGIN IMMEDIATE")  # another process writes, for a second
            proc.terminate()
            await asyncio.sleep(1.0)
            lock.execute("ROLLBACK")
            code = await proc.wait()
            err = await proc.stderr.read()
    finally:
        lock.close()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        assert upstream.server is not None
        upstream.server.close()
    assert code == 0, err
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT COUNT(*) FROM usage").fetchone() == (3,)
        assert conn.execute("SELECT SUM(count) FROM refusals").fetchone() == (2,)


@pytest.mark.parametrize("seed", range(4))
async def test_chunks_with_extensions_and_trailers_split_anywhere_arrive_whole_and_reuse(
    build: Build, seed: int
) -> None:
    # Valid HTTP/1.1 an upstream may send: chunk extensions, a trailer after the last chunk,
    # events cut across chunks, every write cut at random places. The client gets the
    # stream whole, and the connection goes back to the pool (one for all the streams).
    rng = random.Random(seed)
    events = sse(chunk("é€😀".encode()), chunk("two"), STOP, USAGE, b"[DONE]")
    cuts = sorted(rng.sample(range(1, len(events)), 4))
    pieces = [events[a:b] for a, b in zip([0, *cuts], [*cuts, len(events)], strict=True)]
    data = HEAD + b"".join(
        b"%x;ext=%d\r\n%b\r\n" % (len(piece), n, piece) for n, piece in enumerate(pieces)
    )
    data += b"0\r\nX-Trailer: done\r\n\r\n"

    async def answer(request: bytes, writer: asyncio.StreamWriter) -> None:
        at = 0
        for cut in [*sorted(rng.sample(range(1, len(data)), 8)), len(data)]:
            writer.write(data[at:cut])
            await writer.drain()
            await asyncio.sleep(0)
            at = cut

    rig = await build(answer)
    async with asyncio.timeout(NEVER_HANG):
        for _ in range(3):
            chunks = await rig.sdk(stream=True)
            assert "".join(c.choices[0].delta.content or "" for c in chunks) == "é€😀two"
        await settled(rig)
    assert peers(rig).accepted == 1
    rows = await rows_of(rig, 3)
    assert [(r["status"], r["completion_tokens"]) for r in rows] == [(200, 2)] * 3


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/messages"])
async def test_an_anthropic_stream_s_connection_reset_while_lingering_frees_its_slot(
    build: Build, monkeypatch: pytest.MonkeyPatch, path: str
) -> None:
    # Anthropic's streams end at message_stop (`_http.done()`), translated or passed
    # through: a connection reset after it, before its body's end, frees its slot at once.
    monkeypatch.setattr(_http, "LINGER_SECONDS", NEVER_HANG)
    *events, stop = message_events()
    served = asyncio.Event()
    dead = asyncio.Event()

    async def answer(request: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(HEAD + chunked(b"".join(events)) + chunked(stop))
        await writer.drain()
        await served.wait()
        writer.transport.abort()
        dead.set()

    rig = await build(answer, kind="anthropic", max_connections=1, pool_timeout=0.5)
    body: dict[str, object] = {"model": "m", "messages": HI, "stream": True, "max_tokens": 50}
    async with asyncio.timeout(NEVER_HANG):
        status, data = await rig.post(path, body)
        assert status == 200, data
        assert (await upstream_stats(rig))["in_use"] == 1  # lingering
        served.set()
        await dead.wait()
        async with asyncio.timeout(0.5):  # far less than the linger
            await settled(rig)
    rows = await rows_of(rig, 1)
    assert [r["status"] for r in rows] == [200]


async def test_requests_refused_for_a_full_pool_each_have_their_row_and_count(
    build: Build,
) -> None:
    # 10 streams at once, max_connections = 2 held by the upstream past pool_timeout: 2 are
    # served, 8 refused with a 503 upstream_pool_full, each with its usage row, all counted.
    release = asyncio.Event()
    opened = 0

    async def answer(request: bytes, writer: asyncio.StreamWriter) -> None:
        nonlocal opened
        opened += 1
        await first_chunk_then(writer, release)

    rig = await build(answer, max_connections=2, pool_timeout=0.1)
    url = rig.gateway.make_url("/v1/chat/completions")
    async with asyncio.timeout(NEVER_HANG):
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

            async def one() -> tuple[int, bytes]:
                async with session.post(url, json=BODY, headers=auth(rig)) as resp:
                    if resp.status == 200:
                        await resp.content.readuntil(b"\n\n")
                        await refused.wait()
                        release.set()
                    return resp.status, await resp.read()

            refused = asyncio.Event()
            calls = [asyncio.ensure_future(one()) for _ in range(10)]
            while (await upstream_stats(rig))["pool_timeouts"] < 8:  # noqa: ASYNC110 (a counter)
                await asyncio.sleep(0.01)
            refused.set()
            results = await asyncio.gather(*calls)
        now = await settled(rig)
    assert sorted(status for status, _ in results) == [200] * 2 + [503] * 8
    for status, body in results:
        if status == 503:
            assert json.loads(body)["error"]["code"] == "upstream_pool_full"
        else:
            assert body.endswith(b"data: [DONE]\n\n")
    assert (now["waited"], now["pool_timeouts"]) == (8, 8)
    assert opened == 2 and peers(rig).peak == 2
    rows = await rows_of(rig, 10)
    assert sorted(r["status"] for r in rows) == [200] * 2 + [503] * 8


@pytest.mark.parametrize("gap", [0.15, 0.6])
async def test_a_trickle_around_read_timeout_lives_or_ends_within_a_period_of_it(
    build: Build, gap: float
) -> None:
    # Events 0.15 s apart with read_timeout = 0.3 s: the stream lives, however long. One gap
    # of 0.6 s after two events: an error event ends it, within a watchdog period of the
    # limit, counted as a stream timeout, and its slot comes back.
    async def answer(request: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(HEAD)
        for n in range(6):
            writer.write(chunked(sse(chunk(str(n)))))
            await writer.drain()
            await asyncio.sleep(gap if n == 1 else 0.15)
        writer.write(chunked(sse(STOP, USAGE, b"[DONE]")) + TERMINATOR)
        await writer.drain()

    rig = await build(answer, max_connections=1, first_byte_timeout=0.3, read_timeout=0.3)
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(NEVER_HANG):
        resp = await rig.gateway.post("/v1/chat/completions", json=BODY, headers=auth(rig))
        assert resp.status == 200
        events = []
        while event := await resp.content.readuntil(b"\n\n"):
            events.append((loop.time(), event))
            if event.startswith(b"data: [DONE]") or b'"error"' in event:
                break
        now = await settled(rig)
    if gap < 0.3:
        assert events[-1][1] == b"data: [DONE]\n\n" and len(events) == 8
        assert now["stream_timeouts"] == 0
    else:
        assert b'"error"' in events[-1][1] and len(events) == 3
        silence = events[-1][0] - events[-2][0]
        assert 0.3 <= silence < 0.3 + rig_period(0.3) + 0.3, silence  # (a loaded machine)
        assert now["stream_timeouts"] == 1
    rows = await rows_of(rig, 1)
    assert [r["status"] for r in rows] == ([200] if gap < 0.3 else [504])


def rig_period(timeout: float) -> float:
    """The watchdog's period for a provider whose timeouts are both `timeout`."""
    return min(1.0, timeout / 4)


@pytest.mark.parametrize(
    "options", [None, {}, {"include_usage": None}, "yes", [], {"include_usage": "no"}]
)
async def test_odd_stream_options_get_a_stream_or_a_400_never_a_500(
    build: Build, options: Any
) -> None:
    rig = await build(upstream_chunks(STREAM))
    async with asyncio.timeout(NEVER_HANG):
        status, body = await rig.post("/v1/chat/completions", {**BODY, "stream_options": options})
    if status == 200:
        assert body == READ
        rows = await rows_of(rig, 1)
        assert [(r["status"], r["total_tokens"]) for r in rows] == [(200, 5)]
    else:
        assert status == 400, body
        assert json.loads(body)["error"]["type"] == "invalid_request_error"


async def test_hang_ups_at_random_moments_of_the_wait_never_wedge_the_gate(
    build: Build,
) -> None:
    # 150 streams against max_connections = 2, each upstream answer taking a few loop turns;
    # half the clients hang up at a random moment (waiting for a slot, or after it). Then
    # every slot is back, nobody waits, and a last request is served at once.
    rng = random.Random(7)

    async def answer(request: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(HEAD + chunked(sse(chunk("a"))))
        await writer.drain()
        for _ in range(rng.randrange(5)):
            await asyncio.sleep(0)
        writer.write(chunked(sse(STOP, USAGE, b"[DONE]")) + TERMINATOR)
        await writer.drain()

    rig = await build(answer, max_connections=2, pool_timeout=NEVER_HANG)
    url = rig.gateway.make_url("/v1/chat/completions")

    async def one(session: aiohttp.ClientSession, patience: float | None) -> bool:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(patience):
                async with session.post(url, json=BODY, headers=auth(rig)) as resp:
                    assert resp.status == 200
                    assert (await resp.read()).endswith(b"data: [DONE]\n\n")
                    return True
        return False

    async with asyncio.timeout(NEVER_HANG):
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            served = await asyncio.gather(
                *[one(session, rng.uniform(0, 0.05) if n % 2 else None) for n in range(150)]
            )
        now = await settled(rig)
        async with asyncio.timeout(0.5):
            status, body = await rig.call(stream=True)
        assert (status, body) == (200, READ)
        # (a client gone before its request was read made none: no row)
        rows = await rows_of(rig, served.count(True) + 1)
    assert peers(rig).peak <= 2
    assert now["pool_timeouts"] == 0
    assert served.count(True) >= 75
    assert len(rows) <= 151 and sum(r["status"] == 200 for r in rows) >= served.count(True) + 1
    assert {r["status"] for r in rows} <= {200, 499}
