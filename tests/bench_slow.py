"""The long-streams bench's slow upstream and its stream client, on raw asyncio protocols.

Both sit on the same 2-core machine as the server measured (the relay or the gateway). Written
on aiohttp, the upstream (a task woken by a timer for every chunk of every stream) and the load
client (aiohttp's parser, stream reader and a task per stream) together took about 120 % of a
core for 1,000 streams of a chunk every 100 ms, so the server measured queued for the CPU
behind its own load tools. Real clients and upstreams run on other machines: these two do the
same HTTP/1.1 exchange with as little CPU as we can, a transport write per chunk and one parse
per network read.

* `serve()` answers any `POST` by streaming `chunks` chat.completion.chunk events `interval`
  seconds apart, on a fixed schedule from its first (each chunk's content is the time it was
  written, `t<unix seconds>`), then a finish chunk, the usage chunk when the request asked
  for it (`stream_options.include_usage`), `data: [DONE]` and the chunked body's end.
  Connections are kept alive.
* `Stream` is one streamed request over its own connection: it records the time to the first
  body byte and each chunk's delay (arrival minus the time in its content), and fails unless
  the answer is 200 and ends with `[DONE]`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any, cast

import msgspec

from tests.bench_servers import _USAGE, _chunk, _event

__all__ = ["Stream", "StreamFigures", "serve"]

_MARK = b"@@TIME@@"
_PREFIX, _SUFFIX = _event(_chunk({"content": _MARK.decode()}, None)).split(_MARK)
_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n"
)
_NOT_FOUND = b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"
_MAX_HEAD = 64 * 1024


class _Request(msgspec.Struct):
    stream_options: dict[str, Any] | None = None


_DECODER = msgspec.json.Decoder(_Request)


def _chunked(payload: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(payload), payload)


class _SlowUpstream(asyncio.Protocol):
    """One connection to the slow upstream: requests in turn, each answered by a slow stream."""

    def __init__(self, chunks: int, interval: float) -> None:
        self._chunks, self._interval = chunks, interval
        self._loop = asyncio.get_running_loop()
        self._buf = b""
        self._streaming = False
        self._timer: asyncio.TimerHandle | None = None
        self._transport: asyncio.Transport | None = None
        finish = _event(_chunk({}, "stop"))
        usage = _event({**_chunk({}, None), "choices": [], "usage": _USAGE})
        done = b"data: [DONE]\n\n"
        self._ends = {flag: _chunked(finish + (usage if flag else b"") + done) + b"0\r\n\r\n"
                      for flag in (False, True)}  # fmt: skip

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._transport = None

    def data_received(self, data: bytes) -> None:
        self._buf += data
        if not self._streaming:
            self._next_request()

    def _next_request(self) -> None:
        transport = self._transport
        if transport is None:
            return
        buf = self._buf
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            if len(buf) > _MAX_HEAD:
                transport.close()
            return
        head = buf[:end].lower()
        length = 0
        at = head.find(b"\r\ncontent-length:")
        if at >= 0:
            eol = head.find(b"\r\n", at + 2)
            length = int(head[at + 17 : eol if eol >= 0 else len(head)])
        if len(buf) < end + 4 + length:
            return  # the body is still coming
        body, self._buf = buf[end + 4 : end + 4 + length], buf[end + 4 + length :]
        if not head.startswith(b"post "):
            transport.write(_NOT_FOUND)
            self._next_request()
            return
        options = _DECODER.decode(body).stream_options or {}
        self._end = self._ends[bool(options.get("include_usage"))]
        transport.write(_HEAD)
        self._streaming, self._sent, self._start = True, 0, self._loop.time()
        self._tick()

    def _tick(self) -> None:
        self._timer = None
        transport = self._transport
        if transport is None:
            return
        transport.write(_chunked(b"%st%.6f%s" % (_PREFIX, time.time(), _SUFFIX)))
        self._sent += 1
        if self._sent < self._chunks:
            at = self._start + self._sent * self._interval  # late wake-ups do not add up
            self._timer = self._loop.call_at(at, self._tick)
            return
        transport.write(self._end)
        self._streaming = False
        if self._buf:
            self._next_request()


async def serve(host: str, port: int, chunks: int, interval: float) -> None:
    """Serve slow streams on `host:port` until cancelled."""
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: _SlowUpstream(chunks, interval), host, port, backlog=1024
    )
    async with server:
        await server.serve_forever()


class StreamFigures:
    """What the streams of one run measured, shared by all of them."""

    def __init__(self) -> None:
        self.delays: list[float] = []
        self.ttfb: list[float] = []
        self.errors: list[str] = []


class Stream(asyncio.Protocol):
    """One streamed request; `done` resolves when it has ended, well or not.

    `opened` is called once, when the answer's head has come or the request has failed
    without one.
    """

    def __init__(
        self, request: bytes, figures: StreamFigures, opened: Callable[[], None], start: float
    ) -> None:
        self._request, self._figures, self._opened, self._start = request, figures, opened, start
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._transport: asyncio.Transport | None = None
        self._head: bytes | None = b""  # None once the head is read
        self._left = 0  # bytes of the current HTTP chunk still to come
        self._buf = b""  # a chunk-size line not yet whole
        self._tail = b""  # a marker that may straddle two reads
        self._last = b""
        self._first = True

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        transport.write(self._request)

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(type(exc).__name__ if exc else "stream ended without [DONE]")

    def fail(self, why: str) -> None:
        """The connection could not be made."""
        self._fail(why)

    def _fail(self, why: str) -> None:
        if self.done.done():
            return
        if self._head is not None:
            self._opened()  # it never opened: nothing must wait for it
        self._figures.errors.append(why)
        self._finish()

    def _finish(self) -> None:
        self.done.set_result(None)
        if self._transport is not None:
            self._transport.close()

    def data_received(self, data: bytes) -> None:
        if self._head is not None:
            head = self._head + data
            end = head.find(b"\r\n\r\n")
            if end < 0:
                self._head = head
                return
            self._head = None
            self._opened()
            status = head[9:12]
            if status != b"200":
                self._fail(f"status {status.decode(errors='replace')}")
                return
            data = head[end + 4 :]
        now = time.time()
        buf = self._buf + data if self._buf else data
        pos, size = 0, len(buf)
        while pos < size:
            if self._left == 0:
                eol = buf.find(b"\r\n", pos)
                if eol < 0:
                    break
                line = buf[pos:eol]
                pos = eol + 2
                if not line:
                    continue  # the CRLF that ends a chunk's data
                self._left = int(line.split(b";", 1)[0], 16)
                if self._left == 0:
                    self._end()
                    return
                continue
            take = min(self._left, size - pos)
            self._payload(buf[pos : pos + take], now)
            pos += take
            self._left -= take
        self._buf = buf[pos:]

    def _payload(self, piece: bytes, now: float) -> None:
        if self._first:
            self._figures.ttfb.append(time.monotonic() - self._start)
            self._first = False
        data, pos = self._tail + piece, 0
        delays = self._figures.delays
        while True:  # each chunk carries the time the upstream sent it
            at = data.find(b'"content":"t', pos)
            if at < 0:
                self._tail = data[-11:]
                break
            end = data.find(b'"', at + 12)
            if end < 0:
                self._tail = data[at:]
                break
            delays.append(now - float(data[at + 12 : end]))
            pos = end
        self._last = (self._last + piece)[-64:]

    def _end(self) -> None:
        if b"[DONE]" not in self._last:
            self._figures.errors.append("stream ended without [DONE]")
        self._finish()
