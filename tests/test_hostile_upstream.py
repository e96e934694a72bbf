"""Upstreams that misbehave on purpose: redirects, bombs and endless events, for every
provider type. The gateway never follows a redirect, never buffers past its limits, and
tells the client what went wrong without relaying what the upstream said."""

from __future__ import annotations

import asyncio
import struct
import tracemalloc
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web
from aiohttp.pytest_plugin import AiohttpClient, AiohttpServer
from aiohttp.test_utils import TestClient

from gateway.settings import ModelConfig, Target
from tests.conftest import MakeSettings, create_key, provider_config, start_gateway

MiB = 1024 * 1024
# Provider type ("responses": an openai one that serves the Responses API) -> base URL path.
KINDS = {
    "openai": "/v1",
    "responses": "/v1",
    "anthropic": "",
    "gemini": "",
    "azure": "",
}


def _gzip_bomb(megabytes: int) -> bytes:
    """A gzip member holding `megabytes` MiB of zeros. Each MiB is deflated once, with a full
    flush: that resets the compressor, so every MiB after it deflates to the same bytes,
    repeated here (deflating the whole GiB took seconds at every import of this module)."""
    zeros = bytes(MiB)
    squeeze = zlib.compressobj(9, zlib.DEFLATED, -15)  # raw deflate: the gzip frame is ours
    block = squeeze.compress(zeros) + squeeze.flush(zlib.Z_FULL_FLUSH)
    crc = 0
    for _ in range(megabytes):
        crc = zlib.crc32(zeros, crc)
    head = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff"  # gzip, deflate, no name/time
    size = megabytes * MiB & 0xFFFFFFFF
    return head + block * megabytes + squeeze.flush() + struct.pack("<II", crc, size)


BOMB = _gzip_bomb(1024)  # about 1 MB that inflates to 1 GiB


@dataclass
class Listener:
    """A TCP listener that counts the connections it receives (it must receive none)."""

    connections: int = 0
    server: asyncio.Server | None = None
    port: int = 0

    async def start(self) -> None:
        async def accept(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections += 1
            writer.close()

        self.server = await asyncio.start_server(accept, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]


@dataclass
class Upstream:
    """A hostile upstream: every request gets `reply`; what it saw is recorded."""

    reply: Callable[[web.Request], Awaitable[web.StreamResponse]]
    request_ids: list[str | None] = field(default_factory=list)
    write_failed: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.request_ids.append(request.headers.get("x-request-id"))
        await request.read()
        try:
            return await self.reply(request)
        except (ConnectionError, asyncio.CancelledError):
            self.write_failed.set()  # the gateway dropped the connection
            raise


@dataclass
class Rig:
    gateway: TestClient[Any, Any]
    key: str
    kind: str

    async def call(self, *, stream: bool) -> Any:
        if self.kind == "responses":
            path, body = "/v1/responses", {"model": "m", "input": "hi", "stream": stream}
        else:
            messages = [{"role": "user", "content": "hi"}]
            path, body = "/v1/chat/completions", {"model": "m", "messages": messages}
            body["stream"] = stream
        headers = {"Authorization": f"Bearer {self.key}"}
        return await self.gateway.post(path, json=body, headers=headers)


Build = Callable[..., Awaitable[Rig]]


@pytest.fixture
def build(
    aiohttp_server: AiohttpServer, aiohttp_client: AiohttpClient, make_settings: MakeSettings
) -> Build:
    async def make(kind: str, upstream: Upstream, **limits: Any) -> Rig:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", upstream.handle)
        server = await aiohttp_server(app)
        base = str(server.make_url(KINDS[kind])).rstrip("/")
        if kind == "responses":
            kind, limits = "openai", {**limits, "responses_api": True}
        if kind == "azure":
            limits = {**limits, "api_version": "2024-10-21"}
        provider = provider_config(
            kind, name="up", base_url=base, api_keys=("sk-upstream",), **limits
        )
        model = ModelConfig(name="m", targets=(Target(provider="up", model="m-1"),))
        gateway = await start_gateway(
            aiohttp_client, make_settings(providers=(provider,), models=(model,))
        )
        return Rig(gateway, await create_key(gateway), kind)

    return make


@pytest.fixture
async def listener() -> AsyncIterator[Listener]:
    found = Listener()
    await found.start()
    yield found
    assert found.server is not None
    found.server.close()
    await found.server.wait_closed()


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
async def test_redirects_are_never_followed(
    build: Build, listener: Listener, kind: str, stream: bool, status: int
) -> None:
    target = f"http://127.0.0.1:{listener.port}/v1/steal"

    async def redirect(request: web.Request) -> web.StreamResponse:
        return web.Response(status=status, headers={"Location": target}, text="moved")

    upstream = Upstream(redirect)
    rig = await build(kind, upstream)
    resp = await rig.call(stream=stream)
    assert resp.status == 502
    error = (await resp.json())["error"]
    assert f"HTTP {status}" in error["message"]
    assert error["code"] == "upstream_bad_response"
    text = str(error) + str(dict(resp.headers))
    assert str(listener.port) not in text and "steal" not in text
    assert "Location" not in resp.headers
    assert listener.connections == 0
    # Every upstream request carries the gateway's request id.
    assert upstream.request_ids == [resp.headers["x-request-id"]]


def _peak_growth(run: Callable[[], Awaitable[Any]]) -> Callable[[], Awaitable[tuple[Any, int]]]:
    async def measure() -> tuple[Any, int]:
        tracemalloc.start()
        try:
            base, _ = tracemalloc.get_traced_memory()
            tracemalloc.reset_peak()
            result = await run()
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        return result, peak - base

    return measure


async def _bomb(request: web.Request) -> web.StreamResponse:
    headers = {"Content-Encoding": "gzip", "Content-Type": "application/json"}
    return web.Response(body=BOMB, headers=headers)


async def _sse_bomb(request: web.Request) -> web.StreamResponse:
    headers = {"Content-Encoding": "gzip", "Content-Type": "text/event-stream"}
    return web.Response(body=BOMB, headers=headers)


async def _endless_json(request: web.Request) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "application/json"})
    await resp.prepare(request)
    await resp.write(b'{"id": "' + b"x" * 1000)
    piece = b"x" * 65536
    for _ in range(200 * 16):  # 200 MB, chunked, no length
        await resp.write(piece)
    return resp


async def _declared_huge(request: web.Request) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "application/json"})
    resp.content_length = 200 * MiB
    await resp.prepare(request)
    piece = b" " * 65536
    for _ in range(200 * 16):
        await resp.write(piece)
    return resp


def _endless_event(piece_size: int, first: bytes = b"") -> Callable[..., Any]:
    async def reply(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        if first:
            await resp.write(first)
        await resp.write(b"data: ")
        piece = b"x" * piece_size
        for _ in range(50 * MiB // piece_size):
            await resp.write(piece)
        return resp

    return reply


@pytest.mark.parametrize(
    ("reply", "stream"),
    [
        (_bomb, False),
        (_endless_json, False),
        (_sse_bomb, True),
        (_endless_event(65536), True),
        (_endless_event(1024), True),  # one huge event over many small reads
    ],
    ids=["gzip-bomb", "endless-json", "gzip-sse-bomb", "huge-event", "huge-event-small-reads"],
)
@pytest.mark.parametrize("kind", ["openai", "anthropic", "gemini", "azure"])
async def test_oversized_answers_are_refused_with_bounded_memory(
    build: Build, kind: str, reply: Callable[..., Any], stream: bool
) -> None:
    upstream = Upstream(reply)
    limits = {"max_response_bytes": 4 * MiB, "max_event_bytes": 2 * MiB}
    rig = await build(kind, upstream, **limits)
    resp, growth = await _peak_growth(lambda: rig.call(stream=stream))()
    assert resp.status == 502
    error = (await resp.json())["error"]
    assert error["code"] == "upstream_bad_response"
    setting = "max_event_bytes" if stream else "max_response_bytes"
    assert setting in error["message"]
    assert growth < 40 * MiB, f"the gateway grew by {growth / MiB:.0f} MiB"
    if reply not in (_bomb, _sse_bomb):  # a bomb's 1 MB fits in the socket buffers
        await asyncio.wait_for(upstream.write_failed.wait(), 10)  # the connection was dropped


async def test_a_declared_length_over_the_limit_is_refused_before_reading(build: Build) -> None:
    upstream = Upstream(_declared_huge)  # the default limit: 64 MiB
    rig = await build("openai", upstream)
    resp, growth = await _peak_growth(lambda: rig.call(stream=False))()
    assert resp.status == 502
    assert "max_response_bytes" in (await resp.json())["error"]["message"]
    assert growth < 10 * MiB
    await asyncio.wait_for(upstream.write_failed.wait(), 10)


async def test_a_huge_event_after_the_stream_started_is_an_error_event(build: Build) -> None:
    first = (
        b'data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"m",'
        b'"choices":[{"index":0,"delta":{"role":"assistant","content":"hi"},'
        b'"finish_reason":null}]}\n\n'
    )
    upstream = Upstream(_endless_event(65536, first))
    rig = await build("openai", upstream, max_event_bytes=MiB)
    resp = await rig.call(stream=True)
    assert resp.status == 200
    body = await resp.read()
    assert b'"content":"hi"' in body
    assert b"max_event_bytes" in body and b'"code":"upstream_bad_response"' in body
    assert not body.endswith(b"data: [DONE]\n\n")
    await asyncio.wait_for(upstream.write_failed.wait(), 10)


async def test_error_bodies_are_read_only_in_part(build: Build) -> None:
    async def huge_error(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(status=500, headers={"Content-Type": "application/json"})
        await resp.prepare(request)
        piece = b"x" * 65536
        for _ in range(100 * 16):  # 100 MB of error body
            await resp.write(piece)
        return resp

    upstream = Upstream(huge_error)
    rig = await build("openai", upstream)
    resp, growth = await _peak_growth(lambda: rig.call(stream=False))()
    assert resp.status == 503
    assert growth < 10 * MiB


async def _small_chunked(request: web.Request) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "application/json"})
    await resp.prepare(request)
    await resp.write(b'{"id": "' + b"x" * 6000 + b'"}')  # no length: chunked, in one write
    return resp


async def test_an_answer_that_came_whole_is_still_held_to_the_limit(build: Build) -> None:
    # An answer all here with its head is taken at once (no piece-by-piece read): one over
    # `max_response_bytes` that declared no length is refused all the same.
    upstream = Upstream(_small_chunked)
    rig = await build("openai", upstream, max_response_bytes=4096)
    resp = await rig.call(stream=False)
    assert resp.status == 502
    error = (await resp.json())["error"]
    assert error["code"] == "upstream_bad_response" and "max_response_bytes" in error["message"]
