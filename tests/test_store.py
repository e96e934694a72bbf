"""Store: migrations, hashed keys, cross-connection change detection, usage summaries."""

from __future__ import annotations

import asyncio
import hashlib
import math
import shutil
import sqlite3
from collections import Counter
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import pytest

from gateway.database import Database, opened_database
from gateway.errors import InvalidRequest, NotFound
from gateway.keys import digest_of
from gateway.migrations import MIGRATIONS, statements
from gateway.records import UsageRecord, mint_uid
from gateway.sqlite_usage import USAGE_RUN
from gateway.store import Store, StoreError, open_store

SAMPLE_DB = Path(__file__).resolve().parent.parent / "keys.db.sample"
DAY1 = datetime(2025, 3, 1, 12, tzinfo=UTC).timestamp()
DAY2 = datetime(2025, 3, 2, 0, 30, tzinfo=UTC).timestamp()


@pytest.fixture
def db_path(tmp_path: Path) -> str:
    return str(tmp_path / "keys.db")


@pytest.fixture
async def sqlite_store(db_path: str) -> AsyncIterator[Store]:
    async with open_store(db_path) as s:
        yield s


@pytest.fixture
async def store(database: str) -> AsyncIterator[Database]:
    """Each backend in turn: SQLite, then PostgreSQL (skipped where it is not installed)."""
    async with opened_database(database) as s:
        yield s


def usage(**fields: Any) -> UsageRecord:
    base: dict[str, Any] = {
        "ts": DAY1,
        "request_id": "req",
        "key_id": "key_a",
        "model": "demo",
        "provider": "demo",
        "upstream_model": "demo",
        "endpoint": "/v1/chat/completions",
        "stream": False,
        "status": 200,
    }
    return UsageRecord(**(base | fields))


async def fetch(store: Store, sql: str) -> list[Any]:
    return list(await store.db.execute_fetchall(sql))


def file_bytes(path: str) -> bytes:
    return b"".join(p.read_bytes() for p in Path(path).parent.glob(Path(path).name + "*"))


async def test_open_creates_schema_in_wal_mode(db_path: str) -> None:
    async with open_store(db_path) as store:
        assert (await fetch(store, "PRAGMA journal_mode")) == [("wal",)]
        assert (await fetch(store, "PRAGMA foreign_keys")) == [(1,)]
        tables = await fetch(
            store, "SELECT name FROM sqlite_master WHERE type IN ('table', 'index') ORDER BY name"
        )
        assert {"keys", "usage", "usage_key_ts", "usage_ts_cover"} <= {t[0] for t in tables}
        await store.ping()


async def test_usage_times_are_read_through_the_covering_index_alone(db_path: str) -> None:
    # A database of schema 5 had usage_ts (ts) beside usage_ts_cover (ts, ...): one more
    # index to update for every usage row written. It goes, and a range of times is still
    # read through an index, not a scan of the table.
    with sqlite3.connect(db_path) as conn:
        for step in MIGRATIONS[:5]:
            for statement in statements(step, "sqlite"):
                conn.execute(statement)
        conn.execute("PRAGMA user_version = 5")
    conn.close()
    async with open_store(db_path) as store:
        names = {n for (n,) in await fetch(store, "SELECT name FROM sqlite_master")}
        assert "usage_ts" not in names and "usage_ts_cover" in names
        plan = await fetch(
            store, "EXPLAIN QUERY PLAN SELECT provider, COUNT(*) FROM usage WHERE ts >= 0"
        )
        assert "USING INDEX usage_ts_cover" in " ".join(str(row[-1]) for row in plan)


async def test_migrations_are_recorded_and_idempotent(db_path: str) -> None:
    async with open_store(db_path) as store:
        record, _ = await store.create_key(name="kept")
    for _ in range(2):  # reopening must neither fail nor re-run a step nor lose data
        async with open_store(db_path) as store:
            version = await fetch(store, "PRAGMA user_version")
            assert version == [(len(MIGRATIONS),)]
            assert await store.list_keys() == [record]


async def test_newer_schema_is_refused(db_path: str) -> None:
    with sqlite3.connect(db_path) as conn:
        conn.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    conn.close()
    with pytest.raises(StoreError, match="newer"):
        await Store.open(db_path)


async def test_create_key_stores_only_the_digest(sqlite_store: Store, db_path: str) -> None:
    record, secret = await sqlite_store.create_key(
        name="alice", models=["demo", "openai/*"], rpm=60
    )
    assert secret.startswith("sk-kiosk-") and len(secret) > 40
    assert record.id.startswith("key_") and len(record.id) == 16
    int(record.id[4:], 16)  # 12 hex characters
    assert record.prefix == secret[:12]
    assert record.digest == hashlib.sha256(secret.encode()).hexdigest()
    assert record.models == ("demo", "openai/*")
    assert record.rpm == 60 and record.tpm is None
    assert record.created_at == record.updated_at
    await sqlite_store.close()
    raw = file_bytes(db_path)
    assert record.digest.encode() in raw
    assert secret.encode() not in raw
    assert secret[12:].encode() not in raw


@pytest.mark.parametrize(
    "secret", ["sk-kiosk-" + "a" * 43, "", "clé-ünïcode", "bad-\udcff-byte", "x" * 10_000]
)
def test_request_digests_match_hashlib(secret: str) -> None:
    """The digest a request is looked up by (CPython's built-in SHA-256, not OpenSSL's) is
    the one stored keys were made with; a header byte that is not UTF-8 hashes as well."""
    expected = hashlib.sha256(secret.encode("utf-8", "surrogateescape")).hexdigest()
    assert digest_of(secret) == expected


async def test_keys_round_trip(store: Database) -> None:
    created, _ = await store.create_key(
        name="bob",
        tpm=1000,
        max_concurrency=2,
        budget_tokens=10_000,
        budget_usd=5,
        budget_period="month",
        expires_at=2e9,
        metadata={"team": "search"},
    )
    assert created.budget_usd == 5.0
    assert await store.get_key(created.id) == created
    assert await store.get_key("key_000000000000") is None
    other, _ = await store.create_key(name="carol", secret="sk-kiosk-fixed")
    assert other.digest == hashlib.sha256(b"sk-kiosk-fixed").hexdigest()
    assert [k.name for k in await store.list_keys()] == ["bob", "carol"]


async def test_update_key(store: Database) -> None:
    created, _ = await store.create_key(name="dave", rpm=10, expires_at=2e9)
    updated = await store.update_key(
        created.id, name="dave2", models=["demo"], rpm=None, tpm=500, expires_at=None
    )
    assert (updated.name, updated.models, updated.rpm, updated.tpm) == (
        "dave2",
        ("demo",),
        None,
        500,
    )
    assert updated.expires_at is None
    assert updated.updated_at > created.updated_at
    assert (updated.id, updated.digest, updated.created_at) == (
        created.id,
        created.digest,
        created.created_at,
    )
    assert await store.get_key(created.id) == updated


async def test_update_key_rejects_unknown_ids_and_fields(store: Database) -> None:
    created, _ = await store.create_key(name="erin")
    with pytest.raises(NotFound) as info:
        await store.update_key("key_missing", rpm=1)
    assert info.value.code == "key_not_found"
    with pytest.raises(InvalidRequest, match="digest"):
        await store.update_key(created.id, digest="0" * 64)
    with pytest.raises(InvalidRequest):
        await store.update_key(created.id, budget_period="fortnight")
    with pytest.raises(InvalidRequest):
        await store.update_key(created.id, rpm="many")
    assert await store.get_key(created.id) == created  # failed updates change nothing


async def test_revoke_is_idempotent(store: Database) -> None:
    created, _ = await store.create_key(name="frank")
    revoked = await store.revoke_key(created.id)
    assert revoked.revoked_at is not None and not revoked.usable_at(revoked.revoked_at)
    assert await store.revoke_key(created.id) == revoked
    assert await store.list_keys() == [revoked]
    with pytest.raises(NotFound):
        await store.revoke_key("key_missing")


async def test_duplicate_secret_is_rejected(sqlite_store: Store) -> None:
    await sqlite_store.create_key(name="a", secret="sk-kiosk-same")
    with pytest.raises(sqlite3.IntegrityError):
        await sqlite_store.create_key(name="b", secret="sk-kiosk-same")
    assert len(await sqlite_store.list_keys()) == 1  # the failed transaction rolled back


async def test_data_version_sees_other_connections_only(sqlite_store: Store, db_path: str) -> None:
    before = await sqlite_store.data_version()
    await sqlite_store.create_key(name="own write")
    assert (
        await sqlite_store.data_version() == before
    )  # own commits do not count; callers know them
    async with open_store(db_path) as cli:
        created, _ = await cli.create_key(name="from the cli")
    after = await sqlite_store.data_version()
    assert after != before
    assert created in await sqlite_store.list_keys()
    async with open_store(db_path) as cli:
        await cli.revoke_key(created.id)
    assert await sqlite_store.data_version() != after


async def test_concurrent_writes_on_one_connection(store: Database) -> None:
    results = await asyncio.gather(*(store.create_key(name=f"k{i}") for i in range(20)))
    await store.insert_usage([usage(request_id=str(i)) for i in range(5)])
    assert len({r.id for r, _ in results}) == 20
    assert len(await store.list_keys()) == 20


async def test_insert_usage_writes_every_column(sqlite_store: Store) -> None:
    row = usage(
        stream=True,
        status=429,
        prompt_tokens=3,
        completion_tokens=4,
        total_tokens=7,
        cost_usd=0.5,
        latency_ms=12.5,
        ttft_ms=3.25,
        estimated=True,
        cache_read_tokens=2,
        cache_write_tokens=1,
    )
    await sqlite_store.insert_usage([row, usage(key_id=None, model=None)])
    await sqlite_store.insert_usage([])
    rows = await fetch(sqlite_store, "SELECT * FROM usage ORDER BY id")
    assert rows[0][:8] == (1, DAY1, "req", "key_a", "demo", "demo", "demo", "/v1/chat/completions")
    assert rows[0][8:] == (1, 429, 3, 4, 7, 0.5, 12.5, 3.25, 1, 2, 1, None)
    assert rows[1][3:5] == (None, None) and rows[1][15] is None


async def test_a_large_batch_is_written_whole_in_order_in_multi_row_runs(
    sqlite_store: Store,
) -> None:
    # Runs of USAGE_RUN rows go in one multi-row INSERT each, the rest row by row.
    count = 2 * USAGE_RUN + 7
    await sqlite_store.insert_usage(
        [usage(request_id=f"r{i}", prompt_tokens=i, ttft_ms=None if i % 2 else 1.5)
         for i in range(count)]
    )  # fmt: skip
    rows = await fetch(
        sqlite_store, "SELECT request_id, prompt_tokens, ttft_ms FROM usage ORDER BY id"
    )
    assert rows == [(f"r{i}", i, None if i % 2 else 1.5) for i in range(count)]


async def test_a_batch_of_every_kind_of_run_is_written_whole_in_order(
    sqlite_store: Store,
) -> None:
    # A long run, then runs of 16, 4, 2 and 1 rows: USAGE_RUN + 23 rows.
    count = USAGE_RUN + 23
    await sqlite_store.insert_usage(
        [usage(request_id=f"r{i}", stream=i % 3 == 0, uid=mint_uid()) for i in range(count)],
        fresh=True,
    )
    rows = await fetch(sqlite_store, "SELECT request_id, stream FROM usage ORDER BY id")
    assert rows == [(f"r{i}", int(i % 3 == 0)) for i in range(count)]
    rolled = await fetch(sqlite_store, "SELECT SUM(requests) FROM usage_daily")
    assert rolled == [(count,)]


async def test_a_large_retried_batch_counts_each_row_once(store: Database) -> None:
    # Multi-row runs and uid deduplication together: a batch of several runs retried with
    # new rows added writes only the new ones, and the rollup counts only those.
    count = 2 * USAGE_RUN + 7
    batch = [usage(request_id=f"r{i}", total_tokens=1, uid=mint_uid()) for i in range(count)]
    await store.insert_usage(batch[: USAGE_RUN + 3])
    await store.insert_usage(batch)
    rows = await store.fetch("SELECT request_id FROM usage ORDER BY request_id")
    assert sorted(r[0] for r in rows) == sorted(f"r{i}" for i in range(count))
    rolled = await store.fetch("SELECT SUM(requests), SUM(tokens) FROM usage_daily")
    assert [tuple(int(v) for v in r) for r in rolled] == [(count, count)]


async def test_usage_summary_groupings(store: Database) -> None:
    await store.insert_usage(
        [
            usage(key_id="key_a", model="m1", prompt_tokens=10, completion_tokens=5,
                  total_tokens=15, cost_usd=0.25, latency_ms=100),
            usage(key_id="key_a", model="m2", status=500, latency_ms=300, ts=DAY2),
            usage(key_id="key_b", model="m1", status=429, total_tokens=2, latency_ms=50, ts=DAY2),
            usage(key_id=None, model=None, status=401, latency_ms=1),
        ]
    )  # fmt: skip
    by_key = {r.group: r for r in await store.usage_summary()}
    assert list(by_key) == ["-", "key_a", "key_b"]
    a = by_key["key_a"]
    assert (a.requests, a.errors, a.prompt_tokens, a.completion_tokens, a.total_tokens) == (
        2, 1, 10, 5, 15,
    )  # fmt: skip
    assert a.cost_usd == pytest.approx(0.25)
    assert a.p50_latency_ms == 200.0 and a.p95_latency_ms == pytest.approx(290.0)
    assert by_key["key_b"].errors == 1 and by_key["-"].errors == 1

    by_model = {r.group: r.requests for r in await store.usage_summary(by="model")}
    assert by_model == {"-": 1, "m1": 2, "m2": 1}
    by_day = {r.group: r.requests for r in await store.usage_summary(by="day")}
    assert by_day == {"2025-03-01": 2, "2025-03-02": 2}

    since = await store.usage_summary(since=DAY2)
    assert {r.group: r.requests for r in since} == {"key_a": 1, "key_b": 1}
    until = await store.usage_summary(until=DAY2, by="day")
    assert [r.group for r in until] == ["2025-03-01"]
    only_a = await store.usage_summary(key_id="key_a", by="model")
    assert [(r.group, r.requests) for r in only_a] == [("m1", 1), ("m2", 1)]
    assert await store.usage_summary(key_id="key_none") == []


async def test_a_keys_summary_is_its_reports_by_model_and_by_key(store: Database) -> None:
    """The key page read a key's rows twice (a report by model, then by key), each reading
    every latency of the range; `key_summary` reads them once and answers the same."""
    await store.insert_usage(
        [
            usage(key_id="key_a", model=f"m{i % 3}", request_id=f"r{i}", ts=DAY1 + i,
                  latency_ms=float(i * 7 % 101), total_tokens=i, prompt_tokens=i,
                  cost_usd=i / 1000, status=500 if i % 9 == 0 else 200)
            for i in range(60)
        ]
        + [usage(key_id="key_b", model="m0", request_id="other", latency_ms=9999.0)]
    )  # fmt: skip
    await store.add_refusals(Counter({(int(DAY1 // 60), "key_a", 429): 4}))
    since, until = DAY1 - 86400, DAY2 + 86400
    by_model, whole = await store.key_summary("key_a", since=since, until=until)
    assert by_model == await store.usage_summary(
        since=since, until=until, key_id="key_a", by="model"
    )
    [expected] = await store.usage_summary(since=since, until=until, key_id="key_a", by="key")
    assert whole is not None
    assert msgspec.structs.replace(whole, name=None, cost_usd=pytest.approx(whole.cost_usd)) == (
        msgspec.structs.replace(expected, name=None, cost_usd=pytest.approx(expected.cost_usd))
    )
    assert whole.requests == 64 and whole.p95_latency_ms == expected.p95_latency_ms
    assert await store.key_summary("key_none", since=since, until=until) == ([], None)


async def test_a_keys_whole_is_named_and_counted_like_its_by_key_report(store: Database) -> None:
    """The whole had no name on SQLite (the key's name on PostgreSQL); its counts are the
    models' added as integers, its cost their exactly rounded sum (`fsum`): a sum in another
    order, the by-key report's, may differ in the last bit (helper-75)."""
    record, _ = await store.create_key(name="named")
    await store.insert_usage(
        [
            usage(key_id=record.id, request_id=f"r{i}", ts=DAY1 + i, model=model, cost_usd=cost)
            for i, (model, cost) in enumerate(
                [("a", 0.00561), ("b", 0.00561), ("a", 0.00561), ("b", 0.00561), ("a", 0.00561)]
            )
        ]
    )
    since, until = DAY1 - 60, DAY1 + 60
    by_model, whole = await store.key_summary(record.id, since=since, until=until)
    [old] = await store.usage_summary(since=since, until=until, key_id=record.id, by="key")
    assert whole is not None and whole.name == old.name == "named"
    assert whole.cost_usd == math.fsum(r.cost_usd for r in by_model)
    assert whole.cost_usd == pytest.approx(old.cost_usd, rel=1e-12)


async def test_a_keys_whole_counts_are_its_models_summed_on_both_backends(
    store: Database,
) -> None:
    """PostgreSQL's whole kept the by-key report's counts, summed as doubles over all rows:
    past 2^53 (a hostile upstream's counts) not the sum of its own per-model rows, and not
    SQLite's figure (helper-76)."""
    big = 2**53 + 1
    await store.insert_usage(
        [
            usage(request_id="r1", ts=DAY1, model="a", total_tokens=big, prompt_tokens=big),
            usage(request_id="r2", ts=DAY1 + 1, model="b", total_tokens=1, prompt_tokens=1),
        ]
    )
    by_model, whole = await store.key_summary("key_a", since=DAY1 - 60, until=DAY1 + 60)
    assert whole is not None
    assert whole.total_tokens == sum(r.total_tokens for r in by_model)
    assert whole.prompt_tokens == sum(r.prompt_tokens for r in by_model)
    assert whole.requests == 2


async def test_usage_percentiles_interpolate(store: Database) -> None:
    await store.insert_usage([usage(latency_ms=float(ms)) for ms in range(100, 0, -1)])
    (row,) = await store.usage_summary()
    assert row.requests == 100
    assert row.p50_latency_ms == pytest.approx(50.5)
    assert row.p95_latency_ms == pytest.approx(95.05)
    await store.insert_usage([usage(key_id="single", latency_ms=7)])
    single = await store.usage_summary(key_id="single")
    assert (single[0].p50_latency_ms, single[0].p95_latency_ms) == (7.0, 7.0)


async def test_open_store_closes_on_error(db_path: str) -> None:
    with pytest.raises(RuntimeError):
        async with open_store(db_path) as store:
            raise RuntimeError("boom")
    with pytest.raises(ValueError):  # aiosqlite: the connection is closed
        await store.ping()


async def test_sample_database_holds_only_the_demo_key(tmp_path: Path) -> None:
    assert not list(SAMPLE_DB.parent.glob("keys.db.sample-*")), "sample has WAL leftovers"
    copy = tmp_path / "keys.db"
    shutil.copyfile(SAMPLE_DB, copy)
    assert b"sk-kiosk-demo" not in copy.read_bytes()
    async with open_store(str(copy)) as store:
        (demo,) = await store.list_keys()
    assert demo.name == "demo" and demo.models == ("demo",)
    assert demo.digest == hashlib.sha256(b"sk-kiosk-demo").hexdigest()
    assert not demo.has_limits and demo.usable_at(4e9)
    assert (demo.budget_tokens, demo.budget_usd, demo.expires_at) == (None, None, None)
