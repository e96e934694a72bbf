"""The daily rollup the dashboard reads agrees with the usage rows it sums, from the start
(migration backfill) and batch after batch (insert_usage), on SQLite and on PostgreSQL; a
batch retried after a lost commit counts once, and `gateway copy-db` brings the rollup along."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiosqlite
import asyncpg
import msgspec

from gateway import cli
from gateway.dashboard import queries
from gateway.database import Database, opened_database
from gateway.migrations import MIGRATIONS, pragma, statements
from gateway.records import UsageRecord, mint_uid

DAY = 86400
T0 = 1_780_000_000 // DAY * DAY  # a UTC midnight


def row(ts: float, key: str | None, model: str | None, status: int = 200) -> UsageRecord:
    return UsageRecord(
        uid=mint_uid(),
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


async def assert_daily_matches_hourly(db: Database) -> None:
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


async def test_batches_add_to_the_rollup(database: str) -> None:
    async with opened_database(database) as store:
        await store.insert_usage(ROWS[:2])
        await store.insert_usage(ROWS[2:])
        await assert_daily_matches_hourly(store)


async def test_a_retried_batch_adds_to_the_rollup_once(database: str) -> None:
    """The writer retries a batch whose commit it never heard back about (and a batch may
    hold a row twice): rows already written are skipped, in the rollup too."""
    async with opened_database(database) as store:
        await store.insert_usage(ROWS[:2])
        await store.insert_usage(ROWS[:2])
        await store.insert_usage([*ROWS, ROWS[3]])
        await assert_daily_matches_hourly(store)
        no_uid = msgspec.structs.replace(ROWS[0], uid=None)  # never deduplicated
        await store.insert_usage([no_uid, no_uid])
        day = await queries.series(store, T0, T0 + DAY, DAY)
        assert day.requests == [5] and day.tokens == [50]


async def test_migration_fills_the_rollup_from_existing_rows(tmp_path: Path) -> None:
    path = str(tmp_path / "k.db")
    async with aiosqlite.connect(path) as db:  # a database from before the rollup
        for step in MIGRATIONS[:4]:
            for statement in statements(step, "sqlite"):
                await db.execute(statement)
        await pragma(db, "user_version = 4")
        await db.executemany(
            "INSERT INTO usage (ts, request_id, key_id, model, endpoint, stream, status,"
            " total_tokens, cost_usd) VALUES (?, 'r', ?, ?, '/v1/chat/completions', 0, ?, ?, ?)",
            [(r.ts, r.key_id, r.model, r.status, r.total_tokens, r.cost_usd) for r in ROWS],
        )
        await db.commit()
    async with opened_database(path) as store:
        await assert_daily_matches_hourly(store)


async def test_migration_fills_the_rollup_on_postgres(pg_url: str) -> None:
    conn = await asyncpg.connect(pg_url)
    try:  # a database from before the rollup
        await conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
        await conn.execute("INSERT INTO schema_version (version) VALUES (4)")
        for step in MIGRATIONS[:4]:
            for statement in statements(step, "postgres"):
                await conn.execute(statement)
        await conn.executemany(
            "INSERT INTO usage (ts, request_id, key_id, model, endpoint, stream, status,"
            " total_tokens, cost_usd) VALUES ($1, 'r', $2, $3, '/v1/chat/completions', 0,"
            " $4, $5, $6)",
            [(r.ts, r.key_id, r.model, r.status, r.total_tokens, r.cost_usd) for r in ROWS],
        )
    finally:
        await conn.close()
    async with opened_database(pg_url) as store:
        await assert_daily_matches_hourly(store)


async def test_copy_db_rebuilds_the_rollup(tmp_path: Path, pg_url: str) -> None:
    """Both ways, the target's rollup is that of the rows copied (here the source's had
    drifted: a row deleted by hand)."""
    source = str(tmp_path / "source.db")
    async with opened_database(source) as store:
        await store.insert_usage([*ROWS, row(T0 + 60, "key_a", "demo")])
    async with aiosqlite.connect(source) as db:
        await db.execute("DELETE FROM usage WHERE ts = ?", (T0 + 60,))
        await db.commit()
    backup = str(tmp_path / "backup.db")
    for src, dst in ((source, pg_url), (pg_url, backup)):
        assert await asyncio.to_thread(cli.main, ["copy-db", "--from", src, "--to", dst]) == 0
        async with opened_database(dst) as store:
            await assert_daily_matches_hourly(store)


async def test_replicas_writing_at_once_count_every_row_once(pg_url: str) -> None:
    """Two replicas write batches touching the same rollup rows in opposite orders, at once:
    no deadlock, no lost or doubled count."""
    keys = [f"key_{i}" for i in range(8)]

    def batch(order: list[str]) -> list[UsageRecord]:
        return [row(T0 + 60, key, "demo") for key in order]

    async with opened_database(pg_url) as a, opened_database(pg_url) as b:
        writes = []
        for _ in range(10):
            writes.append(a.insert_usage(batch(keys)))
            writes.append(b.insert_usage(batch(keys[::-1])))
        await asyncio.gather(*writes)
        day = await queries.series(a, T0, T0 + DAY, DAY)
        assert day.requests == [160] and day.tokens == [1600]
        top = await queries.top(a, "key_id", T0, T0 + DAY)
        assert top == [(key, 20, 200, 5.0) for key in keys]
