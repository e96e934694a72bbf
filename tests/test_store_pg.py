"""PostgreSQL as the store: what differs from SQLite (migrations under a lock, key changes pushed
to every connection, exactly-once usage writes) and `gateway copy-db`, on a real server."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from aiohttp.pytest_plugin import AiohttpClient

from gateway import cli, pg_store
from gateway.database import opened_database
from gateway.dburl import redact
from gateway.errors import StoreBusy
from gateway.migrations import MIGRATIONS
from gateway.pg_store import PgStore
from gateway.records import KeyRecord, UsageRecord, UsageSummaryRow, mint_uid
from gateway.store import StoreError
from tests.conftest import NEVER_HANG, MakeSettings, free_port, start_gateway


def row(**fields: object) -> UsageRecord:
    base: dict[str, object] = {"ts": 1.7e9, "request_id": "r", "key_id": "key_a", "model": "m",
                               "provider": "p", "upstream_model": "m", "endpoint": "/v1/chat",
                               "stream": False, "status": 200}  # fmt: skip
    return UsageRecord(**(base | fields))  # type: ignore[arg-type]


async def count(url: str, sql: str) -> int:
    conn = await asyncpg.connect(url)
    try:
        return int(await conn.fetchval(sql))
    finally:
        await conn.close()


async def test_replicas_starting_together_migrate_once(pg_url: str) -> None:
    stores = await asyncio.gather(*(PgStore.open(pg_url) for _ in range(6)))
    try:
        assert await count(pg_url, "SELECT version FROM schema_version") == len(MIGRATIONS)
        assert await count(pg_url, "SELECT COUNT(*) FROM schema_version") == 1
        key, _ = await stores[0].create_key(name="shared")
        assert [await s.get_key(key.id) for s in stores] == [key] * 6
    finally:
        await asyncio.gather(*(s.close() for s in stores))


async def test_newer_schema_is_refused(pg_url: str) -> None:
    async with opened_database(pg_url):
        pass
    conn = await asyncpg.connect(pg_url)
    await conn.execute("UPDATE schema_version SET version = $1", len(MIGRATIONS) + 1)
    await conn.close()
    with pytest.raises(StoreError, match="newer"):
        await PgStore.open(pg_url)


async def test_unreachable_database_is_a_store_error_not_a_hang(pg_server: object) -> None:
    url = f"postgresql://postgres:secret-pw@127.0.0.1:{free_port()}/nothing"
    with pytest.raises(StoreError, match="cannot connect"):
        async with asyncio.timeout(NEVER_HANG):
            await PgStore.open(url)
    assert redact(url) == url.replace("secret-pw", "***")


async def test_key_changes_are_pushed_to_every_connection(pg_url: str) -> None:
    async with opened_database(pg_url) as server, opened_database(pg_url) as other:
        changed = asyncio.Event()
        server.on_change(changed.set)
        before = await server.data_version()  # opens the listening connection
        changed.clear()
        key, _ = await other.create_key(name="from another replica")
        async with asyncio.timeout(NEVER_HANG):
            await changed.wait()
        assert await server.data_version() != before
        changed.clear()
        # Hand-written SQL notifies too: the trigger is on the table.
        conn = await asyncpg.connect(pg_url)
        await conn.execute("UPDATE keys SET name = 'renamed' WHERE id = $1", key.id)
        await conn.close()
        async with asyncio.timeout(NEVER_HANG):
            await changed.wait()
        assert (await server.require_key(key.id)).name == "renamed"


async def test_listener_comes_back_after_a_restart(pg_url: str, pg_server: object) -> None:
    async with opened_database(pg_url) as server, opened_database(pg_url) as other:
        changed = asyncio.Event()
        server.on_change(changed.set)
        await server.data_version()
        # Off the loop, so the connections see the server go (as they would in production).
        await asyncio.to_thread(pg_server.stop)  # type: ignore[attr-defined]
        await asyncio.to_thread(pg_server.start)  # type: ignore[attr-defined]
        changed.clear()
        # The key cache's next poll re-opens the listener (and reports a change, to reload).
        await server.data_version()
        assert changed.is_set()
        changed.clear()
        await other.create_key(name="after the restart")
        async with asyncio.timeout(NEVER_HANG):
            await changed.wait()


async def test_a_retried_batch_is_written_once(database: str) -> None:
    async with opened_database(database) as store:
        batch = [row(uid=mint_uid()) for _ in range(3)]
        await store.insert_usage(batch)
        await store.insert_usage(batch)  # the commit's answer was lost: the writer retries
        await store.insert_usage([*batch, row(uid=mint_uid()), row(), row()])
        (summary,) = await store.usage_summary()
        assert summary.requests == 6  # 3 + 1 new + 2 without uid (never deduplicated)


async def test_usage_by_key_names_each_key(database: str) -> None:
    """`gateway usage` and `/admin/usage` name each key beside its id, on either backend."""
    async with opened_database(database) as store:
        key, _ = await store.create_key(name="team a")
        await store.insert_usage([row(key_id=key.id), row(key_id="key_gone"), row(key_id=None)])
        rows = await store.usage_summary()
        assert sorted((r.group, r.name) for r in rows) == sorted(
            [("-", None), (key.id, "team a"), ("key_gone", None)]
        )
        assert all(r.name is None for r in await store.usage_summary(by="model"))


def test_copy_db_moves_sqlite_to_postgres(
    tmp_path: Path, pg_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    sqlite_path = str(tmp_path / "keys.db")
    keys, expected = asyncio.run(seed(sqlite_path))
    assert cli.main(["copy-db", "--from", sqlite_path, "--to", pg_url]) == 0
    out = capsys.readouterr().out
    assert "Copied 2 keys, 7 usage rows, 4 refused-request counts and 0 stored ids" in out

    async def copied() -> None:
        async with opened_database(pg_url) as dst:
            assert await dst.list_keys() == keys
            assert [await dst.usage_summary(by=by) for by in ("key", "model", "day")] == expected

    asyncio.run(copied())
    # A second copy would double the rows: a non-empty target is refused, nothing written.
    assert cli.main(["copy-db", "--from", sqlite_path, "--to", pg_url]) == 1
    assert "not empty; nothing copied" in capsys.readouterr().err
    assert asyncio.run(count(pg_url, "SELECT COUNT(*) FROM usage")) == 7
    assert cli.main(["copy-db", "--from", pg_url, "--to", pg_url]) == 2


async def seed(sqlite_path: str) -> tuple[list[KeyRecord], list[list[UsageSummaryRow]]]:
    async with opened_database(sqlite_path) as src:
        key, _ = await src.create_key(name="old", rpm=5, metadata={"team": "a"})
        revoked, _ = await src.create_key(name="gone")
        await src.revoke_key(revoked.id)
        await src.insert_usage(
            [row(key_id=key.id, latency_ms=float(i), uid=None) for i in range(7)]
        )
        await src.add_refusals(Counter({(28_000_000, key.id, 429): 4}))
        expected = [await src.usage_summary(by=by) for by in ("key", "model", "day")]
        keys = await src.list_keys()
    return keys, expected


def test_migrate_command(pg_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["migrate", "--db", pg_url]) == 0
    assert "schema up to date" in capsys.readouterr().out
    assert asyncio.run(count(pg_url, "SELECT version FROM schema_version")) == len(MIGRATIONS)
    bad = f"postgresql://postgres:secret-pw@127.0.0.1:{free_port()}/x"
    assert cli.main(["keys", "list", "--db", bad]) == 1
    assert "secret-pw" not in capsys.readouterr().err


def test_copy_db_back_to_a_new_sqlite_file(
    tmp_path: Path, pg_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    source = str(tmp_path / "keys.db")
    keys, expected = asyncio.run(seed(source))
    assert cli.main(["copy-db", "--from", source, "--to", pg_url]) == 0
    backup = str(tmp_path / "backup.db")
    assert cli.main(["copy-db", "--from", pg_url, "--to", backup]) == 0
    assert "7 usage rows" in capsys.readouterr().out

    async def copied() -> None:
        async with opened_database(backup) as db:
            assert await db.list_keys() == keys
            assert [await db.usage_summary(by=by) for by in ("key", "model", "day")] == expected

    asyncio.run(copied())
    assert cli.main(["copy-db", "--from", pg_url, "--to", backup]) == 1  # not empty now


def test_reload_names_no_password(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # where `serve` on a URL writes its pid file
    assert cli.main(["reload", "--db", "postgresql://kiosk:secret-pw@db.internal/kiosk"]) == 1
    err = capsys.readouterr().err
    assert "no running server found for postgresql://kiosk:***@db.internal/kiosk" in err
    assert "secret-pw" not in err and "gateway-" in err


async def test_huge_token_counts_are_stored_and_summed(database: str) -> None:
    """Token counts up to 2**53 (what answers may report) in every column, summed past 2**63:
    stored by both backends, reported as SQLite's TOTAL() reports them."""
    big = 2**53
    async with opened_database(database) as store:
        rows = [row(prompt_tokens=big, completion_tokens=big, total_tokens=2 * big,
                    cache_read_tokens=big, cache_write_tokens=big) for _ in range(600)]  # fmt: skip
        await store.insert_usage(rows)
        await store.add_refusals(Counter({(28_000_000, "key_a", 429): 2**40}))
        (summary,) = await store.usage_summary()
        assert summary.total_tokens == 600 * 2 * big > 2**63
        assert summary.requests == 600 + 2**40
        assert (await store.spend_since("key_a", 0))[0] == 600 * 2 * big


async def test_report_bounds_are_any_time(database: str) -> None:
    """Fractional and far-off bounds select refusal minutes as they select usage rows."""
    minute = 28_000_000
    async with opened_database(database) as store:
        await store.add_refusals(Counter({(minute, "key_a", 429): 2}))
        await store.insert_usage([row(ts=minute * 60 + 0.25)])
        everything = await store.usage_summary(since=1.5, until=1e308)
        assert [(r.group, r.requests) for r in everything] == [("key_a", 3)]
        after = await store.usage_summary(since=minute * 60 + 0.5)
        assert after == []
        assert [r.requests for r in await store.usage_summary(until=minute * 60 + 0.5)] == [3]


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://u:p@ss@db:5432/k?sslmode=require&password=x",
         "postgresql://u:***@db:5432/k?sslmode=require&password=***"),
        ("postgres://u:pw@db", "postgres://u:***@db"),
        ("postgresql://u@db/k", "postgresql://u@db/k"),
        ("postgresql:///k?host=/run/postgresql", "postgresql:///k?host=/run/postgresql"),
        ("keys.db", "keys.db"),
    ],
)  # fmt: skip
def test_redact_hides_every_password(url: str, shown: str) -> None:
    assert redact(url) == shown


async def test_both_backends_have_the_same_tables_and_columns(tmp_path: Path, pg_url: str) -> None:
    """One migration list, two dialects: every table and column exists in both, in order."""
    import sqlite3

    async with opened_database(str(tmp_path / "keys.db")), opened_database(pg_url):
        pass
    with sqlite3.connect(tmp_path / "keys.db") as conn:
        tables = [t for (t,) in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        lite = {t: [c[1] for c in conn.execute(f"PRAGMA table_info({t})")] for t in tables}
    conn.close()
    pg = await asyncpg.connect(pg_url)
    try:
        rows = await pg.fetch(
            "SELECT table_name, column_name FROM information_schema.columns"
            " WHERE table_schema = 'public' ORDER BY table_name, ordinal_position"
        )
    finally:
        await pg.close()
    postgres: dict[str, list[str]] = {}
    for table, column in rows:
        postgres.setdefault(table, []).append(column)
    # PostgreSQL's own bookkeeping: the schema version and the key-change counter.
    assert set(postgres) - set(lite) == {"schema_version", "key_changes"}
    assert {t: postgres[t] for t in lite} == lite


async def test_a_sign_in_refused_under_a_running_server_is_a_503(
    pg_server: Any, pg_url: str
) -> None:
    """A role whose sign-in PostgreSQL now refuses (its password changed, its LOGIN taken
    away) while the server runs: the admin API says the database is unavailable for now (503,
    retried), not that the gateway failed (500)."""
    role = f"kiosk_role_{abs(hash(pg_url)) % 10**8}"
    admin = await asyncpg.connect(pg_server.admin_url)
    try:
        await (await PgStore.open(pg_url)).close()  # its tables made by their owner
        await admin.execute(f"CREATE ROLE {role} LOGIN SUPERUSER")
        store = await PgStore.open(pg_url.replace("//postgres@", f"//{role}@", 1))
        try:
            await admin.execute(f"ALTER ROLE {role} NOLOGIN")
            # Its connections are made anew at their next use, as after a restart (and
            # without the race of a backend terminated while a query starts).
            await store.pool.expire_connections()
            for _ in range(2):
                with pytest.raises(StoreBusy):
                    await store.list_keys()
        finally:
            await store.close()
    finally:
        await admin.execute(f"DROP ROLE IF EXISTS {role}")
        await admin.close()


async def test_backends_terminated_while_admin_requests_run_answer_503_not_500(
    pg_server: Any, pg_url: str, aiohttp_client: AiohttpClient, make_settings: MakeSettings
) -> None:
    """The gateway's PostgreSQL connections are ended (`pg_terminate_backend`) over and over
    while admin requests run. A backend's FATAL error that reaches a pooled connection before
    its close does makes the next query on it fail in asyncpg's protocol state machine
    (`InternalClientError: cannot switch to state ...`): that is the connection lost too, a
    503 `database_busy` with Retry-After, as a closed one is; it was a 500 `unhandled_error`.
    Runs until a request has met that error (at most NEVER_HANG; here within a second)."""
    admin_key = "admin-key-0123456789abcdef"
    gw = await start_gateway(aiohttp_client, make_settings(database=pg_url, admin_key=admin_key))
    headers = {"Authorization": f"Bearer {admin_key}"}
    database = pg_url.rsplit("/", 1)[1]
    killer = await asyncpg.connect(pg_server.admin_url)
    met = asyncio.Event()
    statuses: Counter[int] = Counter()

    async def terminate() -> None:
        while not met.is_set():
            await killer.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = $1 AND pid <> pg_backend_pid()",
                database,
            )

    async def ask() -> None:
        while not met.is_set():
            async with gw.get("/admin/keys", headers=headers) as resp:
                body = await resp.json()
                statuses[resp.status] += 1
            assert resp.status in (200, 503), body
            if resp.status == 503:
                assert body["error"]["code"] == "database_busy", body
                assert resp.headers["Retry-After"] == "1"
                if "InternalClientError" in body["error"]["message"]:
                    met.set()

    try:
        async with asyncio.timeout(NEVER_HANG):
            await asyncio.gather(terminate(), *(ask() for _ in range(6)))
    finally:
        met.set()
        await killer.close()
    assert statuses[503] >= 1
    async with gw.get("/admin/keys", headers=headers) as resp:  # the pool reconnects
        assert resp.status == 200


async def test_other_internal_client_errors_stay_errors() -> None:
    """Only the protocol's refusal after a lost connection is taken for the database being
    unavailable: asyncpg's other internal errors (a value it cannot encode, a schema cache out
    of date) are the gateway's own failures, not hidden behind a retried 503."""
    for error in (
        asyncpg.InternalClientError("no binary format encoder for type x (OID 1)"),
        asyncpg.OutdatedSchemaCacheError("cache lookup failed"),
    ):
        with pytest.raises(type(error)), pg_store._unavailable_is_503():
            raise error
    with pytest.raises(StoreBusy, match="InternalClientError"), pg_store._unavailable_is_503():
        raise asyncpg.InternalClientError("cannot switch to state 11; another operation (2) ...")


async def test_a_connect_timeout_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    """A PostgreSQL that takes the connection and never answers: the error names the timeout
    (its message is empty: the line read `cannot connect to PostgreSQL: ` and nothing)."""
    monkeypatch.setattr(pg_store, "_CONNECT_TIMEOUT", 0.2)
    held: list[asyncio.StreamWriter] = []

    async def silent(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)  # (kept open, never answered)

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        with pytest.raises(StoreError) as info:
            await PgStore.open(f"postgresql://kiosk@127.0.0.1:{port}/kiosk")
    finally:
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()
    assert str(info.value) == "cannot connect to PostgreSQL: TimeoutError"
