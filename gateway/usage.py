"""UsageRecorder: queue usage rows without blocking requests; write them in batches.

`record()` is synchronous so a handler can call it from a `finally` block even while it is
being cancelled (a client hanging up). A background task writes a batch when `batch_size` rows
are waiting or `flush_seconds` after the first row arrived. Rows from a failed write are kept,
up to `max_retained`, and retried with exponential backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Sequence
from itertools import chain
from typing import Protocol

import structlog

from gateway.flushing import Flushing
from gateway.records import UsageRecord

__all__ = ["Unwritten", "UsageRecorder", "UsageSink"]

log = structlog.get_logger(__name__)

# A database that comes back gets the rows held for it within this long.
_MAX_BACKOFF_SECONDS = 10.0


# A key's usage (tokens, USD) in rows not in the table, since a unix time.
Unwritten = Callable[[str, float], tuple[int, float]]


class UsageSink(Protocol):
    """Where rows go; `gateway.store.Store` is one."""

    async def insert_usage(self, rows: Sequence[UsageRecord], *, fresh: bool = False) -> None: ...


class UsageRecorder(Flushing):
    """Batches usage rows into the store from a background task.

    Args:
        store: writes the rows (all or none per call).
        flush_seconds: longest a row waits before a write is attempted.
        batch_size: rows per write; that many waiting rows trigger a write at once.
        max_retained: rows kept across failed writes; beyond it the oldest are dropped (logged).
    """

    task_name = "usage-recorder"

    def __init__(
        self,
        store: UsageSink,
        *,
        flush_seconds: float,
        batch_size: int,
        max_retained: int = 100_000,
    ) -> None:
        super().__init__(flush_seconds=flush_seconds)
        self._store = store
        self._batch_size = batch_size
        self._max_retained = max(max_retained, batch_size)
        # Rows recorded and not yet taken by a write: a list rather than an asyncio.Queue,
        # whose put costs a request five calls in Python (the writer waits on `_arrived`).
        self._queued: list[UsageRecord] = []
        # Rows taken by a write and not yet written (including rows of failed writes).
        self._held: list[UsageRecord] = []
        # How many rows at the start of `_held` were handed to the store already: a write
        # that failed (or was cancelled) may still have committed them.
        self._tried = 0
        self._full = asyncio.Event()
        # (`self._lock`: one writer at a time: the background task, flush() or stop().)
        self.recorded = 0  # rows ever recorded, for tests and metrics
        self.dropped = 0  # rows given up on (beyond max_retained while the store failed)
        self.lost = 0  # rows still unwritten when stop() gave up: `gateway serve` exits 3
        self.failing = False  # the last write failed: /readyz reports not ready
        self._arrived = asyncio.Event()

    @property
    def pending(self) -> int:
        """Rows recorded but not yet written."""
        return len(self._queued) + len(self._held)

    def record(self, rec: UsageRecord) -> None:
        """Queue one row. Never blocks and never raises for a full queue (it is unbounded)."""
        queued = self._queued
        queued.append(rec)
        self.recorded += 1
        self._arrived.set()
        if len(queued) + len(self._held) >= self._batch_size:
            self._full.set()

    async def wait_recorded(self, count: int) -> None:
        """Wait until at least `count` rows have been recorded since start."""
        while self.recorded < count:
            self._arrived.clear()
            await self._arrived.wait()

    async def flush(self) -> None:
        """Write every row recorded so far.

        Raises:
            Exception: whatever the store raised; the unwritten rows stay queued for retry.
        """
        async with self._lock:
            await self._write()

    async def _write(self) -> None:
        """`flush`, under the write lock."""
        self._full.clear()
        self._held += self._queued
        self._queued.clear()
        while self._held:
            batch = self._held[: self._batch_size]
            # Rows never handed to the store cannot be in the table: the store skips
            # looking for them there (`fresh`). Counted as tried before the await, so
            # a write cut short by anything, a cancellation too, leaves them checked.
            fresh = self._tried == 0
            self._tried = max(self._tried, len(batch))
            try:
                await self._store.insert_usage(batch, fresh=fresh)
            except Exception:
                self.failing = True
                self._trim()
                raise
            # Only the task appends to _held while we await, and only at the end.
            del self._held[: len(batch)]
            self._tried -= len(batch)
        self.failing = False

    @contextlib.asynccontextmanager
    async def still(self) -> AsyncIterator[Unwritten]:
        """Write the rows recorded so far, then none until the block ends: a read of the usage
        table in it sees exactly the rows written before it (this process writes no others),
        and the function it yields sums a key's rows that are not (the rest, those recorded
        meanwhile too). A budget's spending loads in it (`Gate.sync`).

        A failed write is logged, and its rows are summed as not written; a commit lost on
        its way back may have written them (then they count twice until a reload: on the
        safe side of a budget)."""
        async with self._lock:
            try:
                await self._write()
            except Exception:  # the keys must still load; the rows stay queued for later
                log.exception("usage_flush_failed_before_budget_load")
            yield self._unwritten

    def _unwritten(self, key_id: str, since: float) -> tuple[int, float]:
        tokens, usd = 0, 0.0
        for row in chain(self._held, self._queued):
            if row.key_id == key_id and row.ts >= since:  # as `spend_since` reads the table
                tokens += row.total_tokens
                usd += row.cost_usd
        return tokens, usd

    def _lost_at_stop(self) -> None:
        """`gateway serve` exits 3 when rows were lost at its stop."""
        self.lost = self.pending
        log.exception("usage_rows_lost", rows=self.lost)

    async def _run(self) -> None:
        failures = 0
        while True:
            while not self._held and not self._queued:
                # Idle until a row arrives: no polling while there is nothing to write.
                self._arrived.clear()
                await self._arrived.wait()
            if self.pending < self._batch_size:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._flush_seconds):
                        await self._full.wait()
            try:
                await self.flush()
            except Exception:
                failures += 1
                log.exception("usage_write_failed", rows=self.pending, failures=failures)
                # Back off so a database that stays down is not hammered in a tight loop.
                delay = min(self._flush_seconds * 2 ** min(failures, 16), _MAX_BACKOFF_SECONDS)
                await asyncio.sleep(delay)
            else:
                failures = 0

    def _trim(self) -> None:
        """Keep at most `max_retained` unwritten rows, dropping the oldest."""
        excess = len(self._held) - self._max_retained
        if excess > 0:
            del self._held[:excess]
            self._tried = max(0, self._tried - excess)
            self.dropped += excess
            log.error("usage_rows_dropped", rows=excess, retained=len(self._held))
