"""`_http._take`, the stream path's `readany()` of several whole HTTP chunks at once, leaves a
body reader as aiohttp's own `readany()` does (its chunk offsets above all)."""

from __future__ import annotations

import asyncio

import pytest
from aiohttp.base_protocol import BaseProtocol
from aiohttp.streams import StreamReader

from gateway.providers._http import FAST_READS, _take

pytestmark = pytest.mark.skipif(not FAST_READS, reason="aiohttp's reader is not the one known")


def reader(chunks: list[bytes], loop: asyncio.AbstractEventLoop) -> StreamReader:
    content = StreamReader(BaseProtocol(loop), 2**16, loop=loop)
    for chunk in chunks:
        content.begin_http_chunk_receiving()
        content.feed_data(chunk)
        content.end_http_chunk_receiving()
    return content


def state(content: StreamReader) -> tuple[object, ...]:
    return (
        list(content._buffer),
        content._size,
        content._cursor,
        list(content._http_chunk_splits or ()),
        content._buffer_offset,
    )


@pytest.mark.parametrize("chunks", [[b"a", b"bc"], [b"data: x\n\n"] * 23, [b"x" * 70_000, b"y"]])
async def test_take_leaves_the_reader_as_readany_does(chunks: list[bytes]) -> None:
    loop = asyncio.get_running_loop()
    ours, theirs = reader(chunks, loop), reader(chunks, loop)
    got = _take(ours)
    expected = b""
    while theirs._buffer:
        expected += await theirs.readany()
    assert got == expected == b"".join(chunks)
    assert state(ours) == state(theirs)
    for more in ([b"z"], [b"u", b"vw"]):  # and the next reads, too
        for content in (ours, theirs):
            for chunk in more:
                content.begin_http_chunk_receiving()
                content.feed_data(chunk)
                content.end_http_chunk_receiving()
        piece = _take(ours) if len(more) > 1 else await ours.readany()
        assert piece == b"".join(more)
        while theirs._buffer:
            await theirs.readany()
        assert state(ours) == state(theirs)
