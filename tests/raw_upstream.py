"""Upstreams as raw TCP servers, for the tests of what a request is charged.

Each takes a request (its head, and its body by Content-Length), records its path and JSON
body, writes the bytes a real provider would and then holds the connection until the gateway
closes it (what it would have sent next, its usage, never goes out, as a real upstream's does
not once its client is gone), or closes it itself (`hold=False`: a stream that ends, or
breaks). `seen` is set when the request arrived and `closed` when the connection ended, so a
test waits on events, never on time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import Iterator
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from gateway.state import GATE_KEY, KEYS_KEY, USAGE_KEY
from tests.conftest import NEVER_HANG, app_of, usage_rows

__all__ = [
    "STREAM_HEAD",
    "Blackhole",
    "RawUpstream",
    "auth",
    "blackhole",
    "charged",
    "cut_after",
    "read_request",
    "sse",
]

# A 200 whose body ends when the connection closes.
STREAM_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n"


def sse(payload: Any, name: str | None = None) -> bytes:
    """One SSE event of `payload` as JSON, with its `event:` line when named."""
    line = b"data: " + json.dumps(payload).encode() + b"\n\n"
    return b"event: " + name.encode() + b"\n" + line if name else line


async def read_request(reader: asyncio.StreamReader) -> tuple[str, bytes]:
    """A request's path and body (read by its Content-Length)."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    length = 0
    for line in lines:
        name, _, value = line.partition(":")
        if name.lower() == "content-length":
            length = int(value)
    return lines[0].split(" ")[1], await reader.readexactly(length)


class RawUpstream:
    """Writes `reply` to each request, then holds the connection until the gateway closes it
    (`hold=False`: closes it at once)."""

    def __init__(self, reply: bytes, *, hold: bool = True) -> None:
        self.reply = reply
        self.hold = hold
        self.paths: list[str] = []
        self.bodies: list[dict[str, Any]] = []
        self.seen = asyncio.Event()
        self.closed = asyncio.Event()
        self.port = 0
        self.server: asyncio.Server | None = None

    @property
    def requests(self) -> list[dict[str, Any]]:
        return self.bodies

    async def start(self) -> asyncio.Server:
        """Listen on a free port of 127.0.0.1 (`port`); the server, for the test to close."""
        self.server = await asyncio.start_server(self.serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self.server

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            path, body = await read_request(reader)
            self.paths.append(path)
            self.bodies.append(json.loads(body) if body else {})
            self.seen.set()
            writer.write(self.reply)
            await writer.drain()
            if self.hold:
                await reader.read()  # until the gateway closes the connection
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.closed.set()
            writer.close()


def auth(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


async def cut_after(
    gw: TestClient[Any, Any], secret: str, path: str, body: dict[str, Any], marker: bytes
) -> bytes:
    """Stream `body`, read until `marker` arrived, then hang up; what was read."""
    got = b""
    async with asyncio.timeout(NEVER_HANG):
        resp = await gw.post(path, json=body, headers=auth(secret))
        assert resp.status == 200, await resp.text()
        while marker not in got:
            piece = await resp.content.readany()
            assert piece, got
            got += piece
        resp.close()
    return got


async def charged(gw: TestClient[Any, Any], secret: str) -> tuple[dict[str, Any], int]:
    """The one usage row (once written) and the tokens the key's budget counts as spent."""
    app = app_of(gw)
    async with asyncio.timeout(NEVER_HANG):
        await app[USAGE_KEY].wait_recorded(1)
    (row,) = await usage_rows(gw)
    record = app[KEYS_KEY].lookup(secret)
    assert record is not None
    spend = await app[GATE_KEY].spending(record)
    assert spend is not None
    return row, spend.tokens


class Blackhole:
    """A port whose connections never open: a listening socket with its backlog full, so the
    kernel drops further SYNs (the connect hangs, as to a firewalled host)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(0)
        self.port = self.sock.getsockname()[1]
        self.fill: list[socket.socket] = []
        for _ in range(3):
            c = socket.socket()
            c.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                c.connect(("127.0.0.1", self.port))
            self.fill.append(c)

    def close(self) -> None:
        for c in self.fill:
            c.close()
        self.sock.close()


@pytest.fixture
def blackhole() -> Iterator[Blackhole]:
    hole = Blackhole()
    yield hole
    hole.close()
