"""Bytes an upstream sends on a keep-alive connection while it sits idle in the pool.

An answer read whole sends its connection back to the pool. Whatever the upstream (buggy or
hostile) writes on it after that was asked for by nobody: a second answer, the excess of a
body longer than its Content-Length, a `408` before it hangs up. aiohttp parsed such bytes
into the connection's queue and handed them to the next request that reused the connection,
as its answer, even when that request was another client's: one client's answer (or whatever
the upstream liked) delivered to another. The gateway's connector (`providers._connector`)
closes such a connection at the upstream's first byte (or, for what came in the segment that
ended the answer, instead of reusing it), and the next request gets a new one and its own
answer.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import json

import pytest
from aiohttp.client_proto import ResponseHandler
from aiohttp.connector import BaseConnector
from structlog.testing import capture_logs

from gateway.providers import _connector
from tests.conftest import NEVER_HANG, create_key
from tests.test_attack_upstream import COMPLETION, http, sse, whole
from tests.test_stream_reuse import (
    HEAD,
    STOP,
    TERMINATOR,
    Build,
    build,
    chunk,
    chunked,
    connections,
)

__all__ = ["build"]  # (the fixture, shared with test_stream_reuse)

STALE = b"stale: meant for nobody"

# What the upstream writes on the idle connection.
IDLE_BYTES: dict[str, bytes] = {
    # A second answer, whole: read as the next request's answer.
    "a-whole-answer": whole(COMPLETION % STALE),
    # A stream, whole: the same, for a next request that streams.
    "a-whole-stream": HEAD + chunked(sse(chunk(STALE.decode()), STOP, b"[DONE]")) + TERMINATOR,
    # An answer whose head came and body did not: the next request waited for its body.
    "an-answer-cut-short": http(
        "200 OK", {"Content-Type": "application/json", "Content-Length": "1000"}, b'{"id":'
    ),
    # Half a head: its rest could come once the next request is sent.
    "half-a-head": b"HTTP/1.1 200 OK\r\nContent-Type: appl",
    # A timeout notice before a close (what some servers send on an idle connection).
    "a-408": http("408 Request Timeout", {"Content-Length": "0", "Connection": "close"}),
    # Not HTTP at all.
    "garbage": b"\x00\x01 not http\r\n\r\n",
}


def numbered(request: bytes, writers: list[asyncio.StreamWriter], stream: bool) -> bytes:
    """The answer to request `n` (counting from 1) says `answer n`."""
    text = b"answer %d" % len(writers)
    if stream:
        return HEAD + chunked(sse(chunk(text.decode()), STOP, b"[DONE]")) + TERMINATOR
    return whole(COMPLETION % text)


async def content(status: int, body: bytes, stream: bool) -> str:
    assert status == 200, body
    if not stream:
        return str(json.loads(body)["choices"][0]["message"]["content"])
    events = [json.loads(line[6:]) for line in body.split(b"\n\n") if line[6:7] == b"{"]
    return "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"])


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("idle", list(IDLE_BYTES), ids=list(IDLE_BYTES))
async def test_bytes_sent_on_an_idle_connection_never_reach_the_next_request(
    build: Build, idle: str, stream: bool
) -> None:
    writers: list[asyncio.StreamWriter] = []

    async def answer(request: bytes, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        writer.write(numbered(request, writers, stream))
        await writer.drain()

    rig = await build(answer)
    other = dataclasses.replace(rig, key=await create_key(rig.gateway, name="other"))
    async with asyncio.timeout(NEVER_HANG):
        assert await content(*await rig.call(stream=stream), stream) == "answer 1"
        # The gateway has read the first answer whole and answered: its connection is idle in
        # the pool. The upstream writes on it: the gateway closes it.
        with capture_logs() as logs:
            writers[0].write(IDLE_BYTES[idle])
            await writers[0].drain()
            await connections(rig)[0].wait()
            status, body = await other.call(stream=stream)
    assert STALE not in body
    assert await content(status, body, stream) == "answer 2"
    assert len(rig.upstream.requests) == 2
    assert writers[1] is not writers[0]  # from a new connection
    closed = [line for line in logs if line["event"] == "upstream_idle_bytes"]
    assert len(closed) == 1


async def test_excess_bytes_that_come_with_the_answer_never_reach_the_next_request(
    build: Build,
) -> None:
    # The same, the excess in the same write as the answer: aiohttp's own check, at release.
    writers: list[asyncio.StreamWriter] = []

    async def answer(request: bytes, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        excess = whole(COMPLETION % STALE) if len(writers) == 1 else b""
        writer.write(numbered(request, writers, False) + excess)
        await writer.drain()

    rig = await build(answer)
    async with asyncio.timeout(NEVER_HANG):
        assert await content(*await rig.call(stream=False), False) == "answer 1"
        assert await content(*await rig.call(stream=False), False) == "answer 2"
    assert writers[0] is not writers[1]


async def test_a_quiet_idle_connection_is_still_reused(build: Build) -> None:
    # The check costs a healthy upstream nothing: its connection serves request after request.
    writers: list[asyncio.StreamWriter] = []

    async def answer(request: bytes, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        writer.write(numbered(request, writers, False))
        await writer.drain()

    rig = await build(answer)
    async with asyncio.timeout(NEVER_HANG):
        for n in range(1, 4):
            assert await content(*await rig.call(stream=False), False) == f"answer {n}"
    assert len(set(map(id, writers))) == 1


def terms(test: property) -> list[str]:
    """The terms of a property's `or`ed test, one a line."""
    assert test.fget is not None
    lines = [line.strip() for line in inspect.getsource(test.fget).splitlines()]
    return [line for line in lines if line.startswith(("self._", "or ")) and "=" not in line]


async def test_the_connector_hook_matches_the_installed_aiohttp() -> None:
    # The check replaces a private factory of aiohttp's connector and reads a private queue:
    # if an aiohttp release changes either, this fails loudly rather than the gap reopening.
    connector = _connector.upstream_connector()
    try:
        assert connector.fresh, "aiohttp's connector changed: see gateway/providers/_connector"
        protocol = connector._factory()
        assert isinstance(protocol, ResponseHandler)
        assert protocol.is_connected() is False  # (no transport yet)
        test = "return self.transport is not None and not self.transport.is_closing()\n"
        assert inspect.getsource(ResponseHandler.is_connected).endswith(test), (
            "aiohttp's ResponseHandler.is_connected changed: _Connection adds to its test"
        )
        # _Connection.should_close adds to aiohttp's test, which aiohttp asks only of a
        # connection it is about to put in the pool (and its protocol closes a connection whose
        # parser raises, as _Idle does).
        assert "self._tail" in terms(ResponseHandler.should_close)[-1]
        release = inspect.getsource(BaseConnector._release)
        assert "if self._force_close or should_close or protocol.should_close:" in release
        received = inspect.getsource(ResponseHandler.data_received)
        assert "self._parser.feed_data(data)" in received
        assert "self.transport.close()" in received
    finally:
        await connector.close()
