"""A budget's shared counter in Redis is seeded from the usage table at the moment a request
of its key ends: the request counts exactly once, whichever of its end (FINISH) and its
usage row the seed's read sees. The order is forced with hooks, not left to timing."""

from __future__ import annotations

import asyncio
import functools
import time
from typing import Any

import pytest
from aiohttp.pytest_plugin import AiohttpClient, AiohttpServer
from aiohttp.test_utils import TestClient

from gateway.budgets import period_start
from gateway.limits_redis import SharedGate
from gateway.limits_state import spent_name
from gateway.records import KeyRecord
from gateway.state import GATE_KEY, KEYS_KEY, STORE_KEY, USAGE_KEY
from tests.conftest import MakeSettings, app_of, usage_rows
from tests.fakes import FakeOpenAI
from tests.test_accounting import ADMIN, admin_spend, new_key
from tests.test_limits import rig
from tests.test_limits_midflight import held, status_of


@pytest.fixture
async def gw_up(
    aiohttp_server: AiohttpServer,
    aiohttp_client: AiohttpClient,
    make_settings: MakeSettings,
    redis_url: str,
) -> tuple[FakeOpenAI, TestClient[Any, Any]]:
    settings = functools.partial(make_settings, redis_url=redis_url, admin_key=ADMIN)
    return await rig(aiohttp_server, aiohttp_client, settings)


async def counter_lost(gw: TestClient[Any, Any], secret: str) -> tuple[SharedGate, KeyRecord]:
    """Redis loses the key's spending this period (a restart, an eviction): the next
    request's charge (or the admin API's read) seeds it again from the usage table."""
    gate = app_of(gw)[GATE_KEY]
    assert isinstance(gate, SharedGate)
    key = app_of(gw)[KEYS_KEY].lookup(secret)
    assert key is not None
    start = period_start(key.budget_period, time.time())
    assert await gate.redis.delete(spent_name(key, start)) == 1
    return gate, key


async def counted_once(gw: TestClient[Any, Any], key_id: str) -> None:
    """The key's shared spending is what its usage rows add up to."""
    spent = (await admin_spend(gw, key_id))["tokens"]  # (after every end reached Redis)
    rows = [r for r in await usage_rows(gw) if r["key_id"] == key_id]
    assert len(rows) == 3
    assert spent == sum(r["total_tokens"] for r in rows)


async def test_a_request_ending_while_the_seed_reads_the_table_counts_once(
    gw_up: tuple[FakeOpenAI, TestClient[Any, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The seed's read of the usage table is under way when a request ends: its row is not
    in what the read sees, and its end reaches Redis before the counter exists. It must
    still count (it was dropped: counted 0 times)."""
    fake, gw = gw_up
    secret, key_id = await new_key(gw, budget_tokens=100_000, budget_period="day")
    assert (await status_of(gw, secret))[0] == 200
    release = asyncio.Event()
    running = await held(gw, fake, secret, 1, release)
    gate, _ = await counter_lost(gw, secret)

    store = app_of(gw)[STORE_KEY]
    reading, go = asyncio.Event(), asyncio.Event()
    read = store.spend_since

    async def held_read(key: str, since: float) -> tuple[int, float]:
        reading.set()
        await go.wait()
        return await read(key, since)

    monkeypatch.setattr(store, "spend_since", held_read)
    seeding = asyncio.create_task(status_of(gw, secret))  # its charge seeds the counter
    await reading.wait()
    release.set()
    assert (await running[0])[0] == 200
    await app_of(gw)[USAGE_KEY].wait_recorded(2)  # its row is queued
    # Whatever of its end went to Redis has been answered (the link keeps the order).
    await gate.link.wait([gate.link.send("PING")])
    go.set()
    assert (await seeding)[0] == 200
    await counted_once(gw, key_id)


async def test_a_request_whose_end_reaches_redis_after_the_seed_counts_once(
    gw_up: tuple[FakeOpenAI, TestClient[Any, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A request ends (its row queued) just before the counter is seeded, and its end reaches
    Redis only after the seed: the seed's read has its row, and its end finds the counter.
    It must count once (it counted twice)."""
    fake, gw = gw_up
    secret, key_id = await new_key(gw, budget_tokens=100_000, budget_period="day")
    assert (await status_of(gw, secret))[0] == 200
    release = asyncio.Event()
    running = await held(gw, fake, secret, 1, release)
    gate, _ = await counter_lost(gw, secret)

    seeded = asyncio.Event()
    end_all = gate._end_all
    seed = gate._seed_spend

    async def late_ends() -> None:
        await seeded.wait()
        await end_all()

    async def seed_then_tell(key: KeyRecord) -> None:
        await seed(key)
        seeded.set()

    monkeypatch.setattr(gate, "_end_all", late_ends)
    monkeypatch.setattr(gate, "_seed_spend", seed_then_tell)
    release.set()
    assert (await running[0])[0] == 200
    await app_of(gw)[USAGE_KEY].wait_recorded(2)  # its row is queued; its end waits
    assert (await status_of(gw, secret))[0] == 200  # its charge seeds the counter
    await counted_once(gw, key_id)
