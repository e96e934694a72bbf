"""The database schema as ordered migration steps, and the code that applies them.

Step N leaves the database at `PRAGMA user_version = N`. Never edit a released step: append a
new one, so every existing `keys.db` (and `keys.db.sample`) upgrades in place on open.
"""

from __future__ import annotations

from typing import Any

import aiosqlite

__all__ = ["MIGRATIONS", "StoreError", "migrate", "pragma"]


class StoreError(Exception):
    """The database cannot be used, e.g. it was written by a newer gateway than this one."""


MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE keys (
            id TEXT PRIMARY KEY,
            name TEXT NOT NULL,
            prefix TEXT NOT NULL,
            digest TEXT NOT NULL UNIQUE,
            models TEXT NOT NULL DEFAULT '[]',
            rpm INTEGER, tpm INTEGER, max_concurrency INTEGER,
            budget_tokens INTEGER, budget_usd REAL,
            budget_period TEXT CHECK (budget_period IN ('day', 'week', 'month', 'total')),
            expires_at REAL, revoked_at REAL,
            created_at REAL NOT NULL, updated_at REAL NOT NULL,
            metadata TEXT NOT NULL DEFAULT '{}'
        )""",
        """CREATE TABLE usage (
            id INTEGER PRIMARY KEY,
            ts REAL NOT NULL,
            request_id TEXT NOT NULL,
            key_id TEXT, model TEXT, provider TEXT, upstream_model TEXT,
            endpoint TEXT NOT NULL,
            stream INTEGER NOT NULL,
            status INTEGER NOT NULL,
            prompt_tokens INTEGER NOT NULL DEFAULT 0,
            completion_tokens INTEGER NOT NULL DEFAULT 0,
            total_tokens INTEGER NOT NULL DEFAULT 0,
            cost_usd REAL NOT NULL DEFAULT 0,
            latency_ms REAL NOT NULL DEFAULT 0,
            ttft_ms REAL,
            estimated INTEGER NOT NULL DEFAULT 0
        )""",
        "CREATE INDEX usage_ts ON usage (ts)",
        "CREATE INDEX usage_key_ts ON usage (key_id, ts)",
    ),
    (
        # Keys may belong to a config group (its limits and budget are their defaults).
        "ALTER TABLE keys ADD COLUMN group_name TEXT",
        "ALTER TABLE keys ADD COLUMN notes TEXT NOT NULL DEFAULT ''",
    ),
    (
        # Prompt-cache reads and writes, part of prompt_tokens, priced apart (#15).
        "ALTER TABLE usage ADD COLUMN cache_read_tokens INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE usage ADD COLUMN cache_write_tokens INTEGER NOT NULL DEFAULT 0",
    ),
    (
        # Refused requests: one row per minute, key and status (gateway.refusals).
        """CREATE TABLE refusals (
            minute INTEGER NOT NULL,
            key_id TEXT NOT NULL,
            status INTEGER NOT NULL,
            count INTEGER NOT NULL,
            PRIMARY KEY (minute, key_id, status)
        )""",
    ),
    (
        # The dashboard (gateway.dashboard.queries). Its charts over hours read ranges of
        # usage through a covering index; over days, and its top lists, a daily rollup that
        # `Store.insert_usage` adds each batch of rows to, in the same transaction (filled
        # here from the rows already there), so a year is a few thousand rows. A key's page
        # reads its own rows by key (usage_key_ts), and its refusals by key.
        """CREATE INDEX usage_ts_cover ON usage
            (ts, key_id, model, status, total_tokens, cost_usd)""",
        "CREATE INDEX refusals_key ON refusals (key_id, minute)",
        """CREATE TABLE usage_daily (
            day INTEGER NOT NULL,
            key_id TEXT NOT NULL,
            model TEXT NOT NULL,
            requests INTEGER NOT NULL,
            errors INTEGER NOT NULL,
            tokens INTEGER NOT NULL,
            cost_usd REAL NOT NULL,
            PRIMARY KEY (day, key_id, model)
        ) WITHOUT ROWID""",
        """INSERT INTO usage_daily
            SELECT CAST(ts / 86400 AS INTEGER), COALESCE(key_id, ''), COALESCE(model, ''),
                COUNT(*), SUM(status >= 400), SUM(total_tokens), TOTAL(cost_usd)
            FROM usage GROUP BY 1, 2, 3""",
    ),
)


async def pragma(db: aiosqlite.Connection, pragma: str) -> Any:
    """Run `PRAGMA <pragma>` and return its first value, if any.

    Every row is fetched: aiosqlite's worker thread keeps the last cursor alive, and a statement
    left unfinished holds a read transaction open (which blocks e.g. leaving WAL mode).
    """
    rows = list(await db.execute_fetchall(f"PRAGMA {pragma}"))
    return rows[0][0] if rows else None


async def _user_version(db: aiosqlite.Connection) -> int:
    return int(await pragma(db, "user_version"))


async def migrate(db: aiosqlite.Connection) -> None:
    """Apply the steps past the database's `user_version`, all in one transaction."""
    if await _user_version(db) == len(MIGRATIONS):
        return
    await db.execute("BEGIN IMMEDIATE")
    try:
        # Re-read under the write lock: another process may have migrated meanwhile.
        version = await _user_version(db)
        if version > len(MIGRATIONS):
            raise StoreError(
                f"database schema version {version} is newer than this gateway understands"
                f" ({len(MIGRATIONS)}); upgrade the gateway"
            )
        for number, step in enumerate(MIGRATIONS[version:], start=version + 1):
            for statement in step:
                await db.execute(statement)
            # PRAGMA takes no bound parameters; `number` is an int we computed.
            await pragma(db, f"user_version = {number}")
    except BaseException:
        await db.rollback()
        raise
    await db.commit()
