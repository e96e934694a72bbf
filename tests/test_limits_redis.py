"""Limits shared through a real Redis: two gateways on one Redis count as one; leases of a
crashed replica expire; a Redis outage refuses or falls back to local limits, as configured,
without a hang and logged once."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from aiohttp.pytest_plugin import AiohttpClient, AiohttpServer
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis
from structlog.testing import capture_logs

from gateway.database import opened_database
from gateway.limits_redis import SharedGate
from gateway.records import UsageRecord, mint_uid
from gateway.settings import ModelConfig, OpenAIConfig, Target
from gateway.state import GATE_KEY, INFLIGHT_KEY, KEYS_KEY, STORE_KEY
from tests.conftest import NEVER_HANG, MakeSettings, app_of, create_key, start_gateway
from tests.fakes import FakeOpenAI
from tests.redis_server import RedisServer
from tests.test_accounting import ADMIN, new_key, patch
from tests.test_limits_midflight import held, status_of, streams

CHAT = "/v1/chat/completions"
BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 50}


def auth(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


async def two_gateways(
    aiohttp_server: AiohttpServer,
    aiohttp_client: AiohttpClient,
    make_settings: MakeSettings,
    **server: Any,
) -> tuple[FakeOpenAI, TestClient[Any, Any], TestClient[Any, Any]]:
    """Two gateways on one database and one Redis, as two replicas would be."""
    fake = FakeOpenAI()
    await fake.start(aiohttp_server)
    settings = make_settings(
        providers=(OpenAIConfig(name="up", base_url=fake.base_url),),
        models=(ModelConfig(name="m", targets=(Target(provider="up", model="gpt-4o-mini"),)),),
        **server,
    )
    one = await start_gateway(aiohttp_client, settings)
    two = await start_gateway(aiohttp_client, settings)
    return fake, one, two


async def known(gw: TestClient[Any, Any], secret: str) -> None:
    """Make a replica's key cache read the database now (as its next poll would)."""
    await app_of(gw)[KEYS_KEY].load()
    assert app_of(gw)[KEYS_KEY].lookup(secret) is not None


async def status(gw: TestClient[Any, Any], secret: str) -> tuple[int, dict[str, Any]]:
    async with gw.post(CHAT, json=BODY, headers=auth(secret)) as resp:
        return resp.status, await resp.json()


async def test_two_replicas_share_one_request_rate(
    aiohttp_server: AiohttpServer,
    aiohttp_client: AiohttpClient,
    make_settings: MakeSettings,
    redis_url: str,
) -> None:
    _, one, two = await two_gateways(
        aiohttp_server, aiohttp_client, make_settings, redis_url=redis_url
    )
    secret = await create_key(one, rpm=10)
    await known(two, secret)
    results = [await status(one if i % 2 else two, secret) for i in range(20)]
    statuses = [s for s, _ in results]
    assert statuses[:10] == [200] * 10
    assert statuses[10:] == [429] * 10
    assert "requests per minute (limit 10)" in results[-1][1]["error"]["message"]
    async with one.post(CHAT, json=BODY, headers=auth(secret)) as resp:
        assert resp.headers["x-ratelimit-limit-requests"] == "10"
        assert resp.headers["x-ratelimit-remaining-requests"] == "0"


async def test_two_replicas_share_concurrency_and_budget(
    aiohttp_server: AiohttpServer,
    aiohttp_client: AiohttpClient,
    make_settings: MakeSettings,
    redis_url: str,
) -> None:
    fake, one, two = await two_gateways(
        aiohttp_server, aiohttp_client, make_settings, redis_url=redis_url
    )
    secret = await create_key(one, max_concurrency=1, budget_tokens=100, budget_period="day")
    await known(two, secret)
    release = asyncio.Event()
    fake.always(hold=release)
    first = asyncio.create_task(status(one, secret))
    async with asyncio.timeout(NEVER_HANG):
        await fake.request_seen.wait()
    refused, body = await status(two, secret)  # the other replica sees the slot taken
    assert refused == 429 and "in flight" in body["error"]["message"]
    release.set()
    assert (await first)[0] == 200
    fake.always()
    codes = [(await status(two if i % 2 else one, secret))[0] for i in range(6)]
    assert codes.count(429) >= 2  # ~10 tokens each, admitted while 58 more fit in 100
    record = app_of(one)[KEYS_KEY].lookup(secret)
    assert record is not None
    spend = await app_of(one)[GATE_KEY].spending(record)
    assert spend is not None and 40 <= spend.tokens <= 100


async def test_a_crashed_replicas_slots_and_holds_expire_with_their_lease(
    aiohttp_server: AiohttpServer,
    aiohttp_client: AiohttpClient,
    make_settings: MakeSettings,
    redis_url: str,
) -> None:
    _, gw, _ = await two_gateways(
        aiohttp_server, aiohttp_client, make_settings, redis_url=redis_url
    )
    secret = await create_key(gw, max_concurrency=1, budget_tokens=100, budget_period="total")
    key = app_of(gw)[KEYS_KEY].lookup(secret)
    assert key is not None
    store = app_of(gw)[STORE_KEY]
    crashed = SharedGate(store, Redis.from_url(redis_url), lease=0.5)
    alive = SharedGate(store, Redis.from_url(redis_url), lease=0.5)
    try:
        ticket = await crashed.admit(key)  # a slot and most of the budget, never given back
        assert ticket is not None
        await crashed.hold(ticket, (60, 0.0), (90, 0.0))
        with pytest.raises(Exception, match="in flight"):
            await alive.admit(key)
        deadline = time.monotonic() + NEVER_HANG
        while True:  # the lease ends on Redis's clock; nothing here can signal it
            try:
                later = await alive.admit(key)
                break
            except Exception:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
        assert later is not None
        await alive.hold(later, (60, 0.0), (90, 0.0))  # the crashed hold is gone too
        alive.settle(later, 10, 0.0)
        alive.leave(later)
        await alive.close()
    finally:
        await crashed.close()


async def test_leases_are_renewed_while_a_request_runs(
    aiohttp_server: AiohttpServer,
    aiohttp_client: AiohttpClient,
    make_settings: MakeSettings,
    redis_url: str,
) -> None:
    _, gw, _ = await two_gateways(
        aiohttp_server, aiohttp_client, make_settings, redis_url=redis_url
    )
    secret = await create_key(gw, max_concurrency=1)
    key = app_of(gw)[KEYS_KEY].lookup(secret)
    assert key is not None
    store = app_of(gw)[STORE_KEY]
    running = SharedGate(store, Redis.from_url(redis_url), lease=0.3)
    other = SharedGate(store, Redis.from_url(redis_url), lease=0.3)
    try:
        ticket = await running.admit(key)
        assert ticket is not None
        for _ in range(5):  # five renewals span five leases
            await running.renew()
            await asyncio.sleep(0.1)
            with pytest.raises(Exception, match="in flight"):
                await other.admit(key)
        running.leave(ticket)
        await running.close()
        assert await other.admit(key) is not None
    finally:
        await other.close()


async def outage_gateway(
    aiohttp_server: AiohttpServer,
    aiohttp_client: AiohttpClient,
    make_settings: MakeSettings,
    server: RedisServer,
    failure: str,
) -> TestClient[Any, Any]:
    fake, gw, _ = await two_gateways(
        aiohttp_server,
        aiohttp_client,
        make_settings,
        redis_url=server.url,
        redis_failure=failure,
    )
    fake.always(content="two words")  # 8 prompt tokens + 2: every request uses 10
    return gw


async def test_redis_outage_refuses_with_503_at_once_and_recovers(
    aiohttp_server: AiohttpServer,
    aiohttp_client: AiohttpClient,
    make_settings: MakeSettings,
    redis_server: RedisServer,
) -> None:
    gw = await outage_gateway(aiohttp_server, aiohttp_client, make_settings, redis_server, "refuse")
    limited = await create_key(gw, rpm=100)
    free = await create_key(gw)
    assert (await status(gw, limited))[0] == 200
    redis_server.stop()
    with capture_logs() as logs:
        started = time.monotonic()
        for _ in range(20):
            code, body = await status(gw, limited)
            assert code == 503
            assert body["error"]["code"] == "limits_unavailable"
            assert set(body["error"]) == {"message", "type", "param", "code"}
        assert time.monotonic() - started < 5  # no timeout per request: the circuit is open
        assert (await status(gw, free))[0] == 200  # keys without limits need no Redis
        async with gw.get("/readyz") as resp:
            assert resp.status == 503
            assert (await resp.json())["limits"] == "redis down: refuse"
        redis_server.start()
        deadline = time.monotonic() + NEVER_HANG
        while (await status(gw, limited))[0] != 200:  # the probe pings once a second
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)
    events = [e["event"] for e in logs]
    assert events.count("redis_unreachable") == 1
    assert events.count("redis_reachable") == 1


async def test_redis_outage_falls_back_to_local_limits(
    aiohttp_server: AiohttpServer,
    aiohttp_client: AiohttpClient,
    make_settings: MakeSettings,
    redis_server: RedisServer,
) -> None:
    gw = await outage_gateway(aiohttp_server, aiohttp_client, make_settings, redis_server, "local")
    secret = await create_key(gw, rpm=3)
    budgeted = await create_key(gw, budget_tokens=75, budget_period="day")
    assert (await status(gw, budgeted))[0] == 200  # spends 10 of 75, through Redis
    redis_server.stop()
    codes = [(await status(gw, secret))[0] for _ in range(5)]
    assert codes == [200, 200, 200, 429, 429]  # this replica's own bucket of 3
    # The fallback read what was spent from the usage table (10): room for one more of 58.
    codes = [(await status(gw, budgeted))[0] for _ in range(3)]
    assert codes == [200, 429, 429]
    async with gw.get("/readyz") as resp:
        assert resp.status == 200
        state = await resp.json()
        assert state["limits"] == "redis down: local" and state["limits_fallbacks"] >= 5


async def test_a_redis_that_forgot_the_scripts_gets_them_again(
    aiohttp_server: AiohttpServer,
    aiohttp_client: AiohttpClient,
    make_settings: MakeSettings,
    redis_server: RedisServer,
) -> None:
    gw = await outage_gateway(aiohttp_server, aiohttp_client, make_settings, redis_server, "refuse")
    secret = await create_key(gw, rpm=100, tpm=100_000, budget_tokens=1000, budget_period="day")
    assert (await status(gw, secret))[0] == 200
    admin = Redis.from_url(redis_server.url)
    try:
        await admin.script_flush()  # as after a restart: EVALSHA answers NOSCRIPT
        assert (await status(gw, secret))[0] == 200
        await admin.script_flush()
        assert (await status(gw, secret))[0] == 200
        record = app_of(gw)[KEYS_KEY].lookup(secret)
        assert record is not None
        spend = await app_of(gw)[GATE_KEY].spending(record)
        assert spend is not None and spend.tokens == 30 and spend.held_tokens == 0
    finally:
        await admin.aclose()


async def test_a_hold_whose_request_never_saw_its_answer_is_released(
    aiohttp_server: AiohttpServer,
    aiohttp_client: AiohttpClient,
    make_settings: MakeSettings,
    redis_url: str,
) -> None:
    _, gw, _ = await two_gateways(
        aiohttp_server, aiohttp_client, make_settings, redis_url=redis_url
    )
    secret = await create_key(gw, budget_tokens=1000, budget_period="total")
    key = app_of(gw)[KEYS_KEY].lookup(secret)
    assert key is not None
    gate = SharedGate(app_of(gw)[STORE_KEY], Redis.from_url(redis_url))
    try:
        await gate.spending(key)  # seeds the period's spending
        ticket = await gate.admit(key)
        assert ticket is not None
        # The charge ran in Redis, but its request was cancelled (the client hung up) before
        # it heard the answer: the ticket does not know it holds anything.
        assert (await gate._run_charge(ticket, (60, 0.0), (90, 0.0)))[0] == b"ok"
        held = await gate.spending(key)
        assert held is not None and held.held_tokens == 90
        gate.leave(ticket)
        spend = await gate.spending(key)
        assert spend is not None and (spend.tokens, spend.held_tokens) == (0, 0)
    finally:
        await gate.close()


def row(**fields: Any) -> UsageRecord:
    base: dict[str, Any] = {
        "ts": time.time(), "request_id": "r", "key_id": None, "model": "m", "provider": "up",
        "upstream_model": "gpt-4o-mini", "endpoint": CHAT, "stream": False, "status": 200,
    }  # fmt: skip
    return UsageRecord(**(base | fields))


async def test_a_budget_is_seeded_from_the_usage_table_on_either_backend(
    database: str, redis_url: str
) -> None:
    """The shared spending starts from the key's usage rows of the period, read through the
    Database interface: on SQLite and on PostgreSQL alike; rows of other keys, of earlier
    periods and a retried batch do not count."""
    async with opened_database(database) as db:
        key, _ = await db.create_key(name="seeded", budget_tokens=10_000, budget_period="day")
        other, _ = await db.create_key(name="other")
        now = time.time()
        rows = [
            row(ts=now - i, key_id=key.id, total_tokens=100, cost_usd=0.25, uid=mint_uid())
            for i in range(3)
        ]  # fmt: skip
        await db.insert_usage(rows)
        await db.insert_usage(rows)  # a retried batch: written once
        await db.insert_usage(
            [
                row(key_id=other.id, total_tokens=7),
                row(ts=now - 3 * 86400, key_id=key.id, total_tokens=5000),
            ]
        )
        gate = SharedGate(db, Redis.from_url(redis_url))
        try:
            spend = await gate.spending(key)
            assert spend is not None
            assert (spend.tokens, spend.usd) == (300, pytest.approx(0.75))
        finally:
            await gate.close()


async def test_the_key_list_shows_every_keys_shared_spending_from_any_replica(
    aiohttp_server: AiohttpServer,
    aiohttp_client: AiohttpClient,
    make_settings: MakeSettings,
    redis_url: str,
) -> None:
    """`GET /admin/keys` on one replica shows what requests through the other spent, for
    every budgeted key at once (read in one pipeline); a key never used shows 0, one without
    a budget no spending."""
    admin = {"Authorization": "Bearer admin-key-0123456789abcdef"}
    fake, one, two = await two_gateways(
        aiohttp_server,
        aiohttp_client,
        make_settings,
        redis_url=redis_url,
        admin_key="admin-key-0123456789abcdef",
    )
    fake.always(content="two words")  # 10 tokens a request
    used = [await create_key(one, budget_tokens=1000, budget_period="day") for _ in range(3)]
    idle = await create_key(one, budget_usd=5.0, budget_period="month")
    await create_key(one)
    for i, secret in enumerate(used):
        for _ in range(i + 1):
            assert (await status(one, secret))[0] == 200
    ids = [app_of(one)[KEYS_KEY].lookup(s) for s in (*used, idle)]
    assert ids[0] is not None
    await app_of(one)[GATE_KEY].spending(ids[0])  # returns once one's ends reached Redis
    await app_of(two)[KEYS_KEY].load()
    async with two.get("/admin/keys", headers=admin) as resp:
        assert resp.status == 200
        listed = (await resp.json())["data"]
    spends = {k["id"]: k.get("spend") for k in listed}
    assert [spends[k.id]["tokens"] for k in ids if k is not None] == [10, 20, 30, 0]
    assert len(listed) == 5 and sum(s is None for s in spends.values()) == 1


async def test_a_concurrency_limit_given_on_one_replica_counts_the_others_requests(
    aiohttp_server: AiohttpServer,
    aiohttp_client: AiohttpClient,
    make_settings: MakeSettings,
    redis_url: str,
) -> None:
    """Two replicas on one Redis: two streams of a key run on the second when the admin API
    of the first gives the key `max_concurrency` 2. Once the second reloads its keys (its
    next poll), the first refuses a new request; as the streams end, the slots come back."""
    fake, one, two = await two_gateways(
        aiohttp_server, aiohttp_client, make_settings, redis_url=redis_url, admin_key=ADMIN
    )
    secret, key_id = await new_key(one)
    await known(two, secret)
    release = asyncio.Event()
    running = await streams(two, fake, secret, 2, release)
    serving = list(app_of(two)[INFLIGHT_KEY])
    await patch(one, key_id, max_concurrency=2)
    assert (await status_of(one, secret))[0] == 200  # the second has not seen the change yet
    await app_of(two)[KEYS_KEY].load()
    refused = await status_of(one, secret)
    assert refused[0] == 429 and "in flight" in refused[1], refused
    release.set()
    for task in running:
        await task
    await asyncio.wait(serving)
    again = asyncio.Event()
    held_two = await held(one, fake, secret, 2, again)
    refused = await status_of(one, secret)
    assert refused[0] == 429 and "in flight" in refused[1], refused
    again.set()
    assert [(await t)[0] for t in held_two] == [200, 200]
