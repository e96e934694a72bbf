"""Found by a soak of `serve --workers 2` on PostgreSQL and Redis with faults (2026-12-07)."""

from __future__ import annotations

import asyncio
from collections import Counter

import asyncpg

from gateway.pg_store import PgStore


async def test_refusal_flushes_of_two_replicas_do_not_deadlock(pg_url: str) -> None:
    """Two workers flushing refusal counts for the same (minute, key, status) rows in a
    different order deadlock in PostgreSQL (seen in the soak as `refusal_write_failed`
    `DeadlockDetectedError`, which also turns that worker's /readyz to 503 "usage": "failing"
    until its next flush). `add_refusals` upserts in the Counter's insertion order; the usage
    rollup sorts its upserts for exactly this reason."""
    a, b = await PgStore.open(pg_url), await PgStore.open(pg_url)
    try:
        entries = [(1_796_600_000 + 60 * (i % 3), f"key_{i:04d}", 429) for i in range(200)]
        deadlocks = 0
        for _ in range(20):
            fwd: Counter[tuple[int, str, int]] = Counter({e: 1 for e in entries})
            rev: Counter[tuple[int, str, int]] = Counter({e: 1 for e in reversed(entries)})
            results = await asyncio.gather(
                a.add_refusals(fwd), b.add_refusals(rev), return_exceptions=True
            )
            deadlocks += sum(
                isinstance(r, asyncpg.exceptions.DeadlockDetectedError) for r in results
            )
        assert deadlocks == 0, f"{deadlocks} of 40 refusal flushes failed with a deadlock"
    finally:
        await a.close()
        await b.close()
