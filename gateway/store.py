"""SQLite persistence over one aiosqlite connection: schema migrations, virtual keys, usage rows.

Only the SHA-256 digest of a key's secret is stored. Writes are serialised by one lock and run
in `BEGIN IMMEDIATE` transactions, so the server and the CLI (another connection, possibly
another process) never interleave half-done changes; WAL lets readers go on meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from typing import Any, Literal, TypeVar, cast

import aiosqlite

from gateway.errors import NotFound, StoreBusy
from gateway.migrations import StoreError, migrate, pragma
from gateway.records import KeyRecord, UsageRecord, UsageSummaryRow
from gateway.refusals import Refusals
from gateway.reports import summarize, summarize_key
from gateway.rows import (
    KEY_COLUMNS as _KEY_FIELDS,
    SECRET_PREFIX,
    editable,
    key_from_row,
    key_params,
    new_key,
    updated_key,
)
from gateway.sqlite_copy import INSERT_KEY, KEEP_STORED, SqliteCopies
from gateway.sqlite_usage import ADD_REFUSALS, usage_statements, write_usage
from gateway.stored_share import (
    FILES_SQL,
    FORGET_SQL,
    LOOKUP_AT_ONCE,
    SELECT_STORED,
    StoredRow,
)

T = TypeVar("T")

__all__ = ["SECRET_PREFIX", "DatabaseMoved", "Store", "StoreError", "open_store"]


_KEY_COLUMNS = ", ".join(_KEY_FIELDS)
# A record's fields are its table's columns; queries name them explicitly. S608 is silenced
# where SQL is built from these constants: values are always bound parameters.
_SELECT_KEY = f"SELECT {_KEY_COLUMNS} FROM keys"  # noqa: S608
_UPDATE_KEY = f"UPDATE keys SET {', '.join(f'{f} = ?' for f in _KEY_FIELDS)} WHERE id = ?"  # noqa: S608
# SQLite's result codes for a database another connection has locked.
_BUSY_CODES = (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)


@contextlib.contextmanager
def _busy_is_503() -> Iterator[None]:
    """A locked database (another process writing, a backup) as `StoreBusy`, not a 500."""
    try:
        yield
    except sqlite3.OperationalError as exc:
        if getattr(exc, "sqlite_errorcode", 0) & 0xFF in _BUSY_CODES:
            raise StoreBusy(
                "The database is busy (locked by another process); try again shortly.",
                retry_after=1.0,
            ) from None
        raise


class Store(SqliteCopies):
    """The gateway's database. Create with `await Store.open(path)` or `open_store(path)`.

    `db` is the underlying connection, exposed for tests and ad-hoc reads; write through the
    methods so the lock and transactions hold.
    """

    def __init__(self, db: aiosqlite.Connection, path: str) -> None:
        self.db = db
        self.path = path
        self._write_lock = asyncio.Lock()
        # The file the connection opened (device, inode), None for an in-memory database.
        self._file = _file_id(path)

    @classmethod
    async def open(cls, path: str, *, busy_timeout: float = 5.0) -> Store:
        """Open (creating if missing, readable by its owner only) the database at `path` and
        bring its schema up to date.

        Args:
            busy_timeout: how long a statement waits for another connection's lock. The
                server keeps it short: its one connection serves every query in turn, so a
                wait there would stall them all (a busy write is retried or answered 503).

        Raises:
            sqlite3.Error: the file cannot be opened or is not a database.
            StoreError: the schema is newer than this code.
        """
        # When aiosqlite fails to connect it leaves its worker thread to report to an event
        # loop that may be gone (a CLI typo in --db ends in a thread traceback), so try the
        # path with plain sqlite3 first, off the loop.
        await asyncio.to_thread(_probe, path)
        db = await aiosqlite.connect(path)
        try:
            # busy_timeout first: switching to WAL itself waits on other connections' locks.
            busy = f"busy_timeout = {round(busy_timeout * 1000)}"
            for setting in (busy, "journal_mode = WAL", "synchronous = NORMAL"):
                await pragma(db, setting)
            await pragma(db, "foreign_keys = ON")
            await migrate(db)
        except BaseException:
            await db.close()
            raise
        return cls(db, path)

    async def close(self) -> None:
        await self.db.close()

    @contextlib.asynccontextmanager
    async def _transaction(self) -> AsyncIterator[aiosqlite.Connection]:
        async with self._write_lock:
            with _busy_is_503():
                try:
                    # IMMEDIATE takes the write lock up front, so a read-modify-write cannot
                    # lose a race with another process (the CLI) between its read and its write.
                    await self.db.execute("BEGIN IMMEDIATE")
                    await self._execute(self._check_file)
                    yield self.db
                    await self.db.commit()
                except BaseException:
                    # BEGIN too: cancelled while it waits for another process's lock, it still
                    # runs in aiosqlite's thread, and the transaction it opens would hold the
                    # write lock until the connection closes (every later BEGIN here an error,
                    # every write of another process busy). Queued after it, this ends it.
                    await self.db.rollback()
                    raise

    def _check_file(self) -> None:
        """Raise `DatabaseMoved` when the path no longer names the file the connection has
        open: it was deleted, moved or replaced while the server ran, and what the connection
        writes would go to a file no one reads again (deleted: gone with the process).

        Raises:
            DatabaseMoved: see above.
        """
        if self._file is not None and _file_id(self.path) != self._file:
            raise DatabaseMoved(
                f"the database file {self.path} was deleted or replaced while the server ran;"
                " restart it to use the file now at that path"
            )

    @property
    def _execute(self) -> Callable[..., Awaitable[Any]]:
        """Run a function in aiosqlite's thread (its `_execute`, which its own methods use:
        no public call runs a function there)."""
        return cast(Callable[..., Awaitable[Any]], self.db._execute)

    dialect = "sqlite"

    def on_change(self, callback: Callable[[], None]) -> None:
        """SQLite cannot push changes: key caches poll `data_version` instead."""

    async def ping(self) -> None:
        async with self.db.execute("SELECT 1") as cur:
            await cur.fetchone()

    async def data_version(self) -> int:
        """A number that changes whenever *another* connection commits (not this one)."""
        return int(await pragma(self.db, "data_version"))

    # Keys

    async def create_key(
        self, *, name: str, secret: str | None = None, **fields: Any
    ) -> tuple[KeyRecord, str]:
        """Create a key and return it with its plain secret, which is never stored or shown again.

        Args:
            name: what people call the key.
            secret: use this secret instead of a random one (the sample database's demo key).
            fields: any other editable `KeyRecord` field (models, limits, budget, expiry, ...).

        Raises:
            InvalidRequest: a field does not exist, is not the caller's to set, or has the
                wrong type.
        """
        record, secret = new_key(name, secret, fields)
        async with self._transaction() as db:
            await db.execute(INSERT_KEY, key_params(record))
        return record, secret

    async def list_keys(self) -> list[KeyRecord]:
        """Every key, revoked and expired ones included, oldest first."""
        with _busy_is_503():
            async with self.db.execute(f"{_SELECT_KEY} ORDER BY created_at, id") as cur:
                return [key_from_row(row) for row in await cur.fetchall()]

    async def get_key(self, key_id: str) -> KeyRecord | None:
        with _busy_is_503():
            async with self.db.execute(f"{_SELECT_KEY} WHERE id = ?", (key_id,)) as cur:
                row = await cur.fetchone()
        return None if row is None else key_from_row(row)

    async def require_key(self, key_id: str) -> KeyRecord:
        """The key with `key_id`.

        Raises:
            NotFound: no such key (code `key_not_found`).
        """
        key = await self.get_key(key_id)
        if key is None:
            raise NotFound(f"No key with id {key_id!r}.", code="key_not_found")
        return key

    async def update_key(self, key_id: str, /, **changes: Any) -> KeyRecord:
        """Change a key's name, models, limits, budget, expiry or metadata; `None` clears a limit.

        Raises:
            NotFound: no key has this id (code `key_not_found`).
            InvalidRequest: a field cannot be changed or has the wrong type.
        """
        editable(dict(changes))  # refuse bad fields before taking the write lock
        async with self._transaction() as db:
            current = await self.require_key(key_id)
            updated = updated_key(current, changes)
            await db.execute(_UPDATE_KEY, (*key_params(updated), key_id))
        return updated

    async def revoke_key(self, key_id: str) -> KeyRecord:
        """Revoke a key for good. Revoking a revoked key changes nothing.

        Raises:
            NotFound: no key has this id (code `key_not_found`).
        """
        now = time.time()
        async with self._transaction() as db:
            await db.execute(
                "UPDATE keys SET revoked_at = ?, updated_at = ?"
                " WHERE id = ? AND revoked_at IS NULL",
                (now, now, key_id),
            )
            return await self.require_key(key_id)

    # Usage

    async def insert_usage(self, rows: Sequence[UsageRecord], *, fresh: bool = False) -> None:
        """Append usage rows, and add them to the daily rollup, in one transaction (all or none).

        Rows already written (same `uid`, from a batch retried after a lost commit) are
        skipped, and so left out of the rollup: the write lock keeps anyone from adding
        them between the look and the insert. `fresh`: the caller knows none of the rows
        was handed to this method before (the usage recorder does), so none can be there
        and the look is skipped."""
        if not rows:
            return
        prepared = usage_statements(rows) if fresh else None
        async with self._write_lock:
            with _busy_is_503():
                # The whole transaction in one hand-off to aiosqlite's thread (its `_execute`,
                # which its own methods use: no public call runs a function there), where
                # BEGIN, each INSERT, the rollup and COMMIT were a hand-off and a wake-up
                # of the loop each. Cancelled meanwhile, it still ends there, committed or
                # rolled back: never a transaction left open.
                await self._execute(
                    _in_transaction, self.db._conn, self._write_usage, rows, prepared
                )

    def _write_usage(self, conn: sqlite3.Connection, *args: Any) -> None:
        self._check_file()
        write_usage(conn, *args)

    async def add_refusals(self, counts: Refusals) -> None:
        """Add refused-request counts to their (minute, key, status) rows, in one transaction."""
        params = [(*entry, n) for entry, n in counts.items()]
        async with self._transaction() as db:
            await db.executemany(ADD_REFUSALS, params)

    async def spend_since(self, key_id: str, since: float) -> tuple[int, float]:
        """Tokens and USD a key has used since a unix time (its budget period's start)."""
        async with self.db.execute(
            "SELECT TOTAL(total_tokens), TOTAL(cost_usd) FROM usage WHERE key_id = ? AND ts >= ?",
            (key_id, since),
        ) as cur:
            row = await cur.fetchone()
        return (int(row[0]), float(row[1])) if row else (0, 0.0)

    async def usage_summary(
        self,
        *,
        since: float | None = None,
        until: float | None = None,
        key_id: str | None = None,
        by: Literal["key", "model", "day"] = "key",
    ) -> list[UsageSummaryRow]:
        """Requests, errors (status >= 400), tokens, cost and latency percentiles per group.

        Args:
            since: unix time, inclusive. until: unix time, exclusive.
            by: group by key id, model id, or UTC day (`YYYY-MM-DD`).
        """
        with _busy_is_503():
            return await summarize(self.db, since=since, until=until, key_id=key_id, by=by)

    async def key_summary(
        self, key_id: str, *, since: float, until: float
    ) -> tuple[list[UsageSummaryRow], UsageSummaryRow | None]:
        """A key's `usage_summary` by model, and its whole (None without a request), from
        one read of its rows (the dashboard's key page)."""
        with _busy_is_503():
            return await summarize_key(self.db, key_id, since=since, until=until)

    # What upstreams store for each key (`gateway.stored_share`)

    async def keep_stored(self, rows: Sequence[StoredRow]) -> list[StoredRow]:
        """Write ids and their owners, in one transaction; the rows the database kept of them
        (the first owner stays: `upsert_sql`), read in it."""
        async with self._write_lock:
            with _busy_is_503():
                kept: list[StoredRow] = await self._execute(
                    _in_transaction, self.db._conn, _keep_stored, rows
                )
        return kept

    async def stored_owners(self, ids: Sequence[str]) -> list[StoredRow]:
        """The rows of those of `ids` the database holds."""
        with _busy_is_503():
            async with self.db.execute(_stored_rows_sql(len(ids)), tuple(ids)) as cur:
                return _stored_rows(await cur.fetchall())

    async def forget_stored(self, before: float) -> None:
        """Forget the ids last written before a unix time."""
        async with self._transaction() as db:
            await db.execute(FORGET_SQL.format("?"), (before,))

    async def stored_files(self) -> bool:
        """Whether the database holds a file an upstream's code wrote."""
        async with self.db.execute(FILES_SQL) as cur:
            return await cur.fetchone() is not None

    async def fetch(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """The rows of a read-only query (`?` placeholders): the dashboard's
        (`gateway.dashboard.queries`)."""
        with _busy_is_503():
            async with self.db.execute(sql, params) as cur:
                return [tuple(row) for row in await cur.fetchall()]


def _stored_rows_sql(count: int) -> str:
    """The rows of `count` ids (bound in its placeholders)."""
    return f"{SELECT_STORED} WHERE id IN ({', '.join('?' * count)})"


def _stored_rows(rows: Iterable[Sequence[Any]]) -> list[StoredRow]:
    """The rows of `_stored_rows_sql` as `StoredRow`s."""
    return [(r[0], r[1], r[2], r[3], r[4]) for r in rows]


def _keep_stored(conn: sqlite3.Connection, rows: Sequence[StoredRow]) -> list[StoredRow]:
    conn.executemany(KEEP_STORED, rows)
    kept: list[StoredRow] = []
    for start in range(0, len(rows), LOOKUP_AT_ONCE):
        ids = [row[0] for row in rows[start : start + LOOKUP_AT_ONCE]]
        kept += _stored_rows(conn.execute(_stored_rows_sql(len(ids)), ids))
    return kept


def _in_transaction(conn: sqlite3.Connection, write: Callable[..., T], *args: Any) -> T:
    """`write(conn, *args)` in a `BEGIN IMMEDIATE` transaction, committed, or rolled back if it
    fails; in aiosqlite's thread. Its answer."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        done = write(conn, *args)
        conn.commit()
    except BaseException:
        conn.rollback()
        raise
    return done


class DatabaseMoved(StoreError):
    """The database file was deleted or replaced under the running server."""


def _file_id(path: str) -> tuple[int, int] | None:
    """The (device, inode) of the file at `path`; None for an in-memory or URI database,
    and (0, 0) when nothing is there."""
    if path == ":memory:" or path.startswith("file:"):
        return None
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return (0, 0)
    return (st.st_dev, st.st_ino)


def _probe(path: str) -> None:
    if path != ":memory:" and not path.startswith("file:"):
        # Created by us, for the owner only: SQLite gives the -wal and -shm files the same mode.
        with contextlib.suppress(OSError):  # exists already, or sqlite3 says why not
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    sqlite3.connect(path).close()


@contextlib.asynccontextmanager
async def open_store(path: str) -> AsyncIterator[Store]:
    """`async with open_store(path) as store:` opens, migrates, and always closes."""
    store = await Store.open(path)
    try:
        yield store
    finally:
        await store.close()
