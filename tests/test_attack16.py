"""Issue 13's work (speed under real LLM load) attacked from outside: the connection gate and
a stream's lingering connection, the watchdog, pass-through streams and the batched usage rows,
against a raw upstream that misbehaves on the wire, hostile clients and the `openai` SDK."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiohttp.pytest_plugin import AiohttpClient

from gateway.providers import _http
from gateway.settings import ModelConfig, Target
from tests.conftest import (
    NEVER_HANG,
    MakeSettings,
    create_key,
    provider_config,
    start_gateway,
    usage_rows,
)
from tests.test_attack_upstream import HI, UPSTREAM_KEY, Answer, RawUpstream, Rig, chunk, http, sse

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
STREAM = sse(chunk("a"), STOP, USAGE, b"[DONE]")


def chunked(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)


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


Build = Callable[..., Awaitable[Rig]]


@pytest.fixture
async def build(aiohttp_client: AiohttpClient, make_settings: MakeSettings) -> AsyncIterator[Build]:
    servers: list[asyncio.Server] = []

    async def make(answer: Answer, **more: Any) -> Rig:
        upstream = PeerUpstream(answer)
        await upstream.start()
        assert upstream.server is not None
        servers.append(upstream.server)
        provider = provider_config(
            "openai",
            name="up",
            base_url=f"http://127.0.0.1:{upstream.port}/v1",
            api_keys=(UPSTREAM_KEY,),
            **more,
        )
        model = ModelConfig(name="m", targets=(Target(provider="up", model="m-1"),))
        gateway = await start_gateway(
            aiohttp_client,
            make_settings(providers=(provider,), models=(model,), admin_key=ADMIN_KEY),
        )
        return Rig(gateway, await create_key(gateway), "openai", upstream)

    yield make
    for server in servers:
        server.close()


def peers(rig: Rig) -> PeerUpstream:
    assert isinstance(rig.upstream, PeerUpstream)
    return rig.upstream


async def stats(rig: Rig) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    async with rig.gateway.get("/admin/stats", headers=headers) as resp:
        assert resp.status == 200
        found: dict[str, Any] = (await resp.json())["providers"]["up"]
        return found


async def settled(rig: Rig) -> dict[str, Any]:
    """The provider's stats once no slot is in use or waited for (the test's timeout bounds
    the wait: a leaked slot hangs here)."""
    while True:
        now = await stats(rig)
        if now["in_use"] == 0 and now["waiting"] == 0:
            return now
        await asyncio.sleep(0.01)


async def rows_of(rig: Rig, count: int) -> list[dict[str, Any]]:
    from gateway.state import USAGE_KEY
    from tests.conftest import app_of

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
        writer.write(HEAD + chunked(sse(chunk("a"), STOP, USAGE)) + chunked(sse(b"[DONE]")))
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
        assert (status, body) == (200, sse(chunk("a"), STOP, b"[DONE]"))
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
