"""Scale-out edges closed: a budget seed that meets a frozen PostgreSQL answers 503 within a
bound; request ends held through a Redis outage longer than their lease still count; requests
the local fallback admitted count in a concurrency limit once Redis answers again. Each test
starts the real PostgreSQL or Redis it needs."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
from aiohttp.pytest_plugin import AiohttpClient, AiohttpServer

from gateway.limits_redis import SEED_WAIT_SECONDS, SharedGate
from gateway.state import GATE_KEY
from tests.conftest import MakeSettings, app_of, create_key
from tests.test_attack_scale import post
from tests.test_limits_redis import two_gateways


@pytest.fixture
def own_pg() -> Iterator[Any]:
    """A PostgreSQL server of this test's own (it gets frozen)."""
    from tests.pg import own_server

    with own_server() as server:
        yield server


async def test_a_budget_seed_that_meets_a_frozen_postgresql_answers_503_within_a_bound(
    aiohttp_server: AiohttpServer,
    aiohttp_client: AiohttpClient,
    make_settings: MakeSettings,
    redis_url: str,
    own_pg: Any,
) -> None:
    """PostgreSQL is frozen (SIGSTOP: connections open, no answer) when a budget's spending
    must be seeded into Redis. The request must get 503 `database_busy` within a few seconds,
    not wait out the 30 s query timeout; a key limited to one request at a time keeps serving
    meanwhile (its ends reach Redis: a seed under way must not hold them back); and once
    PostgreSQL answers, the budgeted key works again."""
    _, gw, _ = await two_gateways(
        aiohttp_server,
        aiohttp_client,
        make_settings,
        redis_url=redis_url,
        database=own_pg.admin_url,
        usage_flush_seconds=0.02,
    )
    budgeted = await create_key(gw, budget_tokens=10_000, budget_period="day")
    single = await create_key(gw, max_concurrency=1)
    loop = asyncio.get_running_loop()
    own_pg.pause()
    try:
        for _ in range(2):  # the second waits for the seed under way: bounded too
            started = loop.time()
            async with gw.post(
                "/v1/chat/completions",
                json={"model": "m", "messages": [{"role": "user", "content": "hi"}]},
                headers={"Authorization": f"Bearer {budgeted}"},
            ) as resp:
                body = await resp.json()
                assert resp.status == 503, body
                assert body["error"]["code"] == "database_busy"
                assert body["error"]["type"] and set(body["error"]) >= {"message", "param"}
                assert resp.headers["Retry-After"] == "1"
            assert loop.time() - started < SEED_WAIT_SECONDS + 1.5
        for _ in range(3):  # each ends, freeing the one slot for the next
            assert (await post(gw, single))[0] == 200
        gate = app_of(gw)[GATE_KEY]
        assert isinstance(gate, SharedGate) and gate.up  # PostgreSQL is not Redis
    finally:
        own_pg.resume()
    code, body = await post(gw, budgeted)
    assert code == 200, body
