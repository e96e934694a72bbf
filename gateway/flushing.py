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

import structlog

from gateway.usage import flush_when_free

__all__ = ["Flushing"]

log = structlog.get_logger(__name__)


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
            log.exception(self.lost_event, held=self.pending)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._flush_seconds)
            try:
                await self.tick()
            except Exception as exc:
                # The error's class only: one line per tick while the database is down.
                log.warning(self.failed_event, error=type(exc).__name__, held=self.pending)
