"""`max_event_bytes` at its edges, attacked from outside: an event at the limit, one byte over,
with LF or CRLF line ends, its blank line whole or split between two reads, comment, `event:`
and second data lines, on the pass-through path (OpenAI) and the translated ones (Anthropic,
Gemini), with `max_buffered_bytes` as small as the limit (tests/test_event_size.py has the
rest: events over the limit whole in one read, many small ones in a read over it).
"""

from __future__ import annotations

import asyncio
import json

import pytest

from gateway.providers._sse import EventTooLarge, SSEDecoder
from tests.conftest import NEVER_HANG
from tests.test_attack_transport import ask
from tests.test_attack_upstream import chunk, sse
from tests.test_stream_reuse import (
    HEAD,
    STOP,
    TERMINATOR,
    USAGE,
    Build,
    build,
    chunked,
    settled,
)

__all__ = ["build"]  # (the fixture, shared with test_stream_reuse)


def feed_all(reads: list[bytes], limit: int) -> list[bytes]:
    decoder = SSEDecoder(limit)
    out: list[bytes] = []
    for read in reads:
        out += decoder.feed(read)
    return out + decoder.end()


EVENT = b"data: " + b"x" * 994  # 1000 bytes: at a limit of 1000


@pytest.mark.parametrize(
    "reads",
    [
        [EVENT + b"\n\n"],
        [EVENT, b"\n\n"],
        [EVENT + b"\n", b"\n"],
        [EVENT + b"\r\n", b"\r\n"],
        [EVENT + b"\r", b"\n\r\n"],
        [EVENT + b"\r\n\r", b"\n"],
        [b"data: a\n\n" + EVENT + b"\n", b"\ndata: b\n\n"],
        [EVENT[:500], EVENT[500:] + b"\n", b"\n"],
    ],
    ids=[
        "whole",
        "blank-line-apart",
        "lf-lf-split",
        "crlf-crlf-split",
        "cr-lf-split",
        "crlfcr-lf-split",
        "after-one-lf-split",
        "three-reads",
    ],
)
def test_an_event_at_the_limit_passes_however_its_blank_line_is_split(
    reads: list[bytes],
) -> None:
    # The limit is an event's size without the blank line that ends it: however the reads
    # fall, even between the two line ends of that blank line (TCP splits where it likes).
    out = feed_all(reads, 1000)
    assert b"x" * 994 in out


@pytest.mark.parametrize(
    "reads",
    [
        [EVENT + b"x\n\n"],
        [EVENT + b"x", b"\n\n"],
        [EVENT + b"x\n", b"\n"],
        [EVENT + b"\n", b"data: b\n\n"],  # a second data line: 1008 bytes
        [EVENT + b"\n:", b"\n\n"],  # a comment line counts: 1002 bytes
        [b"event: e\n" + EVENT, b"\n\n"],  # an event line too
    ],
    ids=["whole", "blank-line-apart", "lf-lf-split", "second-line", "comment", "event-line"],
)
def test_an_event_over_the_limit_is_refused_however_it_is_split(reads: list[bytes]) -> None:
    with pytest.raises(EventTooLarge):
        feed_all(reads, 1000)


def test_what_is_held_of_an_event_at_the_limit_is_not_over_it() -> None:
    # `held` counts against `max_buffered_bytes`, which may be as small as the limit.
    decoder = SSEDecoder(1000)
    assert decoder.feed(EVENT + b"\r\n\r") == []
    assert decoder.held == 1000
    assert decoder.feed(b"\n") == [b"x" * 994]
    assert decoder.held == 0
    assert decoder.feed(b"data: a\n\n") == [b"a"]


LIMIT = 1000


def at_limit(kind: str, size: int) -> bytes:
    """An event of `kind`'s stream of `size` bytes before its blank line (not included)."""
    if kind == "gemini":
        empty = b'data: {"candidates":[{"content":{"role":"model","parts":[{"text":""}]}}]}'
        text = b"y" * (size - len(empty))
        return empty.replace(b'"text":""', b'"text":"%b"' % text)
    if kind == "anthropic":
        empty = (
            b"event: content_block_delta\n"
            b'data: {"type":"content_block_delta","index":0,'
            b'"delta":{"type":"text_delta","text":""}}'
        )
        return empty.replace(b'"text":""', b'"text":"%b"' % (b"y" * (size - len(empty))))
    empty = b"data: " + chunk("")
    return b"data: " + chunk(b"y" * (size - len(empty)))


def stream_after(kind: str) -> bytes:
    """What follows the event in `kind`'s stream, to its end."""
    if kind == "gemini":
        last = {
            "candidates": [{"content": {"role": "model", "parts": [{"text": "!"}]},
                            "finishReason": "STOP"}],
            "usageMetadata": {"promptTokenCount": 1, "candidatesTokenCount": 1,
                              "totalTokenCount": 2},
        }  # fmt: skip
        return sse(json.dumps(last).encode())
    if kind == "anthropic":
        return b"".join(
            b"event: %s\ndata: %s\n\n" % (e["type"].encode(), json.dumps(e).encode())
            for e in (
                {"type": "content_block_stop", "index": 0},
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                    "usage": {"output_tokens": 2},
                },
                {"type": "message_stop"},
            )
        )
    return sse(STOP, USAGE, b"[DONE]")


def stream_before(kind: str) -> bytes:
    if kind == "anthropic":
        start = {
            "type": "message_start",
            "message": {
                "id": "msg_1", "type": "message", "role": "assistant", "model": "m-1",
                "content": [], "stop_reason": None, "stop_sequence": None,
                "usage": {"input_tokens": 3, "output_tokens": 1},
            },
        }  # fmt: skip
        block = {"type": "content_block_start", "index": 0,
                 "content_block": {"type": "text", "text": ""}}  # fmt: skip
        return b"".join(
            b"event: %s\ndata: %s\n\n" % (e["type"].encode(), json.dumps(e).encode())
            for e in (start, block)
        )
    return b""


@pytest.mark.parametrize("kind", ["openai", "anthropic", "gemini"])
@pytest.mark.parametrize("crlf", [False, True], ids=["lf", "crlf"])
@pytest.mark.parametrize("split", [False, True], ids=["whole", "blank-line-split"])
@pytest.mark.parametrize("over", [0, 1], ids=["at-limit", "one-over"])
async def test_an_event_at_the_limit_is_taken_one_over_refused_end_to_end(
    build: Build, monkeypatch: pytest.MonkeyPatch, kind: str, crlf: bool, split: bool, over: int
) -> None:
    # Through the gateway (the pass-through path for OpenAI, translated for the others): an
    # event of exactly `max_event_bytes` is relayed, whether its blank line comes with it or
    # its two line ends in two writes; one byte more is refused.
    event = at_limit(kind, LIMIT + over)
    end = b"\n"
    if crlf:
        event, end = event.replace(b"\n", b"\r\n"), b"\r\n"
        # (CRLF line ends are not counted twice: the event is measured with LF ones)
    go = asyncio.Event()
    feed = SSEDecoder.feed

    def fed(decoder: SSEDecoder, piece: bytes) -> list[bytes]:
        try:
            return feed(decoder, piece)
        finally:
            if piece.endswith(event + end):  # the gateway has read the event, not its end
                go.set()

    monkeypatch.setattr(SSEDecoder, "feed", fed)

    async def answer(request: bytes, writer: asyncio.StreamWriter) -> None:
        first = stream_before(kind) + event + end
        writer.write(HEAD + chunked(first if split else first + end))
        await writer.drain()
        if split:
            await go.wait()  # the gateway has read the first half of the blank line
        writer.write(chunked((end if split else b"") + stream_after(kind)) + TERMINATOR)
        await writer.drain()

    rig = await build(answer, kind, max_event_bytes=LIMIT, max_buffered_bytes=LIMIT)
    async with asyncio.timeout(NEVER_HANG):
        if not split:
            go.set()
        status, text = await ask(rig, "w", stream=True)
        await settled(rig)
    if over:
        assert status == 502 and "max_event_bytes" in text, text
    else:
        assert status == 200, text
        assert "yyyy" in text
