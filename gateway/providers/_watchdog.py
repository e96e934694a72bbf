"""Stream timeouts without a timer per chunk: one watchdog per upstream client.

aiohttp's `sock_read` timeout arms and cancels a Python timer for every read, which at
thousands of open streams was a quarter of the gateway's CPU. Here a read only stores the
time it happened (an attribute set), and one task per client wakes every `period` seconds to
walk the open streams and fail those that have been silent too long.

A stream is bounded twice, as the provider's settings say:
- until its first event, by `first_byte_timeout` (default `read_timeout`) from its start,
  however the upstream trickles (pings, a partial event or a slow head do not reset it);
- after it, by `read_timeout` between two reads of the upstream.
Time spent while the gateway is not reading (its client is slow to take what it has) does not
count, as aiohttp's timer is dropped while reading is paused.

A stream that expires has its task cancelled while it waits for the upstream; the stream turns
that cancellation into an `UpstreamTimeout` (see `Watch.timed_out`). A timeout fires up to one
period late; the period is a quarter of the shortest timeout, at most a second.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator

__all__ = ["MAX_PERIOD", "Watch", "Watchdog"]

MAX_PERIOD = 1.0


class Watch:
    """One open stream as the watchdog sees it."""

    __slots__ = ("expired", "first", "last", "limit", "reading", "task")

    def __init__(self, task: asyncio.Task[object], limit: float) -> None:
        self.task = task
        self.limit = limit  # the silence allowed from `last`
        self.last = time.monotonic()
        self.first = True  # no event yet: `last` stays at the start
        self.reading = True  # the stream's task is waiting for the upstream
        self.expired = False

    def timed_out(self) -> bool:
        """Whether a CancelledError the stream caught is the watchdog's (then it is spent,
        and the task is no longer being cancelled), not a client hang-up or a shutdown."""
        return self.expired and self.task.uncancel() == 0


class Watchdog:
    """Fails the streams of one upstream client that stay silent past their limits."""

    def __init__(self, first_byte_timeout: float, read_timeout: float) -> None:
        self.first_byte_timeout = first_byte_timeout
        self.read_timeout = read_timeout
        self.period = min(MAX_PERIOD, first_byte_timeout / 4, read_timeout / 4)
        self._open: set[Watch] = set()
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.expired = 0  # streams it failed, for the record

    def open(self) -> Watch:
        """Watch the stream the current task is reading, until `close()` (the upstream
        client's stream calls these two directly: a context manager would cost a generator
        and four calls more per stream)."""
        # The loop named: `current_task()` without one asks for the running loop, a getpid()
        # system call on Linux (asyncio checks the loop is not a forked parent's).
        loop = self._loop
        task = asyncio.current_task(loop) if loop is not None else None
        if task is None:  # the first stream (or a new loop)
            loop = self._loop = asyncio.get_running_loop()
            task = asyncio.current_task(loop)
        assert task is not None  # a stream is only read inside a task
        watch = Watch(task, self.first_byte_timeout)
        self._open.add(watch)
        if self._task is None:
            self._task = task.get_loop().create_task(self._patrol())
        return watch

    def close(self, watch: Watch) -> None:
        """Stop watching a stream."""
        self._open.discard(watch)

    @contextlib.contextmanager
    def watch(self) -> Iterator[Watch]:
        """Watch the stream the current task is reading, until the block ends."""
        watch = self.open()
        try:
            yield watch
        finally:
            self.close(watch)

    def check(self, now: float) -> None:
        """Fail every stream that waits for its upstream past its limit at `now`."""
        for watch in self._open:
            if watch.reading and not watch.expired and now - watch.last > watch.limit:
                watch.expired = True
                self.expired += 1
                watch.task.cancel()

    async def _patrol(self) -> None:
        try:
            while self._open:
                await asyncio.sleep(self.period)
                self.check(time.monotonic())
        finally:
            self._task = None  # the next stream starts a new patrol
