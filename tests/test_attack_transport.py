"""The upstream connection pool attacked from outside: a pooled connection the upstream writes
on while it idles, at many moments, many requests over few connections (`providers._connector`).

Upstreams here are raw sockets (`tests.test_attack_upstream.RawUpstream`) that answer each
request with the word its prompt carries, so a request that got another's answer (or one
nobody asked for) shows it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import random
from typing import Any

import pytest
from structlog.testing import capture_logs

from tests.conftest import NEVER_HANG, create_key
from tests.test_attack_upstream import COMPLETION, Rig, chunk, http, sse, whole
from tests.test_stream_reuse import (
    HEAD,
    STOP,
    TERMINATOR,
    USAGE,
    Build,
    build,
    chunked,
    connections,
    settled,
)

__all__ = ["build"]  # (the fixture, shared with test_stream_reuse)

STALE = b"stale-meant-for-nobody"
NO_CONTENT = http("204 No Content", {})


def asked(request: bytes) -> tuple[bytes, bool]:
    """The word a request's prompt carries, and whether it asked for a stream."""
    body = json.loads(request.split(b"\r\n\r\n", 1)[1])
    return body["messages"][0]["content"].encode(), bool(body.get("stream"))


def answer_of(word: bytes, stream: bool, framing: str = "length") -> bytes:
    """The whole answer that says `word`: a stream, or a JSON answer with a Content-Length
    (`length`), chunked (`chunked`) or HTTP/1.0 keep-alive (`http10`)."""
    if stream:
        return HEAD + chunked(sse(chunk(word), STOP, USAGE, b"[DONE]")) + TERMINATOR
    body = COMPLETION % word
    if framing == "chunked":
        head = {"Content-Type": "application/json", "Transfer-Encoding": "chunked"}
        return http("200 OK", head) + chunked(body) + TERMINATOR
    if framing == "http10":
        head = {
            "Content-Type": "application/json",
            "Content-Length": str(len(body)),
            "Connection": "keep-alive",
        }
        return http("200 OK", head, body).replace(b"HTTP/1.1", b"HTTP/1.0", 1)
    return whole(body)


async def ask(rig: Rig, word: str, *, stream: bool) -> tuple[int, str]:
    """A chat request whose prompt is `word`: its status and the text it got."""
    body: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": word}]}
    if stream:
        body["stream"] = True
    status, data = await rig.post("/v1/chat/completions", body)
    if status != 200:
        return status, data.decode()
    if not stream:
        return status, str(json.loads(data)["choices"][0]["message"]["content"])
    events = [json.loads(line[6:]) for line in data.split(b"\n\n") if line[6:7] == b"{"]
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"])
    assert data.endswith(b"data: [DONE]\n\n"), data
    return status, text


# --- legit reuse: nothing closed that need not be --------------------------------------------


@pytest.mark.parametrize(
    ("stream", "framing", "after"),
    [
        (False, "length", b""),
        (False, "chunked", b""),
        (True, "chunked", b""),
        (False, "http10", b""),
        # A stray CRLF after an answer (some servers send one): no answer, nothing to close for.
        (False, "length", b"\r\n"),
    ],
    ids=["length", "chunked", "stream", "http10-keep-alive", "stray-crlf"],
)
async def test_sequential_requests_reuse_one_connection(
    build: Build, stream: bool, framing: str, after: bytes
) -> None:
    async def answer(request: bytes, writer: asyncio.StreamWriter) -> None:
        word, streamed = asked(request)
        writer.write(answer_of(word, streamed, framing) + after)
        await writer.drain()

    rig = await build(answer)
    async with asyncio.timeout(NEVER_HANG):
        for n in range(10):
            assert await ask(rig, f"w{n}", stream=stream) == (200, f"w{n}")
        await settled(rig)
    assert len(connections(rig)) == 1


# --- idle bytes at many moments ----------------------------------------------------------------


@pytest.mark.parametrize("framing", ["length", "chunked", "http10", "stream"])
@pytest.mark.parametrize(
    "stale",
    [whole(COMPLETION % STALE), NO_CONTENT, http("408 Request Timeout", {"Content-Length": "0"})],
    ids=["answer", "204", "408"],
)
async def test_an_answer_nobody_asked_for_in_the_same_write_never_reaches_the_next_request(
    build: Build, framing: str, stale: bytes
) -> None:
    # The stale answer comes in the very segment that ends the answer: aiohttp parses both at
    # once.
    async def answer(request: bytes, writer: asyncio.StreamWriter) -> None:
        word, stream = asked(request)
        writer.write(answer_of(word, stream, framing) + stale)
        await writer.drain()

    rig = await build(answer)
    stream = framing == "stream"
    async with asyncio.timeout(NEVER_HANG):
        for n in range(3):
            assert await ask(rig, f"w{n}", stream=stream) == (200, f"w{n}")
        await settled(rig)


async def test_idle_bytes_after_a_lingering_stream_never_reach_the_next_request(
    build: Build,
) -> None:
    # The stream said `[DONE]` before its body's end: its connection lingers, and goes back to
    # the pool when the end comes, from inside aiohttp's parser. A stale answer in the same
    # write as that end is parsed after the connection is back in the pool.
    writers: list[asyncio.StreamWriter] = []

    async def answer(request: bytes, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        word, stream = asked(request)
        if len(writers) == 1:  # [DONE], not the body's end
            writer.write(HEAD + chunked(sse(chunk(word), STOP, USAGE, b"[DONE]")))
        else:
            writer.write(answer_of(word, stream))
        await writer.drain()

    rig = await build(answer)
    other = dataclasses.replace(rig, key=await create_key(rig.gateway, name="other"))
    async with asyncio.timeout(NEVER_HANG):
        assert await ask(rig, "first", stream=True) == (200, "first")
        writers[0].write(TERMINATOR + whole(COMPLETION % STALE))
        await writers[0].drain()
        await settled(rig)  # the lingering connection is back in the pool (or closed)
        assert await ask(other, "second", stream=False) == (200, "second")
        await settled(rig)


async def test_a_flood_of_answers_on_an_idle_connection_is_not_held_in_memory(
    build: Build,
) -> None:
    # An answer without a body (a 204) costs an upstream 27 bytes and the gateway a parsed
    # message (head, headers, a payload reader: about 400 bytes) in the connection's queue,
    # which nothing bounds, reads or counts (`max_buffered_bytes`) while it idles in the pool
    # (aiohttp's keep-alive, 15 s). 16 MiB of them were some 180 MiB of the gateway's memory:
    # at wire speed, gigabytes before anything looked. The gateway closes such a connection
    # at its first byte instead, so the upstream finds it closed long before it is done.
    writers: list[asyncio.StreamWriter] = []

    async def answer(request: bytes, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        word, stream = asked(request)
        writer.write(answer_of(word, stream))
        await writer.drain()

    rig = await build(answer)
    async with asyncio.timeout(NEVER_HANG):
        assert await ask(rig, "first", stream=False) == (200, "first")
        writer = writers[0]
        piece = NO_CONTENT * (64 * 1024 // len(NO_CONTENT))
        written = 0
        with capture_logs() as logs:
            try:
                while written < 16 * 1024 * 1024 and not connections(rig)[0].is_set():
                    writer.write(piece)
                    await writer.drain()
                    written += len(piece)
                    if writer.transport.is_closing():
                        break
                    await asyncio.sleep(0)  # (the gateway reads what it was sent)
            except ConnectionError:
                pass
            # Closed by the gateway: the upstream's read of its next request ends.
            await connections(rig)[0].wait()
        assert written < 4 * 1024 * 1024, written
        assert [line for line in logs if line["event"] == "upstream_idle_bytes"]
        assert await ask(rig, "second", stream=False) == (200, "second")
        await settled(rig)


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_half_a_head_then_its_rest_never_becomes_the_next_answer(
    build: Build, stream: bool
) -> None:
    # Half a head while idle, its rest once the next request has been sent: the rest is no
    # HTTP for a new parser, so that request fails (502) instead of taking a stale answer; a
    # connection that spoke while idle is not reused at all, so it gets its own answer.
    writers: list[asyncio.StreamWriter] = []
    stale = whole(COMPLETION % STALE)

    async def answer(request: bytes, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        word, streamed = asked(request)
        if len(writers) == 2 and writers[1] is writers[0]:
            writer.write(stale[20:])  # the rest of the stale answer, then its own
        writer.write(answer_of(word, streamed))
        await writer.drain()

    rig = await build(answer)
    async with asyncio.timeout(NEVER_HANG):
        assert await ask(rig, "first", stream=stream) == (200, "first")
        writers[0].write(stale[:20])
        await writers[0].drain()
        await connections(rig)[0].wait()  # closed: it spoke while idle
        assert await ask(rig, "second", stream=stream) == (200, "second")
        await settled(rig)


KINDS_OF_ANSWER = ["length", "chunked", "http10", "stream", "linger", "close"]
STALE_TAILS = [
    b"",
    b"",
    whole(COMPLETION % STALE),
    NO_CONTENT * 3,
    b"HTTP/1.1 200 OK\r\nContent-Le",
    http("408 Request Timeout", {"Content-Length": "0", "Connection": "close"}),
    b"\r\n",
]


async def test_many_requests_over_few_connections_each_get_their_own_answer(
    build: Build,
) -> None:
    # Two connections at most, 60 requests at once, and an upstream that follows answers with
    # stale ones, half heads, timeouts and closes, in the same write: every client gets its own
    # word, every slot comes back. (Bytes that are no HTTP in the segment of an answer fail
    # aiohttp's parse of the whole segment, that answer's too: a 502, below.)
    rng = random.Random(7)
    plan = [(rng.choice(KINDS_OF_ANSWER), rng.choice(STALE_TAILS)) for _ in range(60)]
    tails = iter(plan)

    async def answer(request: bytes, writer: asyncio.StreamWriter) -> None:
        word, stream = asked(request)
        kind, tail = next(tails)
        if stream:
            body = HEAD + chunked(sse(chunk(word), STOP, USAGE, b"[DONE]"))
            if kind == "linger":  # its end in a write of its own, after a turn
                writer.write(body)
                await writer.drain()
                await asyncio.sleep(0)
                writer.write(TERMINATOR + tail)
            else:
                writer.write(body + TERMINATOR + tail)
        elif kind == "close":
            body = COMPLETION % word
            head = {"Content-Type": "application/json", "Content-Length": str(len(body))}
            # (no tail: half a head before the close fails the answer in aiohttp, a 502)
            writer.write(http("200 OK", {**head, "Connection": "close"}, body))
            await writer.drain()
            writer.close()
            return
        else:
            framing = kind if kind in ("chunked", "http10") else "length"
            writer.write(answer_of(word, stream, framing) + tail)
        await writer.drain()

    rig = await build(answer, max_connections=2, pool_timeout=NEVER_HANG)
    async with asyncio.timeout(NEVER_HANG):
        results = await asyncio.gather(
            *(ask(rig, f"w{n}", stream=n % 2 == 1) for n in range(len(plan)))
        )
        stats = await settled(rig)
    assert results == [(200, f"w{n}") for n in range(len(plan))]
    assert stats["in_use"] == 0 and stats["waiting"] == 0


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_bytes_that_are_no_http_after_an_answer_in_its_segment_fail_only_it(
    build: Build, stream: bool
) -> None:
    # Never another's answer: this one fails (a 502: aiohttp's parser refuses the segment), the
    # next one is answered on a new connection.
    async def answer(request: bytes, writer: asyncio.StreamWriter) -> None:
        word, streamed = asked(request)
        tail = b"\x00garbage\r\n\r\n" if word == b"first" else b""
        writer.write(answer_of(word, streamed) + tail)
        await writer.drain()

    rig = await build(answer)
    async with asyncio.timeout(NEVER_HANG):
        status, text = await ask(rig, "first", stream=stream)
        assert status == 502 and "not valid HTTP" in text
        assert await ask(rig, "second", stream=stream) == (200, "second")
        await settled(rig)
    assert len(connections(rig)) == 2
