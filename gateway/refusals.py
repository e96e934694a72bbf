"""Refused requests, counted per minute, key and status instead of written a row each.

A request the gateway refuses before any upstream call (a bad body, a model the key may not
use, a rate limit or budget) costs nothing upstream, and a client can send thousands a second:
one usage row each would let it flood the database. `RefusalCounter.count()` adds one to an
in-memory counter; a background task writes the counters as one row per (minute, key, status),
adding to the row already there. Counts that cannot be written stay in memory (merged, so a
flood adds nothing) and are written when the database takes them again; past `max_entries`
the oldest minutes are dropped, and that is logged. Usage reports add these rows as requests
and errors.
"""

from __future__ import annotations

from collections import Counter
from typing import Protocol

import structlog

from gateway.flushing import Flushing

__all__ = ["RefusalCounter", "RefusalSink", "Refusals"]

log = structlog.get_logger(__name__)

# (minute since the epoch, key id, status) -> requests
Refusals = Counter[tuple[int, str, int]]


class RefusalSink(Protocol):
    """Where counts go; `gateway.store.Store` is one."""

    async def add_refusals(self, counts: Refusals) -> None: ...


class RefusalCounter(Flushing):
    """Counts refusals in memory and writes them every `flush_seconds`."""

    task_name = "refusal-counter"
    failed_event = "refusal_write_failed"
    lost_event = "refusal_counts_lost_at_stop"

    def __init__(self, store: RefusalSink, *, flush_seconds: float, max_entries: int = 100_000):
        super().__init__(flush_seconds=flush_seconds)
        self._store = store
        self._max_entries = max_entries
        self._counts: Refusals = Counter()
        self.failing = False  # the last write failed
        self.dropped = 0

    @property
    def pending(self) -> int:
        return sum(self._counts.values())

    def count(self, ts: float, key_id: str, status: int) -> None:
        """One refused request of `key_id` at unix time `ts`. Never blocks."""
        entry = (int(ts // 60), key_id, status)
        if entry not in self._counts and len(self._counts) >= self._max_entries:
            oldest = min(self._counts)
            self.dropped += self._counts.pop(oldest)
            log.error("refusal_counts_dropped", minute=oldest[0], dropped=self.dropped)
        self._counts[entry] += 1

    async def flush(self) -> None:
        """Write every count; on failure they are kept (merged with newer ones) and it raises."""
        async with self._lock:
            counts, self._counts = self._counts, Counter()
            if not counts:
                return
            try:
                await self._store.add_refusals(counts)
            except BaseException:
                counts.update(self._counts)
                self._counts = counts
                self.failing = True
                raise
            self.failing = False
