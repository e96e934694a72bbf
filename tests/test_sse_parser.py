"""The upstream SSE parser: batches per read, and every framing variant the spec allows."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from gateway.providers._http import iter_sse_batches


class _Content:
    def __init__(self, pieces: list[bytes]) -> None:
        self._pieces = pieces

    async def iter_any(self) -> AsyncIterator[bytes]:
        for piece in self._pieces:
            yield piece


class _Response:
    def __init__(self, pieces: list[bytes]) -> None:
        self.content = _Content(pieces)


async def batches(pieces: list[bytes]) -> list[list[bytes]]:
    return [b async for b in iter_sse_batches(_Response(pieces))]  # type: ignore[arg-type]


async def test_one_read_many_events_is_one_batch() -> None:
    assert await batches([b"data: 1\n\ndata: 2\n\ndata: [DONE]\n\n"]) == [[b"1", b"2", b"[DONE]"]]


async def test_events_split_across_reads() -> None:
    pieces = [b"da", b'ta: {"a"', b":1}\n", b"\ndata: 2\n\n"]
    assert await batches(pieces) == [[b'{"a":1}', b"2"]]


@pytest.mark.parametrize("sep", [b"\r\n", b"\r", b"\n"])
async def test_line_endings(sep: bytes) -> None:
    stream = b"data: 1" + sep + sep + b"data: 2" + sep + sep
    one_byte_reads = [stream[i : i + 1] for i in range(len(stream))]
    expected = [b"1", b"2"]
    assert [e for b in await batches(one_byte_reads) for e in b] == expected
    assert [e for b in await batches([stream]) for e in b] == expected


async def test_comments_fields_and_multiline_data() -> None:
    stream = b": ping\n\nevent: x\nid: 3\ndata: a\ndata:b\n\nretry: 5\n\n"
    assert await batches([stream]) == [[b"a\nb"]]


async def test_unterminated_last_event_is_flushed() -> None:
    assert await batches([b"data: 1\n\ndata: tail"]) == [[b"1"], [b"tail"]]


async def test_large_event_in_small_reads() -> None:
    payload = b"x" * 300_000
    stream = b"data: " + payload + b"\n\n"
    reads: list[Any] = [stream[i : i + 4096] for i in range(0, len(stream), 4096)]
    assert await batches(reads) == [[payload]]
