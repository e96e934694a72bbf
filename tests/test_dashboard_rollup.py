"""The daily rollup the dashboard reads agrees with the usage rows it sums, from the start
(migration backfill) and batch after batch (Store.insert_usage)."""

from __future__ import annotations

from pathlib import Path

import aiosqlite

from gateway.dashboard import queries
from gateway.migrations import MIGRATIONS, pragma
from gateway.records import UsageRecord
from gateway.store import open_store

DAY = 86400
T0 = 1_780_000_000 // DAY * DAY  # a UTC midnight


def row(ts: float, key: str | None, model: str | None, status: int = 200) -> UsageRecord:
    return UsageRecord(
        ts=ts,
        request_id="r",
        key_id=key,
        model=model,
        provider="demo",
        upstream_model=model,
        endpoint="/v1/chat/completions",
        stream=False,
        status=status,
        total_tokens=10,
        cost_usd=0.25,
    )


ROWS = [
    row(T0 + 10, "key_a", "demo"),
    row(T0 + 3600 * 5, "key_a", "demo", status=500),
    row(T0 + DAY - 1, "key_b", "other"),
    row(T0 + DAY, "key_b", "other"),  # the next day
    row(T0 + DAY + 7200, None, None, status=401),
]


async def assert_daily_matches_hourly(db: aiosqlite.Connection) -> None:
    daily = await queries.series(db, T0, T0 + 3 * DAY, DAY)
    hourly = await queries.series(db, T0, T0 + 3 * DAY, 3600)
    for name in ("requests", "errors", "tokens", "cost_usd"):
        by_hour = getattr(hourly, name)
        assert getattr(daily, name) == [sum(by_hour[d * 24 : d * 24 + 24]) for d in range(3)]
    assert daily.requests == [3, 2, 0] and daily.errors == [1, 1, 0]
    whole = await queries.top(db, "key_id", T0, T0 + 3 * DAY)
    part = await queries.top(db, "key_id", T0 + 1, T0 + 3 * DAY)  # not whole days: rows
    assert whole == [("key_a", 2, 20, 0.5), ("key_b", 2, 20, 0.5)]  # a tie: by id
    assert part == whole
    assert await queries.top(db, "model", T0, T0 + DAY) == [
        ("demo", 2, 20, 0.5),
        ("other", 1, 10, 0.25),
    ]


async def test_batches_add_to_the_rollup(tmp_path: Path) -> None:
    async with open_store(str(tmp_path / "k.db")) as store:
        await store.insert_usage(ROWS[:2])
        await store.insert_usage(ROWS[2:])
        await assert_daily_matches_hourly(store.db)


async def test_migration_fills_the_rollup_from_existing_rows(tmp_path: Path) -> None:
    path = str(tmp_path / "k.db")
    async with aiosqlite.connect(path) as db:  # a database from before the rollup
        for step in MIGRATIONS[:4]:
            for statement in step:
                await db.execute(statement)
        await pragma(db, "user_version = 4")
        await db.executemany(
            "INSERT INTO usage (ts, request_id, key_id, model, endpoint, stream, status,"
            " total_tokens, cost_usd) VALUES (?, 'r', ?, ?, '/v1/chat/completions', 0, ?, ?, ?)",
            [(r.ts, r.key_id, r.model, r.status, r.total_tokens, r.cost_usd) for r in ROWS],
        )
        await db.commit()
    async with open_store(path) as store:
        await assert_daily_matches_hourly(store.db)
