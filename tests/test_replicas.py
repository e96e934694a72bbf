"""Several real `gateway serve` processes sharing one SQLite file (or one PostgreSQL) and one
real Redis: a budget and a request rate hold across them, a Redis outage is refused as
configured, and `--workers N` serves one port from N processes."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sqlite3
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from aiohttp import ClientSession, ClientTimeout, TCPConnector
from aiohttp.pytest_plugin import AiohttpServer

from gateway.database import opened_database
from gateway.records import UsageRecord
from tests.conftest import NEVER_HANG
from tests.fakes import FakeOpenAI
from tests.redis_server import RedisServer
from tests.replicas import (
    Replica,
    both_workers_serve,
    create_key,
    prefixes,
    replicas,
    usage_rows,
    usage_rows_pg,
    wait_known,
    write_config,
)

BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 50}


@contextlib.asynccontextmanager
async def released(event: asyncio.Event) -> AsyncIterator[None]:
    """Whatever happens, the fake upstream's held handlers end (its teardown waits for them)."""
    try:
        yield
    finally:
        event.set()


async def post(session: ClientSession, url: str, secret: str) -> tuple[int, str]:
    """A chat request; its status and the request id's per-process prefix."""
    headers = {"Authorization": f"Bearer {secret}"}
    async with session.post(f"{url}/v1/chat/completions", json=BODY, headers=headers) as resp:
        await resp.read()
        return resp.status, resp.headers.get("X-Request-ID", "")[:20]


async def a_hundred_over_two(
    config: Path, secret: str, fake: FakeOpenAI, release: asyncio.Event
) -> tuple[list[tuple[int, str]], list[Replica]]:
    """100 concurrent requests spread over two replicas, the upstream's answers held until
    every request is either refused or upstream; each result, and the stopped replicas."""
    async with replicas(config, 2) as group, ClientSession() as session, released(release):
        urls = [r.url for r in group]
        await wait_known(session, urls, secret)
        tasks = [asyncio.create_task(post(session, urls[i % 2], secret)) for i in range(100)]
        async with asyncio.timeout(NEVER_HANG):
            while sum(t.done() for t in tasks) + len(fake.chat_requests) < len(tasks):
                fake.request_seen.clear()
                seen = asyncio.create_task(fake.request_seen.wait())
                await asyncio.wait(
                    [seen, *[t for t in tasks if not t.done()]],
                    return_when=asyncio.FIRST_COMPLETED,
                )
                seen.cancel()
            release.set()
            results = await asyncio.gather(*tasks)
        for replica in group:
            assert await replica.stop() == 0  # every usage row written
    return results, group


async def test_a_hundred_requests_over_two_replicas_stay_within_one_budget(
    tmp_path: Path, aiohttp_server: AiohttpServer, redis_server: RedisServer
) -> None:
    fake = FakeOpenAI()
    await fake.start(aiohttp_server)
    release = asyncio.Event()
    fake.always(content="word " * 40, hold=release)  # 48 tokens each; held until all decided
    config = write_config(tmp_path, fake.base_url, redis_server.url)
    budget = 1000
    secret = await create_key(tmp_path / "keys.db", budget_tokens=budget, budget_period="day")
    results, group = await a_hundred_over_two(config, secret, fake, release)
    statuses = [s for s, _ in results]
    admitted = [tokens for status, tokens in usage_rows(tmp_path / "keys.db") if status == 200]
    logs = b"".join(r.log for r in group).decode(errors="replace")
    rows = usage_rows(tmp_path / "keys.db")
    assert statuses.count(200) == len(admitted) >= 10, (rows, logs)  # 1000: ~17 of 58
    assert statuses.count(429) == 100 - len(admitted)
    assert sum(admitted) <= budget + max(admitted)
    assert len({prefix for _, prefix in results}) == 2  # both replicas answered


def spent_before(key_id: str, tokens: int) -> UsageRecord:
    """A usage row of today, as an earlier request of the key left it."""
    return UsageRecord(
        ts=time.time(),
        request_id="seeded",
        key_id=key_id,
        model="m",
        provider="up",
        upstream_model="gpt-4o-mini",
        endpoint="/v1/chat/completions",
        stream=False,
        status=200,
        prompt_tokens=0,
        completion_tokens=tokens,
        total_tokens=tokens,
        uid="seeded-1",
    )


async def test_two_replicas_on_postgresql_and_redis_share_a_budget_and_write_each_row_once(
    tmp_path: Path, aiohttp_server: AiohttpServer, redis_server: RedisServer, pg_url: str
) -> None:
    # The whole scale-out set-up: keys, usage and the spent total seeded from PostgreSQL,
    # limits in Redis, two processes; 400 tokens are spent before the replicas start.
    fake = FakeOpenAI()
    await fake.start(aiohttp_server)
    release = asyncio.Event()
    fake.always(content="word " * 40, hold=release)  # 48 tokens each; held until all decided
    config = write_config(tmp_path, fake.base_url, redis_server.url, database=pg_url)
    budget = 1000
    secret = await create_key(pg_url, budget_tokens=budget, budget_period="day")
    async with opened_database(pg_url) as db:
        key_id = (await db.list_keys())[0].id
        await db.insert_usage([spent_before(key_id, tokens=400)])
    results, group = await a_hundred_over_two(config, secret, fake, release)
    rows = await usage_rows_pg(pg_url)
    new = [(status, tokens, rid) for status, tokens, rid in rows if rid != "seeded"]
    admitted = [tokens for status, tokens, _ in new if status == 200]
    statuses = [s for s, _ in results]
    logs = b"".join(r.log for r in group).decode(errors="replace")
    assert statuses.count(200) == len(admitted) >= 5, (rows, logs)  # 600 left: ~12 of 48
    assert statuses.count(429) == 100 - len(admitted)
    assert 400 + sum(admitted) <= budget + max(admitted)
    ids = [rid for status, _, rid in new if status == 200]
    assert len(ids) == len(set(ids)) == statuses.count(200)  # each answer's row, once
    assert len({prefix for _, prefix in results}) == 2  # both replicas answered


async def test_a_request_rate_holds_across_three_replicas_within_5_percent(
    tmp_path: Path, aiohttp_server: AiohttpServer, redis_server: RedisServer
) -> None:
    fake = FakeOpenAI()
    await fake.start(aiohttp_server)
    config = write_config(tmp_path, fake.base_url, redis_server.url)
    rpm = 60
    secret = await create_key(tmp_path / "keys.db", rpm=rpm)
    async with replicas(config, 3) as group, ClientSession() as session:
        urls = [r.url for r in group]
        await wait_known(session, urls, secret)
        started = time.monotonic()
        results = await asyncio.gather(*(post(session, urls[i % 3], secret) for i in range(150)))
        elapsed = time.monotonic() - started
    admitted = [s for s, _ in results].count(200)
    # A full bucket of 60, and one more per second the burst took (it refills at 1/s).
    assert rpm * 0.95 <= admitted <= rpm * 1.05 + elapsed
    assert [s for s, _ in results].count(429) == 150 - admitted


async def test_a_redis_outage_is_refused_by_every_replica(
    tmp_path: Path, aiohttp_server: AiohttpServer, redis_server: RedisServer
) -> None:
    fake = FakeOpenAI()
    await fake.start(aiohttp_server)
    config = write_config(tmp_path, fake.base_url, redis_server.url, redis_failure="refuse")
    limited = await create_key(tmp_path / "keys.db", rpm=1000)
    free = await create_key(tmp_path / "keys.db")
    async with replicas(config, 2) as group, ClientSession() as session:
        urls = [r.url for r in group]
        await wait_known(session, urls, limited)
        await wait_known(session, urls, free)
        assert [(await post(session, url, limited))[0] for url in urls] == [200, 200]
        redis_server.stop()
        started = time.monotonic()
        for url in urls:
            for _ in range(5):
                assert (await post(session, url, limited))[0] == 503
            assert (await post(session, url, free))[0] == 200
        assert time.monotonic() - started < 5  # never a hang, nor a timeout per request
        for url in urls:
            async with session.get(f"{url}/readyz") as resp:
                assert resp.status == 503


async def test_workers_share_one_port_restart_and_stop_together(
    tmp_path: Path, aiohttp_server: AiohttpServer, redis_server: RedisServer
) -> None:
    fake = FakeOpenAI()
    await fake.start(aiohttp_server)
    config = write_config(tmp_path, fake.base_url, redis_server.url)
    secret = await create_key(tmp_path / "keys.db", rpm=30)
    async with replicas(config, 1, "--workers", "2") as (parent,):
        seen = await prefixes(parent.url, 200)
        assert len(seen) == 2  # two processes answer on the one port
        async with ClientSession() as session:
            await wait_known(session, [parent.url], secret)
            statuses = [(await post(session, parent.url, secret))[0] for _ in range(40)]
        assert statuses.count(200) == 30  # one rate across the workers
        assert parent.proc is not None
        # SIGHUP to the parent reaches every worker: each serves the new model.
        config.write_text(config.read_text() + '\n[[models]]\nname = "m2"\n'
                          'targets = [{ provider = "up", model = "gpt-4o" }]\n')  # fmt: skip
        parent.proc.send_signal(signal.SIGHUP)
        async with asyncio.timeout(NEVER_HANG):
            while True:  # each worker reloads on its own loop, in its own time
                if await models_everywhere(parent.url, secret) == {"m2"}:
                    break
                await asyncio.sleep(0.05)
        # A worker that dies is started again; the other serves meanwhile.
        children = child_pids(parent.proc.pid)
        assert len(children) == 2
        victim = min(children)
        os.kill(victim, signal.SIGKILL)
        async with asyncio.timeout(NEVER_HANG):
            while True:  # gone (the connections it held die with it: none now)
                if not _alive(victim):
                    break
                await asyncio.sleep(0.02)
            while True:  # restarted after a second; it serves once it has started
                if len(await prefixes(parent.url, 50)) == 2:
                    break
                await asyncio.sleep(0.1)
        assert victim not in child_pids(parent.proc.pid)
        assert len(child_pids(parent.proc.pid)) == 2
        assert await parent.stop() == 0
        assert not child_pids(parent.proc.pid)


async def test_workers_stop_when_their_parent_dies(
    tmp_path: Path, aiohttp_server: AiohttpServer, redis_server: RedisServer
) -> None:
    fake = FakeOpenAI()
    await fake.start(aiohttp_server)
    config = write_config(tmp_path, fake.base_url, redis_server.url)
    async with replicas(config, 1, "--workers", "2") as (parent,):
        assert parent.proc is not None
        children = child_pids(parent.proc.pid)
        assert len(children) == 2
        parent.proc.kill()  # SIGKILL: it cannot tell them
        await parent.proc.wait()
        async with asyncio.timeout(NEVER_HANG):
            while True:  # they read EOF on its pipe and stop (no event reaches us)
                if not any(_alive(pid) for pid in children):
                    break
                await asyncio.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def child_pids(parent: int) -> set[int]:
    """The processes whose parent is `parent` (from /proc)."""
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == parent and fields[0] != "Z":
            found.add(int(stat.parent.name))
    return found


async def models_everywhere(url: str, secret: str) -> set[str]:
    """Which of the models `m2` every answer of 20 fresh connections lists (empty: some do not)."""
    connector = TCPConnector(force_close=True)
    headers = {"Authorization": f"Bearer {secret}"}
    async with ClientSession(connector=connector, headers=headers) as session:

        async def one() -> bool:
            async with session.get(f"{url}/v1/models") as resp:
                return "m2" in {m["id"] for m in (await resp.json())["data"]}

        answers = await asyncio.gather(*(one() for _ in range(20)))
    return {"m2"} if all(answers) else set()


async def test_workers_without_redis_refuse_to_start(tmp_path: Path) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text(f'[server]\ndatabase = "{tmp_path / "keys.db"}"\n')
    replica = Replica(config, "--workers", "2")
    proc = await asyncio.create_subprocess_exec(
        *_argv(replica), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    _, err = await proc.communicate()
    assert proc.returncode == 2
    assert err.decode().strip().splitlines() == [
        "gateway: --workers 2 needs [server] redis_url: without it each worker would keep "
        "its own rate limits and budgets"
    ]


def _argv(replica: Replica) -> list[Any]:
    return [sys.executable, "-m", "gateway", "serve", "--config", str(replica.config),
            "--port", str(replica.port), *replica.extra]  # fmt: skip


async def test_every_worker_refuses_another_keys_stored_response(
    tmp_path: Path, aiohttp_server: AiohttpServer, redis_server: RedisServer
) -> None:
    """Bob's response, answered by one worker, is not found for alice on either worker (the
    other learns it from the database), and bob continues it on both."""
    fake = FakeOpenAI()
    await fake.start(aiohttp_server)
    config = write_config(tmp_path, fake.base_url, redis_server.url)
    text = config.read_text().replace(
        'type = "openai"\n', 'type = "openai"\nresponses_api = true\n'
    )
    config.write_text(text)
    database = tmp_path / "keys.db"
    bob, alice = await create_key(database), await create_key(database)

    async def respond(session: ClientSession, secret: str, **fields: Any) -> tuple[int, str]:
        headers = {"Authorization": f"Bearer {secret}"}
        body = {"model": "m", "input": "Payroll: Dana 9,120 EUR"} | fields
        async with session.post(f"{url}/v1/responses", json=body, headers=headers) as resp:
            answer = await resp.json()
            if resp.status == 200:
                return resp.status, answer["id"]
            assert answer["error"]["param"] == "previous_response_id", answer
            return resp.status, resp.headers["X-Request-ID"][:20]

    async with replicas(config, 1, "--workers", "2") as (parent,):
        url = parent.url
        # Every request on a new connection: the kernel hands each to either worker.
        connector = TCPConnector(force_close=True)
        timeout = ClientTimeout(total=NEVER_HANG)
        async with ClientSession(connector=connector, timeout=timeout) as session:
            await wait_known(session, [url], bob)
            await wait_known(session, [url], alice)
            await both_workers_serve(url)
            status, response_id = await respond(session, bob)
            assert status == 200
            async with asyncio.timeout(NEVER_HANG):
                while True:  # written by the worker within usage_flush_seconds (0.1 s)
                    if stored(database, response_id):
                        break
                    await asyncio.sleep(0.02)
            sent = len(fake.responses_requests)
            workers: set[str] = set()
            for _ in range(10):  # (a busy worker may leave a round's connections to the other)
                tries = [
                    respond(session, alice, previous_response_id=response_id) for _ in range(40)
                ]
                refused = await asyncio.gather(*tries)
                assert {status for status, _ in refused} == {404}
                workers |= {worker for _, worker in refused}
                if len(workers) == 2:
                    break
            assert len(workers) == 2  # both workers refused it
            assert len(fake.responses_requests) == sent
            own = [respond(session, bob, previous_response_id=response_id) for _ in range(10)]
            assert {status for status, _ in await asyncio.gather(*own)} == {200}


def stored(database: Path, stored_id: str) -> bool:
    """Whether the database holds `stored_id` (`gateway.stored_share`)."""
    with contextlib.closing(sqlite3.connect(database)) as conn:
        return bool(conn.execute("SELECT 1 FROM stored_ids WHERE id = ?", (stored_id,)).fetchall())
