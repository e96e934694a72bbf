"""The migration steps of `gateway.migrations` applied to PostgreSQL: the version lives in the
`schema_version` table, and an advisory lock lets replicas that start together migrate once."""

from __future__ import annotations

from gateway.migrations import MIGRATIONS, StoreError, statements
from gateway.pg_reports import Conn

__all__ = ["migrate"]

# Any fixed number: every gateway takes this advisory lock around its migrations.
_MIGRATION_LOCK = 0x6B696F736B  # "kiosk"


async def migrate(conn: Conn) -> None:
    """Apply the steps past the database's schema version, all in one transaction, under an
    advisory lock (replicas starting together wait for the first one's migration)."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK)
        await conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        version = await conn.fetchval("SELECT version FROM schema_version")
        if version is None:
            await conn.execute("INSERT INTO schema_version (version) VALUES (0)")
            version = 0
        if version > len(MIGRATIONS):
            raise StoreError(
                f"database schema version {version} is newer than this gateway understands"
                f" ({len(MIGRATIONS)}); upgrade the gateway"
            )
        for step in MIGRATIONS[version:]:
            for statement in statements(step, "postgres"):
                await conn.execute(statement)
        await conn.execute("UPDATE schema_version SET version = $1", len(MIGRATIONS))
