"""Gateways on a real PostgreSQL (and, where it matters, on SQLite too): key changes reach every
replica within a second; usage rows reach the database exactly once, through a database restart,
a frozen database and a SIGTERM under load; hostile text cannot poison a batch or a key."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import openai
import pytest
from aiohttp.pytest_plugin import AiohttpClient, AiohttpServer

from gateway import cli
from gateway.state import KEYS_KEY, REFUSALS_KEY, STORE_KEY, USAGE_KEY
from tests.conftest import (
    NEVER_HANG,
    MakeSettings,
    app_of,
    cli_key,
    fake_provider,
    free_port,
    openai_client,
    start_fakes,
    start_gateway,
    start_serve,
)
from tests.test_lifecycle import refused

HELLO = {"model": "demo", "messages": [{"role": "user", "content": "hi"}]}
ADMIN = "admin-key-0123456789abcdef"
_ids = itertools.count(1)


async def usage_by_request(url: str) -> Counter[str]:
    """How many usage rows each request id has in the database."""
    conn = await asyncpg.connect(url)
    try:
        return Counter(r[0] for r in await conn.fetch("SELECT request_id FROM usage"))
    finally:
        await conn.close()


async def test_key_changes_on_one_replica_reach_the_others_within_a_second(
    aiohttp_client: AiohttpClient, make_settings: MakeSettings, pg_url: str
) -> None:
    # Polls 2 s apart (the most settings allow): only the pushed notification beats 1 s.
    settings = make_settings(database=pg_url, admin_key=ADMIN, keys_refresh_seconds=2.0)
    a, b = [await start_gateway(aiohttp_client, settings) for _ in range(2)]
    cache_b = app_of(b)[KEYS_KEY]
    admin = {"Authorization": f"Bearer {ADMIN}"}
    loop = asyncio.get_running_loop()

    async def on_b_within_a_second(
        change: Callable[[], Awaitable[Any]], seen: Callable[[Any], bool]
    ) -> Any:
        """Make `change` on replica A; return once B's cache shows it (`seen(result)`)."""
        started = loop.time()
        result = await change()
        async with asyncio.timeout(NEVER_HANG):
            while not seen(result):
                await cache_b.wait_reload(cache_b.loads)
        assert loop.time() - started < 1.0
        return result

    async def create() -> Any:
        async with a.post("/admin/keys", json={"name": "shared"}, headers=admin) as resp:
            assert resp.status == 201
            return await resp.json()

    created = await on_b_within_a_second(create, lambda c: cache_b.lookup(c["key"]) is not None)
    secret = created["key"]
    user = {"Authorization": f"Bearer {secret}"}
    assert (await b.post("/v1/chat/completions", json=HELLO, headers=user)).status == 200

    async def limit_models() -> None:
        body = {"models": ["nothing-like-demo"]}
        async with a.patch(f"/admin/keys/{created['id']}", json=body, headers=admin) as resp:
            assert resp.status == 200

    await on_b_within_a_second(limit_models, lambda _: cache_b.lookup(secret).models != ())
    assert (await b.post("/v1/chat/completions", json=HELLO, headers=user)).status == 403

    async def revoke() -> None:
        async with a.delete(f"/admin/keys/{created['id']}", headers=admin) as resp:
            assert resp.status == 200

    await on_b_within_a_second(revoke, lambda _: cache_b.lookup(secret).revoked_at is not None)
    resp = await b.post("/v1/chat/completions", json=HELLO, headers=user)
    assert resp.status == 401
    assert (await resp.json())["error"]["code"] == "key_revoked"


async def load(
    post: Callable[[str], Awaitable[int | None]], stop: asyncio.Event, workers: int = 8
) -> tuple[list[str], list[str]]:
    """Requests from `workers` clients until `stop`: (answered ids, ids that got no answer)."""
    answered: list[str] = []
    lost: list[str] = []

    async def worker() -> None:
        while not stop.is_set():
            request_id = f"load-{next(_ids)}"
            status = await post(request_id)
            if status is None:
                lost.append(request_id)
                return  # the server is gone
            assert status == 200, status
            answered.append(request_id)

    await asyncio.gather(*(worker() for _ in range(workers)))
    return answered, lost


async def test_a_database_restart_under_load_loses_and_doubles_no_usage_row(
    aiohttp_client: AiohttpClient, make_settings: MakeSettings, pg_url: str, pg_server: Any
) -> None:
    settings = make_settings(
        database=pg_url, usage_flush_seconds=0.02, usage_batch_size=20, admin_key=ADMIN
    )
    client = await start_gateway(aiohttp_client, settings)
    app = app_of(client)
    record, secret = await app[STORE_KEY].create_key(name="load")
    app[KEYS_KEY].put(record)
    recorder = app[USAGE_KEY]

    async def post(request_id: str) -> int:
        headers = {"Authorization": f"Bearer {secret}", "X-Request-ID": request_id}
        async with client.post("/v1/chat/completions", json=HELLO, headers=headers) as resp:
            await resp.read()
            return resp.status

    stop = asyncio.Event()
    traffic = asyncio.create_task(load(post, stop))
    async with asyncio.timeout(NEVER_HANG * 4):
        await recorder.wait_recorded(100)
        await asyncio.to_thread(pg_server.stop)  # requests go on: keys are in memory
        mark = recorder.recorded
        await recorder.wait_recorded(mark + 200)
        async with client.get("/readyz") as resp:  # rows wait, counted, and readiness says so
            body = await resp.json()
        assert resp.status == 503 and body["database"] != "ok"
        assert body["usage"] == "failing" and body["usage_pending"] > 0
        admin = {"Authorization": f"Bearer {ADMIN}"}
        async with client.get("/admin/keys", headers=admin) as resp:  # no hang, no 500
            assert resp.status == 503 and resp.headers["Retry-After"] == "1"
            assert (await resp.json())["error"]["code"] == "database_busy"
        await asyncio.to_thread(pg_server.start)
        mark = recorder.recorded
        await recorder.wait_recorded(mark + 100)
        stop.set()
        answered, lost = await traffic
        await recorder.flush()
    assert lost == [] and recorder.dropped == 0
    rows = await usage_by_request(pg_url)
    assert sorted(rows) == sorted(answered)  # every request once, nothing else
    assert set(rows.values()) == {1}


async def test_sigterm_under_load_writes_each_answered_request_once(
    tmp_path: Path, capsys: Any, database: str
) -> None:
    """A real `gateway serve` process, SIGTERM while 8 clients keep sending requests."""
    port = free_port()
    config = tmp_path / "gateway.toml"
    config.write_text(
        f'[server]\ndatabase = "{database}"\nusage_batch_size = 50\nshutdown_grace_seconds = 10\n'
    )
    secret = await cli_key(database, capsys)
    proc = await start_serve(config, port, stdout=subprocess.DEVNULL, cwd=tmp_path)  # its pid file
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    started = asyncio.Event()
    try:
        async with asyncio.timeout(NEVER_HANG * 4), aiohttp.ClientSession() as session:
            assert proc.stderr is not None
            line = await proc.stderr.readline()
            assert b"listening" in line, line
            answers = 0

            async def post(request_id: str) -> int | None:
                nonlocal answers
                headers = {"Authorization": f"Bearer {secret}", "X-Request-ID": request_id}
                try:
                    async with session.post(url, json=HELLO, headers=headers) as resp:
                        await resp.read()
                except aiohttp.ClientError:
                    return None
                answers += 1
                if answers == 300:
                    started.set()
                return resp.status

            stop = asyncio.Event()
            traffic = asyncio.create_task(load(post, stop))
            await started.wait()
            proc.send_signal(signal.SIGTERM)
            await refused(port)
            stop.set()
            answered, lost = await traffic
            assert await proc.wait() == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    if database.startswith("postgresql://"):
        rows = await usage_by_request(database)
    else:
        import sqlite3

        with sqlite3.connect(database) as conn:
            rows = Counter(r[0] for r in conn.execute("SELECT request_id FROM usage"))
        conn.close()
    assert len(answered) >= 300
    # Each answered request has one row; a request cut off by the shutdown has at most one.
    assert set(answered) <= set(rows) <= set(answered) | set(lost)
    assert set(rows.values()) == {1}


async def test_a_reused_request_id_hides_no_usage(
    aiohttp_client: AiohttpClient, make_settings: MakeSettings, database: str
) -> None:
    """Rows are deduplicated by the gateway's own id, never the client's X-Request-ID."""
    client = await start_gateway(aiohttp_client, make_settings(database=database))
    app = app_of(client)
    record, secret = await app[STORE_KEY].create_key(name="sly")
    app[KEYS_KEY].put(record)
    headers = {"Authorization": f"Bearer {secret}", "X-Request-ID": "same-id"}
    for _ in range(3):
        async with client.post("/v1/chat/completions", json=HELLO, headers=headers) as resp:
            assert resp.status == 200 and resp.headers["X-Request-ID"] == "same-id"
    await app[USAGE_KEY].flush()
    (summary,) = await app[STORE_KEY].usage_summary(key_id=record.id)
    assert summary.requests == 3


@pytest.fixture
def own_pg() -> Iterator[Any]:
    """A PostgreSQL server of this test's own (it gets frozen)."""
    from tests.pg import own_server

    with own_server() as server:
        yield server


async def test_a_frozen_database_stalls_neither_requests_nor_readiness(
    aiohttp_client: AiohttpClient, make_settings: MakeSettings, own_pg: Any
) -> None:
    settings = make_settings(database=own_pg.admin_url, usage_flush_seconds=0.02)
    client = await start_gateway(aiohttp_client, settings)
    app = app_of(client)
    record, secret = await app[STORE_KEY].create_key(name="frozen")
    app[KEYS_KEY].put(record)
    headers = {"Authorization": f"Bearer {secret}"}
    loop = asyncio.get_running_loop()
    own_pg.pause()
    try:
        started = loop.time()
        for _ in range(20):  # the request path never waits on the database
            async with client.post("/v1/chat/completions", json=HELLO, headers=headers) as resp:
                assert resp.status == 200
        for _ in range(3):  # a bounded answer each time, not a 30 s query timeout
            async with client.get("/readyz") as resp:
                assert resp.status == 503
                assert (await resp.json())["database"] == "busy"
        assert loop.time() - started < 5
    finally:
        own_pg.resume()
    async with asyncio.timeout(NEVER_HANG * 2):
        while app[USAGE_KEY].pending:  # written once the database answers again
            with contextlib.suppress(Exception):
                await app[USAGE_KEY].flush()
    (summary,) = await app[STORE_KEY].usage_summary()
    assert summary.requests == 20


async def test_hostile_text_cannot_poison_a_usage_batch_or_a_key(
    aiohttp_client: AiohttpClient,
    aiohttp_server: AiohttpServer,
    make_settings: MakeSettings,
    database: str,
) -> None:
    """PostgreSQL's text holds no NUL character: a model name with one must neither fail the
    batch its row is in (every other row would wait with it) nor a key change."""
    fake = (await start_fakes(aiohttp_server, "openai"))["openai"]
    settings = make_settings(
        providers=(fake_provider("openai", fake),), database=database, admin_key=ADMIN
    )
    client = await start_gateway(aiohttp_client, settings)
    app = app_of(client)
    record, secret = await app[STORE_KEY].create_key(name="sly")
    app[KEYS_KEY].put(record)
    headers = {"Authorization": f"Bearer {secret}"}
    for model in ("openai/gpt\u0000x", "demo", "openai/gpt-4o"):
        body = {**HELLO, "model": model}
        async with client.post("/v1/chat/completions", json=body, headers=headers) as resp:
            await resp.read()
    await app[USAGE_KEY].flush()
    assert (await app[STORE_KEY].usage_summary())[0].requests == 3
    admin = {"Authorization": f"Bearer {ADMIN}"}
    for body in ({"name": "a\u0000b"}, {"name": "n", "notes": "\u0000"}):
        async with client.post("/admin/keys", json=body, headers=admin) as resp:
            assert resp.status == 400, await resp.text()
            assert (await resp.json())["error"]["type"] == "invalid_request_error"
    async with client.post("/admin/keys", json={"name": "fine", "metadata": {"k": "\u0000"}},
                           headers=admin) as resp:  # fmt: skip
        # (Refused since key text refuses control characters; before, JSON columns held it
        # escaped.) Written to the store directly, as a key made before, it still is.
        assert resp.status == 400, await resp.text()
    record, _ = await app[STORE_KEY].create_key(name="fine", metadata={"k": "\u0000"})
    assert (await app[STORE_KEY].get_key(record.id)) == record


async def test_a_nul_in_a_key_id_is_an_unknown_key(
    aiohttp_client: AiohttpClient, make_settings: MakeSettings, database: str
) -> None:
    client = await start_gateway(aiohttp_client, make_settings(database=database, admin_key=ADMIN))
    admin = {"Authorization": f"Bearer {ADMIN}"}
    for method, path in (
        ("GET", "/admin/keys/key_%00x"),
        ("PATCH", "/admin/keys/key_%00x"),
        ("DELETE", "/admin/keys/key_%00x"),
        ("GET", "/admin/usage?key=key_%00x"),
    ):
        async with client.request(method, path, headers=admin, json={"rpm": 1}) as resp:
            assert resp.status == 404, (method, path, await resp.text())
            assert (await resp.json())["error"]["code"] == "key_not_found"


async def test_a_cli_revocation_reaches_every_replica_within_a_second(
    aiohttp_client: AiohttpClient, make_settings: MakeSettings, pg_url: str, capsys: Any
) -> None:
    settings = make_settings(database=pg_url, keys_refresh_seconds=2.0)
    replicas = [await start_gateway(aiohttp_client, settings) for _ in range(3)]
    record, secret = await app_of(replicas[0])[STORE_KEY].create_key(name="cli")
    for replica in replicas:
        app_of(replica)[KEYS_KEY].put(record)
    user = {"Authorization": f"Bearer {secret}"}
    caches = [app_of(r)[KEYS_KEY] for r in replicas]

    seen: list[float] = []

    async def revoked(cache: Any) -> None:
        while True:
            loads = cache.loads
            key = cache.lookup(secret)
            if key is None or key.revoked_at is not None:
                seen.append(time.time())
                return
            await cache.wait_reload(loads)

    argv = ["keys", "revoke", record.id, "--db", pg_url]
    assert await asyncio.to_thread(cli.main, argv) == 0  # another process would do the same
    async with asyncio.timeout(NEVER_HANG):
        await asyncio.gather(*(revoked(c) for c in caches))
    # From the revocation (the CLI's clock as it writes it), not from the CLI's start: its
    # own start-up (a loop, a PostgreSQL connection) is not the change reaching the replicas.
    stored = await app_of(replicas[0])[STORE_KEY].get_key(record.id)
    assert stored is not None and stored.revoked_at is not None
    assert len(seen) == 3 and max(seen) - stored.revoked_at < 1.0
    for replica in replicas:
        resp = await replica.post("/v1/chat/completions", json=HELLO, headers=user)
        assert resp.status == 401


async def test_the_openai_sdk_sees_the_same_gateway_on_either_backend(
    aiohttp_client: AiohttpClient, make_settings: MakeSettings, database: str
) -> None:
    client = await start_gateway(aiohttp_client, make_settings(database=database))
    app = app_of(client)
    record, secret = await app[STORE_KEY].create_key(name="sdk", budget_tokens=10_000)
    app[KEYS_KEY].put(record)
    async with openai_client(client, secret) as oai:
        plain = await oai.chat.completions.create(model="demo", messages=[HELLO["messages"][0]])
        stream = await oai.chat.completions.create(
            model="demo",
            messages=[HELLO["messages"][0]],
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]
        assert chunks[-1].usage is not None
        with pytest.raises(openai.NotFoundError):
            await oai.chat.completions.create(model="nope", messages=[HELLO["messages"][0]])
    assert plain.usage is not None
    await app[USAGE_KEY].flush()
    await app[REFUSALS_KEY].flush()
    (row,) = await app[STORE_KEY].usage_summary(key_id=record.id)
    assert row.requests == 3 and row.errors == 1  # the unknown model is a counted refusal
    assert row.total_tokens == plain.usage.total_tokens + chunks[-1].usage.total_tokens
