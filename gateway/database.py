"""The storage interface the gateway runs on, and `open_database`, which picks the backend.

`[server] database` is a SQLite path (`gateway.store`, the default: one box, one file) or a
`postgresql://` URL (`gateway.pg_store`: several replicas share one database). Both keep the
same schema (`gateway.migrations`) and the same methods, so the server, the CLI and the admin
API never ask which one they have.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, Literal, Protocol

from gateway.dburl import is_postgres_url, problem as database_problem
from gateway.pg_store import PgStore
from gateway.records import KeyRecord, UsageRecord, UsageSummaryRow
from gateway.refusals import Refusals
from gateway.store import Store, StoreError
from gateway.stored_share import StoredRow

__all__ = ["Database", "is_postgres_url", "open_database", "opened_database"]


class Database(Protocol):
    """What the gateway needs from its database (see `gateway.store.Store` for each method)."""

    path: str  # the SQLite path or the PostgreSQL URL
    dialect: str

    async def close(self) -> None: ...
    async def ping(self) -> None: ...
    async def data_version(self) -> int: ...
    def on_change(self, callback: Callable[[], None]) -> None: ...
    async def create_key(
        self, *, name: str, secret: str | None = None, **fields: Any
    ) -> tuple[KeyRecord, str]: ...
    async def list_keys(self) -> list[KeyRecord]: ...
    async def get_key(self, key_id: str) -> KeyRecord | None: ...
    async def require_key(self, key_id: str) -> KeyRecord: ...
    async def update_key(self, key_id: str, /, **changes: Any) -> KeyRecord: ...
    async def revoke_key(self, key_id: str) -> KeyRecord: ...
    async def insert_usage(self, rows: Sequence[UsageRecord], *, fresh: bool = False) -> None: ...
    async def add_refusals(self, counts: Refusals) -> None: ...
    async def spend_since(self, key_id: str, since: float) -> tuple[int, float]: ...
    async def usage_summary(
        self,
        *,
        since: float | None = None,
        until: float | None = None,
        key_id: str | None = None,
        by: Literal["key", "model", "day"] = "key",
    ) -> list[UsageSummaryRow]: ...
    async def key_summary(
        self, key_id: str, *, since: float, until: float
    ) -> tuple[list[UsageSummaryRow], UsageSummaryRow | None]: ...
    async def keep_stored(self, rows: Sequence[StoredRow]) -> Sequence[StoredRow]: ...
    async def stored_owners(self, ids: Sequence[str]) -> list[StoredRow]: ...
    async def forget_stored(self, before: float) -> None: ...
    async def stored_files(self) -> bool: ...
    async def fetch(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]: ...
    async def is_empty(self) -> bool: ...
    async def import_rows(
        self,
        keys: Sequence[KeyRecord],
        usage: AsyncIterator[list[UsageRecord]],
        refusals: Refusals,
        stored: AsyncIterator[list[StoredRow]] | None = None,
    ) -> tuple[int, int]: ...
    def export_usage(self, batch: int = 5000) -> AsyncIterator[list[UsageRecord]]: ...
    async def export_refusals(self) -> Refusals: ...
    def export_stored(self, batch: int = 5000) -> AsyncIterator[list[StoredRow]]: ...


async def open_database(database: str, *, busy_timeout: float = 5.0) -> Database:
    """Open (and migrate) the database `[server] database` names.

    Args:
        busy_timeout: SQLite only, see `gateway.store.Store.open`.

    Raises:
        sqlite3.Error: a SQLite file that cannot be opened.
        StoreError: an unreachable PostgreSQL, or a schema newer than this code.
    """
    problem = database_problem(database)  # (its words never repeat the URL: a password)
    if problem is not None:
        raise StoreError(problem)
    if is_postgres_url(database):
        return await PgStore.open(database)
    return await Store.open(database, busy_timeout=busy_timeout)


@contextlib.asynccontextmanager
async def opened_database(database: str) -> AsyncIterator[Database]:
    """`async with opened_database(path_or_url) as db:` opens, migrates, and always closes."""
    db = await open_database(database)
    try:
        yield db
    finally:
        await db.close()
