"""PostgreSQL persistence through asyncpg: the same schema, methods and rules as `gateway.store`.

Used when `[server] database` is a `postgresql://` URL, so several replicas share keys, usage
and refusal counts. Migrations run under a transaction-level advisory lock, so replicas that
start together apply them once. Key changes (any replica, the CLI, hand-written SQL) bump
`key_changes.version` and `NOTIFY kiosk_keys` (a trigger); `on_change` listens on a connection
of its own (`gateway.pg_listen`), and `data_version` (polled by the key cache every second) is
the safety net that also re-opens that connection after a database restart. Usage rows carry
a unique `uid` and are inserted `ON CONFLICT DO NOTHING`, so a batch retried after a lost
commit is written once.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import typing
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any, Literal

import asyncpg
import msgspec

from gateway.background import mark_seen
from gateway.dburl import passwords
from gateway.errors import NotFound, StoreBusy
from gateway.migrations import FILL_DAILY, StoreError
from gateway.pg_listen import KeyListener
from gateway.pg_migrate import migrate
from gateway.pg_reports import Conn, summarize
from gateway.records import KeyRecord, UsageRecord, UsageSummaryRow
from gateway.refusals import Refusals
from gateway.rows import (
    COPIED_TABLES,
    KEY_COLUMNS,
    USAGE_COLUMNS,
    key_from_row,
    key_params,
    new_key,
    updated_key,
    usage_from_row,
)
from gateway.stored_share import (
    EXPORT_STORED,
    FILES_SQL,
    FORGET_SQL,
    SELECT_STORED,
    StoredRow,
    upsert_sql,
)

__all__ = ["PgStore"]

# Any fixed number: every gateway takes this advisory lock around its migrations.
_CONNECT_TIMEOUT = 5.0  # a database that does not answer is an error, never a hang
_COMMAND_TIMEOUT = 30.0

_KEY_FIELDS = KEY_COLUMNS
_USAGE_FIELDS = USAGE_COLUMNS


def _marks(count: int, start: int = 1) -> str:
    return ", ".join(f"${n}" for n in range(start, start + count))


_SELECT_KEY = f"SELECT {', '.join(_KEY_FIELDS)} FROM keys"  # noqa: S608
_INSERT_KEY = f"INSERT INTO keys ({', '.join(_KEY_FIELDS)}) VALUES ({_marks(len(_KEY_FIELDS))})"  # noqa: S608
_UPDATE_KEY = (
    f"UPDATE keys SET {', '.join(f'{f} = ${n}' for n, f in enumerate(_KEY_FIELDS, 1))}"  # noqa: S608
    f" WHERE id = ${len(_KEY_FIELDS) + 1}"
)
_INSERT_USAGE = (
    f"INSERT INTO usage ({', '.join(_USAGE_FIELDS)}) VALUES ({_marks(len(_USAGE_FIELDS))})"  # noqa: S608
    " ON CONFLICT (uid) DO NOTHING"
)
# A batch's columns as arrays (one parameter each), of these element types.
_ARRAY_TYPES = {float: "float8", int: "int8", bool: "int8", str: "text"}


def _array_type(kind: Any) -> str:
    """`float | None` -> its array's element type."""
    plain = [t for t in typing.get_args(kind) if t is not type(None)] or [kind]
    return _ARRAY_TYPES[plain[0]]


_HINTS = typing.get_type_hints(UsageRecord)
_UNNEST = ", ".join(f"${n}::{_array_type(_HINTS[f])}[]" for n, f in enumerate(_USAGE_FIELDS, 1))
# A batch in one statement: its rows, then the daily rollup (migration step 5) of the rows
# actually inserted (a uid written before, by a retried batch, is skipped in both), one upsert
# per day, key and model, taken in order so replicas writing at once never deadlock.
_KEEP_STORED = upsert_sql(("$1", "$2", "$3", "$4", "$5"))
_STORED_OWNERS = f"{SELECT_STORED} WHERE id = ANY($1::text[])"
_INSERT_USAGE_BATCH = (
    f"WITH new AS (INSERT INTO usage ({', '.join(_USAGE_FIELDS)}) SELECT * FROM unnest({_UNNEST})"  # noqa: S608
    " ON CONFLICT (uid) DO NOTHING RETURNING ts, key_id, model, status, total_tokens, cost_usd)"
    " INSERT INTO usage_daily (day, key_id, model, requests, errors, tokens, cost_usd)"
    " SELECT floor(ts / 86400)::bigint, COALESCE(key_id, ''), COALESCE(model, ''), COUNT(*),"
    " SUM((status >= 400)::int), SUM(total_tokens), SUM(cost_usd) FROM new"
    " GROUP BY 1, 2, 3 ORDER BY 1, 2, 3"
    " ON CONFLICT (day, key_id, model) DO UPDATE SET"
    " requests = usage_daily.requests + excluded.requests,"
    " errors = usage_daily.errors + excluded.errors,"
    " tokens = usage_daily.tokens + excluded.tokens,"
    " cost_usd = usage_daily.cost_usd + excluded.cost_usd"
)
_ADD_REFUSALS = (
    "INSERT INTO refusals (minute, key_id, status, count) VALUES ($1, $2, $3, $4)"
    " ON CONFLICT (minute, key_id, status) DO UPDATE SET count = refusals.count + excluded.count"
)
# Errors meaning "the database is not reachable right now", not "this query is wrong".
_UNAVAILABLE = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.OperatorInterventionError,  # starting up, shutting down (admin_shutdown...)
    # A new connection refused its sign-in (a password changed under the running server,
    # the operator fixing it): down for now, not a failure of the request.
    asyncpg.InvalidAuthorizationSpecificationError,
)


def _connection_broke(exc: asyncpg.InternalClientError) -> bool:
    """Whether asyncpg's `InternalClientError` says that a connection's exchange with its server
    broke off (not that asyncpg was misused, or met a value it cannot encode: those stay 500s).

    A backend ended (`pg_terminate_backend`, a restart) sends its FATAL error and then closes
    the socket. When the error arrives while the connection waits in the pool, asyncpg's
    protocol is left in its error state, and the next query started before the close is seen
    (its own, or the pool's reset on release) is refused by the protocol's state machine:
    `cannot switch to state 11; another operation (2) is in progress` (asyncpg 0.32); a
    connection already marked failed says `... protocol is in the "failed" state`. Both are
    raised by that state machine alone, with these words."""
    return str(exc).startswith("cannot switch to ")


@contextlib.contextmanager
def _unavailable_is_503() -> Iterator[None]:
    """A database that is down or restarting, or a connection lost as a query starts, as
    `StoreBusy` (503 with Retry-After), not a 500."""
    try:
        yield
    except (*_UNAVAILABLE, asyncpg.InternalClientError) as exc:
        if isinstance(exc, asyncpg.InternalClientError) and not _connection_broke(exc):
            raise
        raise StoreBusy(
            f"The database is unavailable ({type(exc).__name__}); try again shortly.",
            retry_after=1.0,
        ) from None


def _no_nul(key_id: str) -> None:
    """No key id holds a NUL (PostgreSQL's text cannot): such an id is an unknown key, found
    without sending PostgreSQL a parameter it would refuse."""
    if "\x00" in key_id:
        raise NotFound(f"No key with id {key_id!r}.", code="key_not_found")


def _usage_params(row: UsageRecord) -> tuple[Any, ...]:
    """The row's values for asyncpg: flags as integers, and a NUL character (a client's model
    name may hold one; PostgreSQL's text cannot) as U+FFFD, so one row never fails its batch."""
    out = [
        v.replace("\x00", "\ufffd") if isinstance(v, str) and "\x00" in v else v
        for v in msgspec.structs.astuple(row)
    ]
    index = _USAGE_FIELDS.index
    out[index("stream")], out[index("estimated")] = int(row.stream), int(row.estimated)
    return tuple(out)


class PgStore:
    """The gateway's database on PostgreSQL. Create with `await PgStore.open(url)`."""

    dialect = "postgres"

    def __init__(self, pool: asyncpg.Pool, url: str) -> None:
        self.pool = pool
        self.path = url
        self._listener = KeyListener(url, _CONNECT_TIMEOUT)
        self._ping: asyncio.Task[object] | None = None

    @classmethod
    async def open(cls, url: str) -> PgStore:
        """Connect and bring the schema up to date.

        Raises:
            StoreError: the database is unreachable or its schema is newer than this code.
        """
        try:
            pool = await asyncpg.create_pool(
                url,
                min_size=1,
                max_size=8,
                timeout=_CONNECT_TIMEOUT,
                command_timeout=_COMMAND_TIMEOUT,
            )
        except (*_UNAVAILABLE, asyncpg.PostgresError, ValueError) as exc:
            message = str(exc) or type(exc).__name__  # (a timeout says nothing)
            for shown in passwords(url):
                message = message.replace(shown, "***")
            raise StoreError(f"cannot connect to PostgreSQL: {message}") from None
        try:
            async with pool.acquire() as conn:
                await migrate(conn)
        except BaseException:
            await pool.close()
            raise
        return cls(pool, url)

    async def close(self) -> None:
        """Close every connection; a server that does not answer gets them cut."""
        await self._listener.close()
        try:
            async with asyncio.timeout(_CONNECT_TIMEOUT):
                await self.pool.close()
        except TimeoutError:
            self.pool.terminate()

    async def ping(self) -> None:
        """`SELECT 1`, at most one at a time. A caller that stops waiting (`/readyz`'s bound)
        returns at once: asyncpg's cancellation of a query on a hung server itself waits for
        the server, so the query is left to finish or time out on its own."""
        if self._ping is None or self._ping.done():
            self._ping = asyncio.create_task(self.pool.fetchval("SELECT 1"))
            self._ping.add_done_callback(mark_seen)
        await asyncio.shield(self._ping)

    # Key changes

    def on_change(self, callback: Callable[[], None]) -> None:
        """Call `callback` (on the loop) whenever any connection changes the keys. The listening
        connection opens at the next `data_version()` and re-opens there after a loss."""
        self._listener.callbacks.append(callback)

    async def data_version(self) -> int:
        """A number that changes whenever any connection changes the keys."""
        await self._listener.ensure()
        version: int = await self.pool.fetchval("SELECT version FROM key_changes")
        return version

    # Keys

    async def create_key(
        self, *, name: str, secret: str | None = None, **fields: Any
    ) -> tuple[KeyRecord, str]:
        """See `gateway.store.Store.create_key`."""
        record, secret = new_key(name, secret, fields)
        with _unavailable_is_503():
            await self.pool.execute(_INSERT_KEY, *key_params(record))
        return record, secret

    async def list_keys(self) -> list[KeyRecord]:
        with _unavailable_is_503():
            rows = await self.pool.fetch(f"{_SELECT_KEY} ORDER BY created_at, id")
        return [key_from_row(tuple(row)) for row in rows]

    async def get_key(self, key_id: str) -> KeyRecord | None:
        if "\x00" in key_id:
            return None
        with _unavailable_is_503():
            row = await self.pool.fetchrow(f"{_SELECT_KEY} WHERE id = $1", key_id)
        return None if row is None else key_from_row(tuple(row))

    async def require_key(self, key_id: str) -> KeyRecord:
        key = await self.get_key(key_id)
        if key is None:
            raise NotFound(f"No key with id {key_id!r}.", code="key_not_found")
        return key

    async def update_key(self, key_id: str, /, **changes: Any) -> KeyRecord:
        """See `gateway.store.Store.update_key`; the row is locked from read to write."""
        _no_nul(key_id)
        with _unavailable_is_503():
            async with self.pool.acquire() as conn, conn.transaction():
                row = await conn.fetchrow(f"{_SELECT_KEY} WHERE id = $1 FOR UPDATE", key_id)
                if row is None:
                    raise NotFound(f"No key with id {key_id!r}.", code="key_not_found")
                updated = updated_key(key_from_row(tuple(row)), changes)
                await conn.execute(_UPDATE_KEY, *key_params(updated), key_id)
        return updated

    async def revoke_key(self, key_id: str) -> KeyRecord:
        _no_nul(key_id)
        now = time.time()
        with _unavailable_is_503():
            await self.pool.execute(
                "UPDATE keys SET revoked_at = $1, updated_at = $1"
                " WHERE id = $2 AND revoked_at IS NULL",
                now,
                key_id,
            )
        return await self.require_key(key_id)

    # Usage

    async def insert_usage(self, rows: Sequence[UsageRecord], *, fresh: bool = False) -> None:
        """Append usage rows, and add them to the daily rollup, in one transaction (all or
        none); rows already written (same `uid`, from a retried batch) are skipped, in the
        rollup too (by the one statement, whatever `fresh` says)."""
        if not rows:
            return
        async with self.pool.acquire() as conn, conn.transaction():
            columns = list(zip(*(_usage_params(r) for r in rows), strict=True))
            await conn.execute(_INSERT_USAGE_BATCH, *columns)

    async def add_refusals(self, counts: Refusals) -> None:
        # In key order, as the daily rollup's: two replicas adding to the same rows in
        # different orders deadlocked (PostgreSQL aborts one; its counts wait for a retry).
        params = sorted((*entry, n) for entry, n in counts.items())
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.executemany(_ADD_REFUSALS, params)

    async def spend_since(self, key_id: str, since: float) -> tuple[int, float]:
        """(A down database is `StoreBusy`: a Redis-shared budget seeded from here must not
        take it for Redis being down.)"""
        with _unavailable_is_503():
            row = await self.pool.fetchrow(
                "SELECT COALESCE(SUM(total_tokens), 0)::float8, COALESCE(SUM(cost_usd), 0)::float8"
                " FROM usage WHERE key_id = $1 AND ts >= $2",
                key_id,
                since,
            )
        return (int(row[0]), float(row[1])) if row else (0, 0.0)

    async def usage_summary(
        self,
        *,
        since: float | None = None,
        until: float | None = None,
        key_id: str | None = None,
        by: Literal["key", "model", "day"] = "key",
    ) -> list[UsageSummaryRow]:
        with _unavailable_is_503():
            async with self.pool.acquire() as conn:
                return await summarize(conn, since=since, until=until, key_id=key_id, by=by)

    async def key_summary(
        self, key_id: str, *, since: float, until: float
    ) -> tuple[list[UsageSummaryRow], UsageSummaryRow | None]:
        """A key's `usage_summary` by model, and its whole (PostgreSQL's percentiles are in
        SQL: two reports), its figures the models' summed as on SQLite (counts as integers,
        the cost exactly rounded)."""
        with _unavailable_is_503():
            async with self.pool.acquire() as conn:
                rows = await summarize(conn, since=since, until=until, key_id=key_id, by="model")
                whole = await summarize(conn, since=since, until=until, key_id=key_id, by="key")
        if not whole:
            return rows, None
        latency = (whole[0].p50_latency_ms, whole[0].p95_latency_ms)
        return rows, UsageSummaryRow.whole(rows, key_id, whole[0].name, latency)

    # What upstreams store for each key (`gateway.stored_share`)

    async def keep_stored(self, rows: Sequence[StoredRow]) -> list[StoredRow]:
        """Write ids and their owners, in one transaction (in id order: see
        `StoredShare.flush`); the rows the database kept of them (the first owner stays:
        `upsert_sql`), read in it."""
        with _unavailable_is_503():
            async with self.pool.acquire() as conn, conn.transaction():
                await conn.executemany(_KEEP_STORED, rows)
                kept = await conn.fetch(_STORED_OWNERS, [row[0] for row in rows])
        return _stored_rows(kept)

    async def stored_owners(self, ids: Sequence[str]) -> list[StoredRow]:
        """The rows of those of `ids` the database holds."""
        with _unavailable_is_503():
            rows = await self.pool.fetch(_STORED_OWNERS, list(ids))
        return _stored_rows(rows)

    async def forget_stored(self, before: float) -> None:
        """Forget the ids last written before a unix time."""
        with _unavailable_is_503():
            await self.pool.execute(FORGET_SQL.format("$1"), before)

    async def stored_files(self) -> bool:
        """Whether the database holds a file an upstream's code wrote."""
        with _unavailable_is_503():
            return await self.pool.fetchval(FILES_SQL) is not None

    async def fetch(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """The rows of a read-only query (`$n` placeholders): the dashboard's
        (`gateway.dashboard.queries`)."""
        with _unavailable_is_503():
            return [tuple(row) for row in await self.pool.fetch(sql, *params)]

    # Whole-database copies (`gateway copy-db`)

    async def is_empty(self, conn: Conn | None = None) -> bool:
        query = (conn or self.pool).fetchval
        for table in COPIED_TABLES:
            if await query(f"SELECT 1 FROM {table} LIMIT 1") is not None:  # noqa: S608
                return False
        return True

    async def import_rows(
        self,
        keys: Sequence[KeyRecord],
        usage: AsyncIterator[list[UsageRecord]],
        refusals: Refusals,
        stored: AsyncIterator[list[StoredRow]] | None = None,
    ) -> tuple[int, int]:
        """See `gateway.store.Store.import_rows`: one transaction, an empty database only."""
        written = 0
        async with self.pool.acquire() as conn, conn.transaction():
            # Nobody else fills the tables meanwhile (a replica started too early waits).
            await conn.execute(
                "LOCK TABLE keys, usage, refusals, usage_daily, stored_ids IN EXCLUSIVE MODE"
            )
            if not await self.is_empty(conn):
                raise StoreError("the target database is not empty")
            await conn.executemany(_INSERT_KEY, [key_params(k) for k in keys])
            async for batch in usage:
                await conn.executemany(_INSERT_USAGE, [_usage_params(r) for r in batch])
                written += len(batch)
            await conn.executemany(_ADD_REFUSALS, [(*e, n) for e, n in refusals.items()])
            ids = 0
            if stored is not None:
                async for rows in stored:
                    await conn.executemany(_KEEP_STORED, rows)
                    ids += len(rows)
            # The rollup is rebuilt from the rows just written (the source's may differ).
            await conn.execute("DELETE FROM usage_daily")
            await conn.execute(FILL_DAILY["postgres"])
        return written, ids

    async def export_usage(self, batch: int = 5000) -> AsyncIterator[list[UsageRecord]]:
        async with self.pool.acquire() as conn, conn.transaction():
            sql = f"SELECT {', '.join(_USAGE_FIELDS)} FROM usage ORDER BY id"  # noqa: S608
            cursor = await conn.cursor(sql)
            while rows := await cursor.fetch(batch):
                yield [usage_from_row(tuple(r)) for r in rows]

    async def export_stored(self, batch: int = 5000) -> AsyncIterator[list[StoredRow]]:
        async with self.pool.acquire() as conn, conn.transaction():
            cursor = await conn.cursor(EXPORT_STORED)
            while rows := await cursor.fetch(batch):
                yield [(r[0], r[1], r[2], r[3], r[4]) for r in rows]

    async def export_refusals(self) -> Refusals:
        rows = await self.pool.fetch("SELECT minute, key_id, status, count FROM refusals")
        return Refusals({(m, k, s): n for m, k, s, n in rows})


def _stored_rows(records: Sequence[asyncpg.Record]) -> list[StoredRow]:
    """`_STORED_OWNERS`'s answer as `StoredRow`s."""
    return [(r[0], r[1], r[2], r[3], r[4]) for r in records]
