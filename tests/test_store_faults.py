"""The database under stress or attack: locked by another process, values it cannot hold, files
other users could read, names that are terminal escapes, and floods of refused requests."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiosqlite
import pytest
from aiohttp.pytest_plugin import AiohttpClient, AiohttpServer
from aiohttp.test_utils import TestClient
from structlog.testing import capture_logs

from gateway import cli
from gateway.migrations import migrate
from gateway.records import UsageRecord, mint_uid
from gateway.refusals import RefusalCounter, Refusals
from gateway.settings import ModelConfig, OpenAIConfig, Target
from gateway.sqlite_usage import USAGE_RUN
from gateway.state import KEYS_KEY, REFUSALS_KEY, STORE_KEY, USAGE_KEY
from gateway.store import Store, open_store
from gateway.usage import UsageRecorder
from tests.conftest import (
    NEVER_HANG,
    MakeSettings,
    app_of,
    create_key,
    refusal_counts,
    start_gateway,
    usage_rows,
)
from tests.fakes import FakeOpenAI
from tests.test_cli import stored_as

ADMIN = "admin-key-0123456789abcdef"
HI = {"model": "demo", "messages": [{"role": "user", "content": "hi"}]}
CHAT = "/v1/chat/completions"


def admin() -> dict[str, str]:
    return {"Authorization": f"Bearer {ADMIN}"}


@pytest.fixture
async def gw(aiohttp_client: AiohttpClient, make_settings: MakeSettings) -> TestClient[Any, Any]:
    return await start_gateway(aiohttp_client, make_settings(admin_key=ADMIN))


@pytest.fixture
def locked(gw: TestClient[Any, Any]) -> Iterator[sqlite3.Connection]:
    """Another process's write lock on the gateway's database (a backup, a long CLI write)."""
    conn = sqlite3.connect(app_of(gw)[STORE_KEY].path, isolation_level=None)
    conn.execute("BEGIN IMMEDIATE")
    yield conn
    conn.rollback()
    conn.close()


async def test_admin_writes_while_the_database_is_locked_are_503s_at_once(
    gw: TestClient[Any, Any], locked: sqlite3.Connection
) -> None:
    async with gw.post("/admin/keys", json={"name": "a"}, headers=admin()) as resp:
        assert resp.status == 503
        assert resp.headers["Retry-After"] == "1"
        error = (await resp.json())["error"]
    assert error["code"] == "database_busy" and error["type"] == "server_error"
    started = time.monotonic()
    async with gw.get("/admin/usage", headers=admin()) as resp:  # must write what is queued
        assert resp.status in (200, 503)
    # Not after the 5 to 10 s a long busy timeout took (the bound is that timeout, not speed).
    assert time.monotonic() - started < 5
    locked.rollback()
    async with gw.post("/admin/keys", json={"name": "a"}, headers=admin()) as resp:
        assert resp.status == 201


async def test_usage_rows_are_kept_while_the_database_is_locked_and_written_after(
    gw: TestClient[Any, Any], locked: sqlite3.Connection
) -> None:
    secret = await create_key_unlocked(gw, locked)
    recorder = app_of(gw)[USAGE_KEY]
    for _ in range(3):
        async with gw.post(CHAT, json=HI, headers={"Authorization": f"Bearer {secret}"}) as resp:
            assert resp.status == 200
    with pytest.raises(Exception, match="busy"):
        await recorder.flush()
    async with gw.get("/readyz") as resp:
        assert resp.status == 503
        state = await resp.json()
    assert state["usage"] == "failing" and state["usage_pending"] == 3
    locked.rollback()
    await recorder.flush()  # the database is back: the rows held for it are written
    assert [r["status"] for r in await usage_rows(gw)] == [200, 200, 200]
    async with gw.get("/readyz") as resp:
        assert resp.status == 200
        assert (await resp.json())["usage"] == "ok"


async def create_key_unlocked(gw: TestClient[Any, Any], locked: sqlite3.Connection) -> str:
    locked.rollback()
    secret = await create_key(gw)
    locked.execute("BEGIN IMMEDIATE")
    return secret


async def test_readyz_answers_when_the_database_does_not(
    gw: TestClient[Any, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    async def stuck() -> None:  # a connection stuck behind another process's lock
        await asyncio.Event().wait()

    monkeypatch.setattr(app_of(gw)[STORE_KEY], "ping", stuck)
    async with gw.get("/readyz") as resp:  # bounded by the ping's half second
        assert resp.status == 503
        assert (await resp.json())["database"] == "busy"


@pytest.mark.parametrize("field", ["rpm", "tpm", "max_concurrency", "budget_tokens"])
async def test_integers_beyond_the_store_are_400s_naming_the_field(
    gw: TestClient[Any, Any], field: str
) -> None:
    for value in (2**63, 2**64 + 1, 10**30):
        async with gw.post("/admin/keys", json={"name": "a", field: value}, headers=admin()) as r:
            assert r.status == 400
            assert (await r.json())["error"]["param"] == field
    async with gw.post("/admin/keys", json={"name": "a"}, headers=admin()) as resp:
        key_id = (await resp.json())["id"]
    async with gw.patch(f"/admin/keys/{key_id}", json={field: 2**63}, headers=admin()) as resp:
        assert resp.status == 400
        assert (await resp.json())["error"]["param"] == field
    async with gw.patch(f"/admin/keys/{key_id}", json={field: 2**63 - 1}, headers=admin()) as r:
        assert r.status == 200


def test_the_cli_refuses_integers_beyond_the_store(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = str(tmp_path / "k.db")
    assert cli.main(["keys", "create", "--name", "a", "--rpm", str(2**64), "--db", db]) == 2
    assert "rpm" in capsys.readouterr().err


async def test_database_files_are_readable_by_their_owner_only(gw: TestClient[Any, Any]) -> None:
    path = Path(app_of(gw)[STORE_KEY].path)
    await create_key(gw)  # a write: the WAL and its index exist
    for file in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
        assert stat.S_IMODE(file.stat().st_mode) == 0o600, file


def test_the_cli_creates_a_private_database_too(tmp_path: Path) -> None:
    db = tmp_path / "cli.db"
    assert cli.main(["keys", "create", "--name", "a", "--db", str(db)]) == 0
    assert stat.S_IMODE(db.stat().st_mode) == 0o600


def test_the_cli_prints_control_characters_escaped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = str(tmp_path / "k.db")
    evil = "ok\x1b[2J\x1b]0;pwned\x07\u202eevil\x9b31m"
    args = ["keys", "create", "--name", evil, "--notes", evil, "--db", db, "--json"]
    assert cli.main(args) == 2  # refused now; a key made before may still hold such text
    assert capsys.readouterr().out == ""
    assert cli.main(["keys", "create", "--name", "ok", "--db", db, "--json"]) == 0
    key_id = __import__("json").loads(capsys.readouterr().out)["id"]
    stored_as(db, key_id, name=evil, notes=evil)
    assert cli.main(["keys", "show", key_id, "--db", db, "--json"]) == 0
    shown = capsys.readouterr().out
    assert "\\u001b[2J" in shown and "\\u009b" in shown and "\\u202e" in shown
    for argv in (["keys", "list"], ["keys", "show", key_id], ["keys", "list", "--json"]):
        assert cli.main([*argv, "--db", db]) == 0
        out = capsys.readouterr().out
        assert not any(c in out for c in "\x1b\x07\x9b\u202e"), argv
        assert "\\x1b" in out or "\\u001b" in out


async def test_a_flood_of_refusals_writes_a_row_per_minute_key_and_status(
    gw: TestClient[Any, Any],
) -> None:
    secret = await create_key(gw, rpm=5)
    headers = {"Authorization": f"Bearer {secret}"}

    async def one(body: Any) -> int:
        async with gw.post(CHAT, json=body, headers=headers) as resp:
            return resp.status

    statuses = [await one(HI) for _ in range(5)]
    statuses += await asyncio.gather(*(one(HI) for _ in range(500)))
    statuses += await asyncio.gather(*(one({"model": "demo"}) for _ in range(500)))
    assert statuses.count(200) == 5 and statuses.count(429) == 1000
    counts = await refusal_counts(gw)
    assert sum(counts.values()) == 1000 and len(counts) == 1
    async with app_of(gw)[STORE_KEY].db.execute("SELECT COUNT(*) FROM refusals") as cur:
        (rows,) = await cur.fetchone()  # type: ignore[misc]
    assert rows <= 2  # one per minute (the flood may straddle a minute's end)
    assert len(await usage_rows(gw)) == 5
    key_id = app_of(gw)[KEYS_KEY].lookup(secret).id  # type: ignore[union-attr]
    async with gw.get(f"/admin/usage?key={key_id}", headers=admin()) as resp:
        (report,) = (await resp.json())["data"]
    assert (report["requests"], report["errors"]) == (1005, 1000)


def test_the_usage_report_shows_refusals(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = str(tmp_path / "k.db")
    assert cli.main(["keys", "create", "--name", "a", "--db", db, "--json"]) == 0
    key_id = __import__("json").loads(capsys.readouterr().out)["id"]
    conn = sqlite3.connect(db)
    with conn:
        conn.execute("INSERT INTO refusals VALUES (?, ?, 429, 7)", (int(time.time() // 60), key_id))
    conn.close()
    assert cli.main(["usage", "--db", db, "--json", "--by", "day"]) == 0
    (row,) = __import__("json").loads(capsys.readouterr().out)
    assert (row["requests"], row["errors"], row["total_tokens"]) == (7, 7, 0)


@pytest.mark.parametrize("value", ["inf", "1e400", "nan", "-5", "99999999999999999999999", "x"])
async def test_odd_upstream_retry_after_is_never_a_500(
    aiohttp_server: AiohttpServer,
    aiohttp_client: AiohttpClient,
    make_settings: MakeSettings,
    value: str,
) -> None:
    fake = FakeOpenAI()
    await fake.start(aiohttp_server)
    fake.always(status=429, headers={"retry-after": value, "retry-after-ms": value})
    settings = make_settings(
        providers=(OpenAIConfig(name="up", base_url=fake.base_url),),
        models=(ModelConfig(name="m", targets=(Target(provider="up", model="gpt-4o-mini"),)),),
    )
    gw = await start_gateway(aiohttp_client, settings)
    secret = await create_key(gw)
    for stream in (False, True):
        body = {"model": "m", "messages": HI["messages"], "stream": stream}
        async with gw.post(CHAT, json=body, headers={"Authorization": f"Bearer {secret}"}) as r:
            assert r.status == 429
            assert (await r.json())["error"]["type"] == "rate_limit_exceeded"
            if "Retry-After" in r.headers:
                assert 1 <= int(r.headers["Retry-After"]) <= 3600


async def test_refusal_counts_survive_a_database_outage(gw: TestClient[Any, Any]) -> None:
    counter = app_of(gw)[REFUSALS_KEY]
    counter.count(time.time(), "key_x", 429)
    locked = sqlite3.connect(app_of(gw)[STORE_KEY].path, isolation_level=None)
    locked.execute("BEGIN IMMEDIATE")
    with pytest.raises(Exception, match="busy"):
        await counter.flush()
    assert counter.failing
    counter.count(time.time(), "key_x", 429)
    locked.rollback()
    locked.close()
    assert await refusal_counts(gw) == {("key_x", 429): 2}
    assert not counter.failing


# Two replicas on one SQLite file: a write of this one waits (in aiosqlite's thread) for the
# other's write lock, and a stop cancels it there.


def one_row(i: int) -> UsageRecord:
    return UsageRecord(
        ts=60.0 + i,
        request_id=f"req-{i}",
        key_id="key_a",
        model="m",
        provider="up",
        upstream_model="gpt-4o-mini",
        endpoint=CHAT,
        stream=False,
        status=200,
        total_tokens=48,
        uid=mint_uid(),
    )


def written(path: str) -> tuple[int, int]:
    """(usage rows, refused requests) in the file, read by a connection of its own."""
    with contextlib.closing(sqlite3.connect(path)) as conn:
        ((rows,),) = conn.execute("SELECT COUNT(*) FROM usage")
        ((refused,),) = conn.execute("SELECT TOTAL(count) FROM refusals")
    return rows, int(refused)


class Watched:
    """A real store whose refusal writes say when they begin, and can be held once they
    committed (their answer late, as when the loop is slow to hear it)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.writing = asyncio.Event()
        self.committed = asyncio.Event()
        self.answer: asyncio.Event | None = None  # set: each write waits for it after its commit

    async def add_refusals(self, counts: Refusals) -> None:
        self.writing.set()
        await self.store.add_refusals(counts)
        self.committed.set()
        if self.answer is not None:
            await self.answer.wait()


async def noticed(event: asyncio.Event) -> None:
    async with asyncio.timeout(NEVER_HANG):
        await event.wait()


async def test_a_write_cancelled_while_another_process_holds_the_lock_leaves_none_open(
    tmp_path: Path,
) -> None:
    path = str(tmp_path / "keys.db")
    other = sqlite3.connect(path, isolation_level=None)  # the other replica
    async with open_store(path) as store:
        watched = Watched(store)
        other.execute("BEGIN IMMEDIATE")
        write = asyncio.create_task(watched.add_refusals(Refusals({(1, "key_a", 429): 1})))
        await noticed(watched.writing)  # its BEGIN is queued: it waits in the thread for the lock
        write.cancel()
        other.rollback()  # the lock comes free: the cancelled BEGIN goes through
        with pytest.raises(asyncio.CancelledError):
            await write
        await store.insert_usage([one_row(1)])  # not "a transaction within a transaction"
        other.execute("BEGIN IMMEDIATE")  # nor is the lock still held here
        other.rollback()
    other.close()
    assert written(path) == (1, 0)


async def test_a_stop_while_another_replica_holds_the_lock_writes_every_row_and_count(
    tmp_path: Path,
) -> None:
    # As the app stops (`_usage_ctx`): the refusal counter, then the usage writer; the
    # counter's write is waiting for the other replica's lock when the stop comes.
    path = str(tmp_path / "keys.db")
    other = sqlite3.connect(path, isolation_level=None)
    async with open_store(path) as store:
        watched = Watched(store)
        refusals = RefusalCounter(watched, flush_seconds=0.01)
        recorder = UsageRecorder(store, flush_seconds=3600, batch_size=100)
        await refusals.start()
        await recorder.start()
        other.execute("BEGIN IMMEDIATE")
        for i in range(8):
            recorder.record(one_row(i))
        refusals.count(60.0, "key_a", 429)
        await noticed(watched.writing)

        async def stop() -> None:
            await refusals.stop()
            await recorder.stop()

        with capture_logs() as logs:
            stopping = asyncio.create_task(stop())
            other.rollback()  # the other replica's write ends as this one stops
            await stopping
    other.close()
    assert [e["event"] for e in logs] == []
    assert written(path) == (8, 1)


async def test_a_stop_during_a_refusal_write_adds_its_counts_once(tmp_path: Path) -> None:
    path = str(tmp_path / "keys.db")
    async with open_store(path) as store:
        watched = Watched(store)
        watched.answer = asyncio.Event()
        refusals = RefusalCounter(watched, flush_seconds=0.01)
        await refusals.start()
        refusals.count(60.0, "key_a", 429)
        await noticed(watched.committed)  # written; its answer not heard yet
        stopping = asyncio.create_task(refusals.stop())
        watched.answer.set()
        await stopping
    assert written(path) == (0, 1)


class _BeginSpy:
    """An aiosqlite connection that says when `BEGIN IMMEDIATE` is handed to its thread."""

    def __init__(self, db: aiosqlite.Connection) -> None:
        self.db = db
        self.begun = asyncio.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.db, name)

    def execute(self, sql: str, *args: Any) -> Any:
        if sql == "BEGIN IMMEDIATE":
            self.begun.set()
        return self.db.execute(sql, *args)


async def test_a_migration_cancelled_while_another_process_holds_the_lock_leaves_none_open(
    tmp_path: Path,
) -> None:
    path = str(tmp_path / "keys.db")
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another process holds the write lock
    async with aiosqlite.connect(path, timeout=30) as db:
        spy = _BeginSpy(db)
        task = asyncio.create_task(migrate(spy))  # type: ignore[arg-type]
        await noticed(spy.begun)  # its BEGIN waits in the thread for the lock
        task.cancel()
        other.rollback()  # the lock comes free: the cancelled BEGIN goes through
        with pytest.raises(asyncio.CancelledError):
            await task
        assert not db.in_transaction  # the rollback queued after it ended it
        other.execute("BEGIN IMMEDIATE")  # the lock is not held by the cancelled migration
        other.rollback()
        await migrate(db)  # and the next start migrates
    other.close()
    assert written(path) == (0, 0)


class HandOffs:
    """Counts what a store hands to aiosqlite's thread, and says when something is handed."""

    def __init__(self, store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        self.handed = asyncio.Event()
        execute = store.db._execute

        async def counted(*args: Any, **kwargs: Any) -> Any:
            self.count += 1
            self.handed.set()
            return await execute(*args, **kwargs)

        monkeypatch.setattr(store.db, "_execute", counted)


async def test_a_batch_of_usage_rows_is_one_hand_off_to_the_database_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # BEGIN, each multi-row INSERT, the rollup and COMMIT were a hand-off each (a thread
    # wake-up, then a wake-up of the loop with the answer): now the transaction is one.
    async with open_store(str(tmp_path / "keys.db")) as store:
        hand_offs = HandOffs(store, monkeypatch)
        rows = [one_row(i) for i in range(USAGE_RUN + 3)]  # three multi-row INSERTs
        await store.insert_usage(rows, fresh=True)
        assert hand_offs.count == 1
        await store.insert_usage([*rows, one_row(-1)])  # a retry: its look-up is in it too
        assert hand_offs.count == 2
    assert written(str(tmp_path / "keys.db")) == (USAGE_RUN + 4, 0)


async def test_a_usage_write_cancelled_while_another_process_holds_the_lock_ends_there(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Cancelled while its transaction waits in the thread for another process's lock, the
    # write still ends there once the lock is free (committed: the recorder counts such rows
    # as tried, and looks for them before it writes them again), and leaves no transaction
    # open on the connection.
    path = str(tmp_path / "keys.db")
    other = sqlite3.connect(path, isolation_level=None)
    async with open_store(path) as store:
        hand_offs = HandOffs(store, monkeypatch)
        other.execute("BEGIN IMMEDIATE")
        write = asyncio.create_task(store.insert_usage([one_row(1)], fresh=True))
        await noticed(hand_offs.handed)
        write.cancel()
        other.rollback()
        with pytest.raises(asyncio.CancelledError):
            await write
        await store.insert_usage([one_row(2)])  # after it in the thread: not "within a transaction"
        other.execute("BEGIN IMMEDIATE")  # nor is the lock still held
        other.rollback()
    other.close()
    assert written(path) == (2, 0)
