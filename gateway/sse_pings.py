"""Keep-alive pings for every client event stream of an app, from one task.

aiohttp-sse starts a ping task per stream (a task, a timer and ~1.7 kB each, made and
cancelled for every stream). The streams of an LLM gateway are many and mostly busy, so one
task looks at all of them a few times per interval instead, and pings only those that wrote
nothing for a whole interval: proxies and load balancers that drop idle connections see
traffic during a long silence (a model thinking before its first token), busy streams get no
extra bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

from aiohttp.abc import AbstractStreamWriter
from aiohttp.web import StreamResponse

__all__ = ["PING", "PING_SECONDS", "SEND_TIMEOUT", "StreamPings"]

PING = b": ping\n\n"  # a comment: every SSE client skips it
PING_SECONDS = 15.0  # the longest silence a stream keeps before a ping
SEND_TIMEOUT = 120.0  # as aiohttp-sse's: a peer that takes nothing for this long is dropped


@dataclass(slots=True)
class _Watched:
    writer: AbstractStreamWriter
    size: int  # the writer's output when last looked at
    since: float  # when that output was first seen


class StreamPings:
    """The open streams of one app, and the task that pings the silent ones.

    `add()` a stream once its headers are out, `discard()` it when it ends; the task runs
    while there is a stream to watch, so an idle gateway runs no timer for it."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._streams: dict[StreamResponse, _Watched] = {}
        self._task: asyncio.Task[None] | None = None
        self._pings: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None

    def add(self, response: StreamResponse, writer: AbstractStreamWriter) -> None:
        loop = self._loop
        if loop is None or self._task is None or self._task.done():
            # (asking for the running loop is a getpid() system call: once per watch task)
            loop = self._loop = asyncio.get_running_loop()
            self._task = loop.create_task(self._watch())
        self._streams[response] = _Watched(writer, writer.output_size, loop.time())

    def current_task(self) -> asyncio.Task[object] | None:
        """The task of the stream just `add`ed, found without asking for the running loop."""
        return asyncio.current_task(self._loop)

    def discard(self, response: StreamResponse) -> None:
        self._streams.pop(response, None)

    def __len__(self) -> int:
        return len(self._streams)

    async def close(self) -> None:
        """Stop the task and any ping still being written (the app is stopping)."""
        tasks = [t for t in (self._task, *self._pings) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._streams.clear()

    async def _watch(self) -> None:
        loop = asyncio.get_running_loop()
        step = self.interval / 3  # a silence is noticed between 1 and 1 1/3 intervals in
        while self._streams:
            await asyncio.sleep(step)
            now = loop.time()
            for response, seen in list(self._streams.items()):
                size = seen.writer.output_size
                if size != seen.size:
                    seen.size, seen.since = size, now
                elif now - seen.since >= self.interval:
                    seen.since = now
                    self._ping(response, seen.writer)

    def _ping(self, response: StreamResponse, writer: AbstractStreamWriter) -> None:
        task = asyncio.get_running_loop().create_task(self._send_if_open(response, writer))
        self._pings.add(task)
        task.add_done_callback(self._pings.discard)

    async def _send_if_open(self, response: StreamResponse, writer: AbstractStreamWriter) -> None:
        # The stream may have ended since the ping was due: its end (`write_eof`) can still be
        # waiting for a slow client to drain, and a ping written then would follow the
        # terminating chunk, where the client reads the next response on the connection.
        if response in self._streams:
            await _send(response, writer)


async def _send(response: StreamResponse, writer: AbstractStreamWriter) -> None:
    try:
        async with asyncio.timeout(SEND_TIMEOUT):
            await response.write(PING)
    except TimeoutError:
        # A peer that takes nothing: its buffer would never drain. (The kernel's TCP user
        # timeout, set on every client connection by `gateway.server`, usually drops it first.)
        transport = writer.transport
        if transport is not None:
            transport.abort()
    except (ConnectionError, RuntimeError):
        pass  # the stream ended meanwhile (RuntimeError: written after its end)
