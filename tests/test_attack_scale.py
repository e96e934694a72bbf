"""The scale-out mode attacked from outside: a Redis that answers garbage, goes slow, restarts
or comes back; a PostgreSQL whose listening connection is killed; replicas sharing a key's
limits under load. Each test starts the real PostgreSQL or Redis it needs."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import hiredis
import pytest
from aiohttp.pytest_plugin import AiohttpClient, AiohttpServer
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis
from structlog.testing import capture_logs

from gateway.admission import Ticket
from gateway.database import opened_database
from gateway.limits_redis import SharedGate
from gateway.state import GATE_KEY, KEYS_KEY, STORE_KEY
from tests.conftest import NEVER_HANG, MakeSettings, app_of, create_key, free_port, start_gateway
from tests.fakes import FakeOpenAI
from tests.redis_server import RedisServer
from tests.replicas import Replica
from tests.test_limits_redis import BODY, CHAT, auth, two_gateways


class GarbageRedis:
    """A TCP server that parses each RESP command and answers it with `reply`: well-formed
    RESP of the wrong shape for what was asked (a proxy or another service on Redis's port)."""

    def __init__(self, reply: bytes) -> None:
        self.reply = reply
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.commands = 0
        self.connected = asyncio.Event()  # a connection came (the circuit's probe's)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connected.set()
        parser = hiredis.Reader()
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                parser.feed(data)
                while parser.gets() is not False:
                    self.commands += 1
                    writer.write(self.reply)
                await writer.drain()
        writer.close()

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[GarbageRedis]:
        server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        async with server:
            yield self


DEMO = {"model": "demo", "messages": [{"role": "user", "content": "hi"}]}


async def post(gw: TestClient[Any, Any], secret: str) -> tuple[int, dict[str, Any]]:
    async with gw.post(CHAT, json=BODY, headers=auth(secret)) as resp:
        return resp.status, await resp.json()


def hold_four(
    gw: TestClient[Any, Any], secret: str, fake: FakeOpenAI
) -> tuple[asyncio.Event, list[asyncio.Task[tuple[int, dict[str, Any]]]]]:
    """Four requests of `secret` sent, each answered ("two words") only once the event is set:
    each holds its part of the key's budget until then (wait for them: `all_seen`)."""
    release = asyncio.Event()
    fake.always(content="two words", hold=release)
    return release, [asyncio.create_task(post(gw, secret)) for _ in range(4)]


async def all_seen(fake: FakeOpenAI, count: int) -> None:
    """Wait until the fake upstream has seen `count` chat requests in all."""
    async with asyncio.timeout(NEVER_HANG):
        while len(fake.chat_requests) < count:
            fake.request_seen.clear()
            await fake.request_seen.wait()


@pytest.mark.parametrize(
    "reply",
    [b"+OK\r\n", b":1\r\n", b"*0\r\n", b"*1\r\n$2\r\nok\r\n", b"*2\r\n$4\r\nrate\r\n$1\r\nx\r\n"],
    ids=["status", "integer", "empty-array", "short-ok", "bad-number"],
)
@pytest.mark.parametrize("fields", [{"rpm": 100}, {"tpm": 10_000}, {"budget_tokens": 10**6}])
async def test_a_redis_answering_garbage_is_an_outage_not_a_crash(
    aiohttp_server: AiohttpServer,
    aiohttp_client: AiohttpClient,
    make_settings: MakeSettings,
    reply: bytes,
    fields: dict[str, Any],
) -> None:
    async with GarbageRedis(reply).running() as garbage:
        _, gw, _ = await two_gateways(
            aiohttp_server, aiohttp_client, make_settings, redis_url=garbage.url
        )
        secret = await create_key(gw, **fields)
        for _ in range(3):
            code, body = await post(gw, secret)
            assert code == 503, body
            assert body["error"]["code"] == "limits_unavailable"
        async with gw.get("/readyz") as resp:
            assert resp.status == 503
            assert (await resp.json())["limits"] == "redis down: refuse"


async def test_after_a_server_speaking_garbage_the_real_redis_is_found_again(
    aiohttp_server: AiohttpServer,
    aiohttp_client: AiohttpClient,
    make_settings: MakeSettings,
    tmp_path: Path,
) -> None:
    """Redis's port answered by something else for a while (+OK to everything), then Redis
    again: the circuit's probe met replies it could not parse, and must go on probing; and
    while the impostor answers, a probe's +OK to PING is not Redis coming back."""
    garbage = GarbageRedis(b"+OK\r\n")
    async with garbage.running():
        _, gw, _ = await two_gateways(
            aiohttp_server, aiohttp_client, make_settings, redis_url=garbage.url
        )
        secret = await create_key(gw, rpm=100)
        assert (await post(gw, secret))[0] == 503
        garbage.connected.clear()
        async with asyncio.timeout(NEVER_HANG):
            await garbage.connected.wait()  # the probe
            garbage.connected.clear()
            await garbage.connected.wait()  # and the next one, a second later
        async with gw.get("/readyz") as resp:
            assert (await resp.json())["limits"] == "redis down: refuse"
    redis = RedisServer(tmp_path, garbage.port).start()
    try:
        async with asyncio.timeout(NEVER_HANG):
            while (await post(gw, secret))[0] != 200:  # noqa: ASYNC110 (the probe's clock)
                await asyncio.sleep(0.1)
        async with gw.get("/readyz") as resp:
            assert (await resp.json())["limits"] == "redis"
    finally:
        redis.stop()


async def test_a_lease_renewal_answered_with_garbage_opens_the_circuit(tmp_path: Path) -> None:
    """The renewal loop meets an impostor on Redis's port: that is an outage (the circuit
    opens), not an exception that ends the loop, after which every lease of this replica's
    requests would lapse while they run (their slots free for others) until a restart."""
    async with (
        GarbageRedis(b"+OK\r\n").running() as garbage,
        opened_database(str(tmp_path / "keys.db")) as store,
    ):
        key, _ = await store.create_key(name="k", max_concurrency=1)
        gate = SharedGate(store, Redis.from_url(garbage.url))
        try:
            ticket = Ticket(key=key, limited=True, budgeted=False, shared=True, lease="r:1")
            gate._leases["r:1"] = ticket
            await gate.renew()
            assert not gate.up
        finally:
            await gate.close()


@pytest.mark.parametrize("how", ["terminated", "frozen"])
async def test_a_revocation_reaches_a_replica_whose_listening_connection_died(
    aiohttp_client: AiohttpClient, make_settings: MakeSettings, pg_url: str, how: str
) -> None:
    """B's LISTEN connection is killed (pg_terminate_backend) or goes silent (its backend
    frozen: the socket stays open, no notification comes): a key revoked on A stops working
    on B within `keys_refresh_seconds` (the poll), and after a kill B listens again."""
    settings = make_settings(database=pg_url, keys_refresh_seconds=1.0)
    a = await start_gateway(aiohttp_client, settings)
    b = await start_gateway(aiohttp_client, settings)
    secret = await create_key(a, name="shared")
    cache_b = app_of(b)[KEYS_KEY]
    async with asyncio.timeout(NEVER_HANG):
        while cache_b.lookup(secret) is None:
            await cache_b.wait_reload(cache_b.loads)
    admin = await asyncpg.connect(pg_url)
    try:
        listening = await admin.fetch(
            "SELECT pid FROM pg_stat_activity WHERE query LIKE 'LISTEN%' AND datname = $1",
            pg_url.rsplit("/", 1)[1],
        )
        assert len(listening) == 2  # one a replica
        b_pid = await _listener_of(admin, b, listening)
        if how == "terminated":
            assert await admin.fetchval("SELECT pg_terminate_backend($1)", b_pid)
        else:
            os.kill(b_pid, signal.SIGSTOP)
        try:
            key = app_of(a)[KEYS_KEY].lookup(secret)
            assert key is not None
            started = time.monotonic()
            await app_of(a)[STORE_KEY].revoke_key(key.id)
            async with asyncio.timeout(NEVER_HANG):
                while (await post(b, secret))[0] != 401:
                    await cache_b.wait_reload(cache_b.loads)
            assert time.monotonic() - started < 1.0 + 0.5  # one poll, and a margin
        finally:
            if how == "frozen":
                os.kill(b_pid, signal.SIGCONT)
        if how == "terminated":  # B listens again: a change reaches it at once, not by a poll
            other = await create_key(a, name="later")
            started = time.monotonic()
            async with asyncio.timeout(NEVER_HANG):
                while cache_b.lookup(other) is None:
                    await cache_b.wait_reload(cache_b.loads)
            assert time.monotonic() - started < 0.5
    finally:
        await admin.close()


async def _listener_of(
    admin: asyncpg.Connection, gw: TestClient[Any, Any], listening: list[Any]
) -> int:
    """The backend pid of `gw`'s listening connection."""
    conn = app_of(gw)[STORE_KEY]._listener._conn  # type: ignore[union-attr]
    assert conn is not None
    pid: int = conn.get_server_pid()
    assert pid in {row[0] for row in listening}
    return pid


@pytest.fixture
def own_pg() -> Iterator[Any]:
    """A PostgreSQL server of this test's own (it gets stopped)."""
    from tests.pg import own_server

    with own_server() as server:
        yield server


async def test_a_stop_while_postgresql_is_down_ends_soon_and_counts_what_it_lost(
    tmp_path: Path, own_pg: Any
) -> None:
    """`gateway serve` on PostgreSQL answers requests while the database is down; SIGTERM
    then ends it in bounded time, with exit status 3 and the number of rows it could not
    write in the log line and on stderr; the rows written before the outage are there once."""
    config = tmp_path / "gateway.toml"
    config.write_text(
        f'[server]\ndatabase = "{own_pg.admin_url}"\nusage_flush_seconds = 0.05\n'
        'shutdown_grace_seconds = 5\nlog_level = "warning"\n'
    )
    secret = await create_key_in(own_pg.admin_url)
    replica = await Replica(config).start()
    try:
        async with aiohttp.ClientSession() as session:
            headers = {"Authorization": f"Bearer {secret}"}
            for _ in range(3):
                async with session.post(f"{replica.url}{CHAT}", json=DEMO, headers=headers) as r:
                    assert r.status == 200
            async with asyncio.timeout(NEVER_HANG):
                while await count_rows(own_pg.admin_url) < 3:  # noqa: ASYNC110 (another process)
                    await asyncio.sleep(0.05)
            await asyncio.to_thread(own_pg.stop)
            for _ in range(5):
                async with session.post(f"{replica.url}{CHAT}", json=DEMO, headers=headers) as r:
                    assert r.status == 200
            async with session.get(f"{replica.url}/readyz") as r:
                assert r.status == 503
        started = time.monotonic()
        code = await replica.stop()
        assert time.monotonic() - started < 15
    finally:
        replica.kill()
    assert code == 3
    lines = [line for line in replica.log.decode().splitlines() if "usage_rows_lost" in line]
    assert len(lines) == 1 and '"rows":5' in lines[0], replica.log.decode()[-3000:]
    await asyncio.to_thread(own_pg.start)
    assert await count_rows(own_pg.admin_url) == 3


async def create_key_in(url: str) -> str:
    async with opened_database(url) as store:
        _, secret = await store.create_key(name="k")
    return secret


async def count_rows(url: str) -> int:
    conn = await asyncpg.connect(url)
    try:
        found: int = await conn.fetchval("SELECT COUNT(*) FROM usage")
    finally:
        await conn.close()
    return found


async def test_requests_that_end_while_redis_is_frozen_count_once_it_answers(
    aiohttp_server: AiohttpServer,
    aiohttp_client: AiohttpClient,
    make_settings: MakeSettings,
    redis_server: RedisServer,
) -> None:
    """Requests in flight end while Redis is frozen (SIGSTOP: the ends time out, the circuit
    opens), then Redis answers again with its data. Their use must reach the key's shared
    spending, once, and their holds go: the ends were dropped, so a total budget never
    counted them (the counter is only seeded again when Redis loses it) and their holds
    blocked the budget until their leases lapsed."""
    fake, gw, _ = await two_gateways(
        aiohttp_server, aiohttp_client, make_settings, redis_url=redis_server.url
    )
    fake.always(content="two words")  # 8 prompt tokens + 2: every request uses 10
    secret = await create_key(gw, budget_tokens=10_000, budget_period="total")
    assert (await post(gw, secret))[0] == 200  # seeds the spending, and counts 10
    gate = app_of(gw)[GATE_KEY]
    assert isinstance(gate, SharedGate)
    release, tasks = hold_four(gw, secret, fake)
    await all_seen(fake, 5)  # each holds its budget, in Redis
    assert redis_server.process is not None
    redis_server.process.send_signal(signal.SIGSTOP)
    try:
        release.set()
        assert [code for code, _ in await asyncio.gather(*tasks)] == [200] * 4
        async with asyncio.timeout(NEVER_HANG):
            while gate._ender is not None and not gate._ender.done():  # their ends time out
                await asyncio.wait([gate._ender])
        assert not gate.up
    finally:
        redis_server.process.send_signal(signal.SIGCONT)
    async with asyncio.timeout(NEVER_HANG):
        assert gate._probe is not None
        await gate._probe  # Redis answers again
        while gate._ender is not None and not gate._ender.done():
            await asyncio.wait([gate._ender])
    key = app_of(gw)[KEYS_KEY].lookup(secret)
    assert key is not None
    spend = await gate.spending(key)
    assert spend is not None
    assert (spend.tokens, spend.held_tokens) == (50, 0)


async def test_a_budget_seed_that_meets_postgresql_down_is_not_a_redis_outage(
    aiohttp_server: AiohttpServer,
    aiohttp_client: AiohttpClient,
    make_settings: MakeSettings,
    redis_url: str,
    own_pg: Any,
) -> None:
    """PostgreSQL is down when a budget's spending must be seeded into Redis (its first
    request of a period, or Redis lost it): that request gets a 503 saying the database is
    busy, not a 500, and Redis, which answers, is not taken for down: other limited keys go
    on through it, and no `redis_unreachable` is logged."""
    _, gw, _ = await two_gateways(
        aiohttp_server,
        aiohttp_client,
        make_settings,
        redis_url=redis_url,
        database=own_pg.admin_url,
    )
    budgeted = await create_key(gw, budget_tokens=10_000, budget_period="day")
    limited = await create_key(gw, rpm=1000)
    await asyncio.to_thread(own_pg.stop)
    try:
        with capture_logs() as logs:
            code, body = await post(gw, budgeted)
            assert code == 503, body
            assert body["error"]["code"] == "database_busy"
            assert (await post(gw, limited))[0] != 503
        assert "redis_unreachable" not in [e["event"] for e in logs]
        gate = app_of(gw)[GATE_KEY]
        assert isinstance(gate, SharedGate) and gate.up
    finally:
        await asyncio.to_thread(own_pg.start)
    assert (await post(gw, budgeted))[0] != 503


async def test_a_redis_restart_that_lost_its_data_resets_no_budget_for_free(
    aiohttp_server: AiohttpServer,
    aiohttp_client: AiohttpClient,
    make_settings: MakeSettings,
    redis_server: RedisServer,
) -> None:
    """Redis restarts empty between requests: the key's spending is seeded again from the
    usage table: what was spent stays spent, counted once."""
    fake, gw, _ = await two_gateways(
        aiohttp_server, aiohttp_client, make_settings, redis_url=redis_server.url
    )
    fake.always(content="two words")  # every request uses 10 tokens
    secret = await create_key(gw, budget_tokens=1000, budget_period="total")
    assert [(await post(gw, secret))[0] for _ in range(5)] == [200] * 5  # 50 spent
    redis_server.stop()
    redis_server.start()
    gate = app_of(gw)[GATE_KEY]
    async with asyncio.timeout(NEVER_HANG):
        while (code := (await post(gw, secret))[0]) == 503:  # noqa: ASYNC110 (the probe)
            await asyncio.sleep(0.1)
    assert code == 200
    key = app_of(gw)[KEYS_KEY].lookup(secret)
    assert key is not None and isinstance(gate, SharedGate)
    async with asyncio.timeout(NEVER_HANG):
        while gate._ender is not None and not gate._ender.done():
            await asyncio.wait([gate._ender])
    spend = await gate.spending(key)
    assert spend is not None and spend.tokens == 60
