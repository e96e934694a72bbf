"""The bench's own tools still run against the code they measure (`make bench` is not part of
`make test`, so a signature change would otherwise surface only when someone benches)."""

from __future__ import annotations

import asyncio
import time

from tests import bench_micro
from tests.bench import free_port
from tests.bench_slow import Stream, StreamFigures, serve
from tests.conftest import NEVER_HANG


def test_the_accounting_micro_bench_measures_the_finish_step() -> None:
    figures = bench_micro.measure(rows=50, batch=10)
    assert figures["finish_us"] > 0
    assert figures["log_line_us"] > 0


def _request(port: int, body: bytes) -> bytes:
    return (
        f"POST /slow/v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body


async def test_the_slow_upstream_streams_timestamped_chunks_the_client_measures() -> None:
    port = free_port()
    server = asyncio.create_task(serve("127.0.0.1", port, chunks=3, interval=0.01))
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(NEVER_HANG):
            while True:  # until it listens
                try:
                    _, writer = await asyncio.open_connection("127.0.0.1", port)
                except OSError:
                    await asyncio.sleep(0.01)
                    continue
                writer.close()
                break
        figures, opened = StreamFigures(), []
        body = b'{"model":"m","stream":true,"stream_options":{"include_usage":true}}'
        streams = [
            Stream(_request(port, body), figures, lambda: opened.append(1), time.monotonic())
            for _ in range(2)
        ]
        for stream in streams:
            await loop.create_connection(lambda s=stream: s, "127.0.0.1", port)  # type: ignore[misc]
        async with asyncio.timeout(NEVER_HANG):
            await asyncio.gather(*(s.done for s in streams))
    finally:
        server.cancel()
    assert figures.errors == []
    assert len(opened) == 2
    assert len(figures.ttfb) == 2
    assert len(figures.delays) == 6  # three timestamped chunks each
    assert all(0 <= d < 5 for d in figures.delays)


async def test_a_stream_that_is_refused_or_cut_short_is_an_error() -> None:
    figures, opened = StreamFigures(), []
    loop = asyncio.get_running_loop()

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\ndata:\r\n")
        await writer.drain()
        writer.close()  # no [DONE], no end of the chunked body

    cut = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = cut.sockets[0].getsockname()[1]
    async with cut:
        stream = Stream(_request(port, b"{}"), figures, lambda: opened.append(1), 0.0)
        await loop.create_connection(lambda: stream, "127.0.0.1", port)
        async with asyncio.timeout(NEVER_HANG):
            await stream.done
    refused = Stream(_request(1, b"{}"), figures, lambda: opened.append(1), 0.0)
    refused.fail("ConnectionRefusedError")
    await refused.done
    assert figures.errors == ["stream ended without [DONE]", "ConnectionRefusedError"]
    assert len(opened) == 2
