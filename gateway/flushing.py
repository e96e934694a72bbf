"""A background task that writes what requests noted, every few seconds and once more at a
stop (`gateway.refusals`, `gateway.stored_share`).

What is written is merged in memory until a write succeeds, so a write may fail and be tried
again at the next tick; a stop cancels the task only between writes (never one cancelled
after its commit, whose rows would be kept and written again), then writes what is left,
waiting out another process's lock for a while (`flush_when_free`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable

import structlog

from gateway.errors import StoreBusy

__all__ = ["STOP_BUSY_SECONDS", "Flushing", "flush_when_free"]

log = structlog.get_logger(__name__)

# How long a stop waits for another process's write lock before it gives the rows up.
STOP_BUSY_SECONDS = 10.0


class Flushing:
    """Calls `tick()` (by default `flush()`) every `flush_seconds` from a task of its own;
    a subclass writes under `self._lock`, and says how much it holds (`pending`) and how its
    log lines are named (`task_name`, `failed_event`, `lost_event`)."""

    task_name = "flushing"
    failed_event = "write_failed"  # a tick that failed: the error's class only, once a tick
    lost_event = "lost_at_stop"  # what the stop could not write

    def __init__(self, *, flush_seconds: float) -> None:
        self._flush_seconds = flush_seconds
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None

    @property
    def pending(self) -> int:
        raise NotImplementedError

    async def flush(self) -> None:
        """Write what is held, under `self._lock`; on failure keep it and raise."""
        raise NotImplementedError

    async def tick(self) -> None:
        await self.flush()

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=self.task_name)

    async def stop(self) -> None:
        """Stop the task and write what is left: nothing is lost on a clean stop."""
        task, self._task = self._task, None
        if task is not None:
            # Cancel only while holding the lock, so the task never dies halfway through a
            # write (one cancelled after its commit would keep what it wrote, and write it
            # again).
            async with self._lock:
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        try:
            await flush_when_free(self.flush)
        except Exception:
            self._lost_at_stop()

    def _lost_at_stop(self) -> None:
        """What the stop could not write (in its `except` block: the line has the error)."""
        log.exception(self.lost_event, held=self.pending)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._flush_seconds)
            try:
                await self.tick()
            except Exception as exc:
                # The error's class only: one line per tick while the database is down.
                log.warning(self.failed_event, error=type(exc).__name__, held=self.pending)


async def flush_when_free(
    flush: Callable[[], Awaitable[None]], seconds: float = STOP_BUSY_SECONDS
) -> None:
    """`flush()` at a stop, retried (backing off) while another process holds the database's
    write lock (the CLI, a backup: `StoreBusy`), for at most `seconds`: what was batched until
    the stop is written once the lock is free. Any other failure is final.

    Raises:
        Exception: what the last attempt raised.
    """
    deadline = time.monotonic() + seconds
    delay = 0.05
    while True:
        try:
            await flush()
        except StoreBusy:
            if time.monotonic() + delay > deadline:
                raise
        else:
            return
        await asyncio.sleep(delay)
        delay = min(delay * 2, 1.0)
