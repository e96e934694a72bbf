"""Whole-database copies of a SQLite store (`gateway copy-db`), part of `store.Store`."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence

import aiosqlite
import msgspec

from gateway.migrations import FILL_DAILY, StoreError
from gateway.records import KeyRecord, UsageRecord
from gateway.refusals import Refusals
from gateway.rows import COPIED_TABLES, KEY_COLUMNS, USAGE_COLUMNS, key_params, usage_from_row
from gateway.sqlite_usage import ADD_REFUSALS, INSERT_USAGE, marks
from gateway.stored_share import EXPORT_STORED, StoredRow, upsert_sql

__all__ = ["INSERT_KEY", "KEEP_STORED", "SqliteCopies"]

KEEP_STORED = upsert_sql(("?",) * 5)
INSERT_KEY = f"INSERT INTO keys ({', '.join(KEY_COLUMNS)}) VALUES ({marks(KEY_COLUMNS)})"  # noqa: S608


class SqliteCopies:
    """What `Store` adds for copies: reads of everything, and one write of everything."""

    db: aiosqlite.Connection

    def _transaction(self) -> contextlib.AbstractAsyncContextManager[aiosqlite.Connection]:
        raise NotImplementedError  # `Store`'s: the write lock and BEGIN IMMEDIATE

    async def is_empty(self) -> bool:
        """No key, usage row, refusal count or stored id yet."""
        for table in COPIED_TABLES:
            async with self.db.execute(f"SELECT 1 FROM {table} LIMIT 1") as cur:  # noqa: S608
                if await cur.fetchone() is not None:
                    return False
        return True

    async def import_rows(
        self,
        keys: Sequence[KeyRecord],
        usage: AsyncIterator[list[UsageRecord]],
        refusals: Refusals,
        stored: AsyncIterator[list[StoredRow]] | None = None,
    ) -> tuple[int, int]:
        """Fill an empty database with another's keys (as they are: ids, digests, times), usage
        rows, refusal counts and whose each stored id is (`gateway.stored_share`), all in one
        transaction; returns the usage rows and the stored ids written.

        Raises:
            StoreError: the database is not empty (nothing is written).
        """
        written = 0
        async with self._transaction() as db:
            if not await self.is_empty():
                raise StoreError("the target database is not empty")
            await db.executemany(INSERT_KEY, [key_params(k) for k in keys])
            async for batch in usage:
                await db.executemany(INSERT_USAGE, [msgspec.structs.astuple(r) for r in batch])
                written += len(batch)
            await db.executemany(ADD_REFUSALS, [(*entry, n) for entry, n in refusals.items()])
            ids = 0
            if stored is not None:
                async for rows in stored:
                    await db.executemany(KEEP_STORED, rows)
                    ids += len(rows)
            # The source's rollup may lag or differ (rows edited by hand): rebuild it from
            # the rows just written.
            await db.execute("DELETE FROM usage_daily")
            await db.execute(FILL_DAILY["sqlite"])
        return written, ids

    async def export_usage(self, batch: int = 5000) -> AsyncIterator[list[UsageRecord]]:
        """Every usage row, oldest first, `batch` at a time."""
        async with self.db.execute(
            f"SELECT {', '.join(USAGE_COLUMNS)} FROM usage ORDER BY id"  # noqa: S608
        ) as cur:
            while rows := await cur.fetchmany(batch):
                yield [usage_from_row(row) for row in rows]

    async def export_stored(self, batch: int = 5000) -> AsyncIterator[list[StoredRow]]:
        """Every row of `stored_ids`, `batch` at a time."""
        async with self.db.execute(EXPORT_STORED) as cur:
            while rows := await cur.fetchmany(batch):
                yield [(row[0], row[1], row[2], row[3], row[4]) for row in rows]

    async def export_refusals(self) -> Refusals:
        async with self.db.execute("SELECT minute, key_id, status, count FROM refusals") as cur:
            return Refusals({(m, k, s): n for m, k, s, n in await cur.fetchall()})
