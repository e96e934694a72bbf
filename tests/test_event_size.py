"""`max_event_bytes` bounds each stream event, not only what is buffered of one.

An event over the limit was refused only while it was unfinished in the decoder's buffer:
one that arrived whole in a single read (aiohttp's `readany()` hands over all it holds, up to
megabytes) was relayed, on the pass-through path as it was, and translated on the others.
Now it is refused however it arrives: a 502 before the stream has started, an error event
after. Each upstream here writes the large event in one write.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

import pytest

from tests.bench_servers import message_events
from tests.conftest import NEVER_HANG, usage_rows
from tests.test_attack_upstream import Answer, Rig, sse
from tests.test_stream_reuse import (
    HEAD,
    STOP,
    TERMINATOR,
    USAGE,
    Build,
    build,
    chunk,
    chunked,
    settled,
)

__all__ = ["build"]  # (the fixture, shared with test_stream_reuse)

LIMIT = 1000
BIG = "x" * 2 * LIMIT  # the text of an event over the limit


def big_event(kind: str) -> bytes:
    """An event of `kind`'s stream, over the limit."""
    if kind == "anthropic":
        delta = {"type": "text_delta", "text": BIG}
        data = {"type": "content_block_delta", "index": 0, "delta": delta}
        return b"event: content_block_delta\ndata: %b\n\n" % json.dumps(data).encode()
    if kind == "gemini":
        parts = {"content": {"role": "model", "parts": [{"text": BIG}]}}
        return sse(json.dumps({"candidates": [parts]}).encode())
    if kind == "responses":
        data = {"type": "response.output_text.delta", "delta": BIG, "output_index": 0}
        return b"event: response.output_text.delta\ndata: %b\n\n" % json.dumps(data).encode()
    return sse(chunk(BIG))


def writes(first: bytes, *rest: bytes, go: asyncio.Event | None = None) -> Answer:
    """An upstream that writes `first`, then (once `go` is set: the client has read what
    `first` gave it) each of `rest`, each an HTTP chunk and a write of its own, then ends the
    body."""

    async def answer(request: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(HEAD + chunked(first))
        await writer.drain()
        if go is not None:
            await go.wait()
        for piece in rest:
            writer.write(chunked(piece))
            await writer.drain()
        writer.write(TERMINATOR)
        await writer.drain()

    return answer


async def started(rig: Rig, go: asyncio.Event, first: bytes) -> tuple[int, bytes]:
    """A streamed chat request whose upstream goes on (`go`) once the client has `first`."""
    path, body = rig.body(stream=True)
    headers = {"Authorization": f"Bearer {rig.key}"}
    async with rig.gateway.post(path, json=body, headers=headers) as resp:
        read = b""
        while read.find(first) < 0:
            piece = await resp.content.readany()
            assert piece, read
            read += piece
        go.set()
        return resp.status, read + await resp.read()


def refused(body: bytes) -> bool:
    return b"max_event_bytes" in body and b'"code":"upstream_bad_response"' in body


@pytest.mark.parametrize("kind", ["openai", "responses", "anthropic", "gemini"])
async def test_a_first_event_over_the_limit_in_one_read_is_a_502(build: Build, kind: str) -> None:
    rest = sse(STOP, USAGE, b"[DONE]") if kind == "openai" else b""
    rig = await build(writes(big_event(kind) + rest), kind, max_event_bytes=LIMIT)
    async with asyncio.timeout(NEVER_HANG):
        status, body = await rig.call(stream=True)
        assert status == 502, body
        assert refused(body)
        await settled(rig)
    assert BIG.encode() not in body


@pytest.mark.parametrize(
    "after",
    [
        # alone in its read: a run that could be relayed as it is
        lambda big: (big, sse(STOP, USAGE, b"[DONE]")),
        # among small events in one read
        lambda big: (sse(chunk("b")) + big + sse(STOP, USAGE, b"[DONE]"),),
    ],
    ids=["alone", "among-others"],
)
async def test_an_event_over_the_limit_in_one_read_later_is_an_error_event(
    build: Build, after: Callable[[bytes], tuple[bytes, ...]]
) -> None:
    go = asyncio.Event()
    upstream = writes(sse(chunk("a")), *after(big_event("openai")), go=go)
    rig = await build(upstream, max_event_bytes=LIMIT)
    async with asyncio.timeout(NEVER_HANG):
        status, body = await started(rig, go, b'"content":"a"')
        await settled(rig)
    assert status == 200
    assert refused(body)
    assert BIG.encode() not in body
    assert not body.endswith(b"data: [DONE]\n\n")
    rows = await usage_rows(rig.gateway)
    assert [row["status"] for row in rows] == [502]


async def test_a_translated_event_over_the_limit_later_is_an_error_event(build: Build) -> None:
    # Anthropic's stream, translated to chat chunks: its text delta over the limit, whole in
    # one read after the client has the stream's first chunk.
    go = asyncio.Event()
    start = b"".join(message_events()[:4])  # start, block start, ping, a first word
    upstream = writes(start, big_event("anthropic"), go=go)
    rig = await build(upstream, "anthropic", max_event_bytes=LIMIT)
    async with asyncio.timeout(NEVER_HANG):
        status, body = await started(rig, go, b"data: {")
        await settled(rig)
    assert status == 200
    assert refused(body)
    assert BIG.encode() not in body


async def test_events_within_the_limit_in_a_longer_read_pass(build: Build) -> None:
    # Reads longer than the limit are measured event by event, not refused.
    many = [chunk("a") for _ in range(3 * LIMIT // len(chunk("a")))]
    rig = await build(writes(sse(*many, STOP, USAGE, b"[DONE]")), max_event_bytes=LIMIT)
    async with asyncio.timeout(NEVER_HANG):
        status, body = await rig.call(stream=True)
    assert status == 200, body
    assert body.count(b'"content":"a"') == len(many)
    assert body.endswith(b"data: [DONE]\n\n")
