"""Per-key limits and budgets end to end: concurrency, headers, refusals, groups, restarts."""

from __future__ import annotations

import asyncio
import functools
import time
from typing import Any

import openai
import pytest
from aiohttp.pytest_plugin import AiohttpClient, AiohttpServer
from aiohttp.test_utils import TestClient

from gateway.settings import GroupConfig, ModelConfig, OpenAIConfig, Target
from gateway.state import GATE_KEY, KEYS_KEY, STORE_KEY, USAGE_KEY
from tests.conftest import (
    MakeSettings,
    app_of,
    create_key,
    openai_client,
    refusal_counts,
    sse_events,
    start_gateway,
    usage_rows,
)
from tests.fakes import FakeOpenAI

CHAT = "/v1/chat/completions"
HI = [{"role": "user", "content": "hi"}]
# What the gateway reserves for HI with max_tokens=50: a prompt estimate of 8 plus 50. It is
# admitted when that fits, and holds the most it can use while it runs: 9 (a token is at least
# a byte: 3 + 4 per message + 2) plus 50.
RESERVED = 58
HELD = 59


@pytest.fixture
def make_settings(make_settings: MakeSettings, limits_backend: dict[str, Any]) -> MakeSettings:
    """Every test here runs twice: limits in memory, and shared through a real Redis."""
    return functools.partial(make_settings, **limits_backend)


def body(**extra: Any) -> dict[str, Any]:
    return {"model": "m", "messages": HI, "max_tokens": 50} | extra


async def rig(
    aiohttp_server: AiohttpServer,
    aiohttp_client: AiohttpClient,
    make_settings: MakeSettings,
    **server: Any,
) -> tuple[FakeOpenAI, TestClient[Any, Any]]:
    fake = FakeOpenAI()
    await fake.start(aiohttp_server)
    settings = make_settings(
        providers=(OpenAIConfig(name="up", base_url=fake.base_url),),
        models=(
            ModelConfig(
                name="m",
                targets=(Target(provider="up", model="gpt-4o-mini"),),
                input_price_per_mtok=1000.0,  # $0.001 a token: budgets in USD stay readable
                output_price_per_mtok=1000.0,
            ),
        ),
        **server,
    )
    return fake, await start_gateway(aiohttp_client, settings)


async def all_decided(tasks: list[asyncio.Task[Any]], fake: FakeOpenAI) -> None:
    """Wait until every request is either answered (refused) or held at the upstream."""
    while sum(t.done() for t in tasks) + len(fake.chat_requests) < len(tasks):
        fake.request_seen.clear()
        seen = asyncio.create_task(fake.request_seen.wait())
        pending = [t for t in tasks if not t.done()]
        await asyncio.wait([seen, *pending], return_when=asyncio.FIRST_COMPLETED)
        seen.cancel()


def auth(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


@pytest.fixture
async def up(
    aiohttp_server: AiohttpServer, aiohttp_client: AiohttpClient, make_settings: MakeSettings
) -> tuple[FakeOpenAI, TestClient[Any, Any]]:
    return await rig(aiohttp_server, aiohttp_client, make_settings)


async def test_a_burst_cannot_spend_past_the_budget(
    up: tuple[FakeOpenAI, TestClient[Any, Any]],
) -> None:
    fake, gw = up
    budget = 9 * HELD + RESERVED  # room for ten: nine holding their most, one more likely
    secret = await create_key(gw, budget_tokens=budget, budget_period="day")
    release = asyncio.Event()
    fake.always(hold=release)  # the admitted ones stay in flight until all 50 are decided

    async def one() -> tuple[int, dict[str, Any]]:
        async with gw.post(CHAT, json=body(), headers=auth(secret)) as resp:
            return resp.status, await resp.json()

    tasks = [asyncio.create_task(one()) for _ in range(50)]
    await all_decided(tasks, fake)
    release.set()
    results = await asyncio.gather(*tasks)
    statuses = [s for s, _ in results]
    assert statuses.count(200) == 10
    assert statuses.count(429) == 40
    refusal = next(b for s, b in results if s == 429)["error"]
    assert refusal["code"] == "insufficient_quota" and refusal["type"] == "insufficient_quota"
    assert refusal["message"].startswith("API limit exceeded, upgrade your plan")
    rows = [r for r in await usage_rows(gw) if r["status"] == 200]
    assert sum(r["total_tokens"] for r in rows) <= budget  # never past the budget


async def test_budget_refusal_tells_clients_not_to_retry(
    up: tuple[FakeOpenAI, TestClient[Any, Any]],
) -> None:
    _, gw = up
    secret = await create_key(gw, budget_usd=0.01, budget_period="month")
    async with openai_client(gw, secret) as client:
        with pytest.raises(openai.RateLimitError) as err:
            await client.chat.completions.create(model="m", messages=HI, max_tokens=50)
    assert err.value.code == "insufficient_quota"
    assert err.value.response.headers["x-should-retry"] == "false"
    assert "$0.0100 of $0.01 left this month" in err.value.message


async def test_spend_survives_a_restart(
    aiohttp_server: AiohttpServer, aiohttp_client: AiohttpClient, make_settings: MakeSettings
) -> None:
    _, gw = await rig(aiohttp_server, aiohttp_client, make_settings)
    secret = await create_key(gw, budget_tokens=3 * RESERVED, budget_period="total")
    for _ in range(2):
        async with gw.post(CHAT, json=body(), headers=auth(secret)) as resp:
            assert resp.status == 200
    spent = sum(r["total_tokens"] for r in await usage_rows(gw))
    await gw.close()  # a clean stop writes every usage row

    _, again = await rig(aiohttp_server, aiohttp_client, make_settings)
    record = app_of(again)[KEYS_KEY].lookup(secret)
    assert record is not None
    spend = await app_of(again)[GATE_KEY].spending(record)
    assert spend is not None and spend.tokens == spent
    # 3 reservations fit the budget, but 2 requests' real use is already spent.
    left = 3 * RESERVED - spent
    async with again.post(CHAT, json=body(max_tokens=left), headers=auth(secret)) as resp:
        assert resp.status == 429
    async with again.post(CHAT, json=body(max_tokens=left - 8), headers=auth(secret)) as resp:
        assert resp.status == 200


async def test_rate_limit_headers_on_every_response(
    up: tuple[FakeOpenAI, TestClient[Any, Any]],
) -> None:
    _, gw = up
    # Time stands still in memory: the buckets must not refill while a loaded machine runs
    # the test. Redis refills them by its own clock (TIME): at 1,000 tpm a token comes back
    # every 60 ms, so the bounds below allow what came back in the time the test took.
    now = time.monotonic()
    app_of(gw)[GATE_KEY].limiter._clock = lambda: now

    def refilled() -> float:
        return (time.monotonic() - now) * 1_000 / 60 + 1

    secret = await create_key(gw, rpm=3, tpm=1_000)
    async with gw.get("/v1/models", headers=auth(secret)) as resp:
        assert resp.headers["x-ratelimit-remaining-requests"] == "3"  # a look costs nothing
    async with gw.post(CHAT, json=body(), headers=auth(secret)) as resp:
        assert resp.status == 200
        assert resp.headers["x-ratelimit-limit-requests"] == "3"
        assert resp.headers["x-ratelimit-remaining-requests"] == "2"
        assert resp.headers["x-ratelimit-limit-tokens"] == "1000"
        # Made as the answer goes out: the request's real use is already settled (its
        # reservation, RESERVED, would show tens of tokens fewer: seconds of refilling).
        used = (await resp.json())["usage"]["total_tokens"]
        remaining = int(resp.headers["x-ratelimit-remaining-tokens"])
        assert 1_000 - used <= remaining <= 1_000 - used + refilled()
        assert resp.headers["x-ratelimit-reset-requests"].endswith("s")
    async with gw.post(CHAT, json=body(stream=True), headers=auth(secret)) as resp:
        assert resp.headers["x-ratelimit-remaining-requests"] == "1"
        # A stream's headers go out before it ends: its reservation is still held.
        assert int(resp.headers["x-ratelimit-remaining-tokens"]) <= 1_000 - RESERVED + refilled()
        sse_events(await resp.read())
    async with gw.post(CHAT, json=body(), headers=auth(secret)) as resp:
        assert resp.status == 200
    async with gw.post(CHAT, json=body(), headers=auth(secret)) as resp:
        error = await resp.json()
        assert resp.status == 429
        assert error["error"]["code"] == "rate_limit_exceeded"
        assert resp.headers["x-ratelimit-remaining-requests"] == "0"
        assert 15 <= int(resp.headers["retry-after"]) <= 20  # one request back every 20 s
        assert 15_000 <= int(resp.headers["retry-after-ms"]) <= 20_000
    # Refused before any upstream call: counted per minute, not written as a row.
    assert 429 in {status for _, status in await refusal_counts(gw)}
    assert all(r["status"] == 200 for r in await usage_rows(gw))


async def test_unused_tokens_come_back_after_the_answer(
    up: tuple[FakeOpenAI, TestClient[Any, Any]],
) -> None:
    _, gw = up
    secret = await create_key(gw, tpm=2 * RESERVED)
    for _ in range(6):  # each reserves 58 and uses about 15, so far more than 2 pass
        async with gw.post(CHAT, json=body(), headers=auth(secret)) as resp:
            assert resp.status == 200
    async with gw.post(CHAT, json=body(max_tokens=500), headers=auth(secret)) as resp:
        assert resp.status == 429
        assert resp.headers["x-should-retry"] == "false"  # larger than the whole limit


async def test_concurrency_limit_with_the_openai_client(
    up: tuple[FakeOpenAI, TestClient[Any, Any]],
) -> None:
    fake, gw = up
    secret = await create_key(gw, max_concurrency=1)
    release = asyncio.Event()
    fake.script(hold=release)  # the first request stays in flight until the second is refused
    async with openai_client(gw, secret) as client:
        first = asyncio.create_task(
            client.chat.completions.create(model="m", messages=HI, max_tokens=5)
        )
        await fake.request_seen.wait()
        with pytest.raises(openai.RateLimitError, match="in flight"):
            await client.chat.completions.create(model="m", messages=HI, max_tokens=5)
        release.set()
        await first
        await client.chat.completions.create(model="m", messages=HI, max_tokens=5)


async def test_group_defaults_and_key_overrides(
    aiohttp_server: AiohttpServer, aiohttp_client: AiohttpClient, make_settings: MakeSettings
) -> None:
    make = make_settings

    def with_groups(**kw: Any) -> Any:
        settings = make(**kw)
        groups = (GroupConfig(name="team", rpm=1, models=("m",)),)
        return type(settings)(
            server=settings.server,
            providers=settings.providers,
            models=settings.models,
            groups=groups,
        )

    _, gw = await rig(aiohttp_server, aiohttp_client, with_groups)  # type: ignore[arg-type]
    member = await create_key(gw, group_name="team")
    own = await create_key(gw, group_name="team", rpm=5)
    for secret, allowed in ((member, 1), (own, 5)):
        statuses = []
        for _ in range(allowed + 1):
            async with gw.post(CHAT, json=body(), headers=auth(secret)) as resp:
                statuses.append(resp.status)
        assert statuses == [200] * allowed + [429]
    # The request rate is checked before the body is read (so before the model is known).
    fresh = await create_key(gw, group_name="team")
    async with gw.post(CHAT, json=body(model="demo"), headers=auth(fresh)) as resp:
        assert resp.status == 403  # the group's model list applies


async def test_a_cut_stream_still_counts_what_was_generated(
    up: tuple[FakeOpenAI, TestClient[Any, Any]],
) -> None:
    fake, gw = up
    secret = await create_key(gw, budget_tokens=10_000)
    # The upstream stops after two chunks and never goes on: the client hangs up mid-way.
    fake.script(content="one two three four five six", hold=asyncio.Event(), hold_after=2)
    async with gw.post(CHAT, json=body(stream=True), headers=auth(secret)) as resp:
        await resp.content.readany()
    await fake.client_disconnected.wait()
    await app_of(gw)[USAGE_KEY].wait_recorded(1)
    rows = await usage_rows(gw)
    assert rows[-1]["status"] == 499
    assert rows[-1]["completion_tokens"] > 0
    record = app_of(gw)[KEYS_KEY].lookup(secret)
    assert record is not None
    spend = await app_of(gw)[GATE_KEY].spending(record)
    assert spend is not None and spend.tokens == rows[-1]["total_tokens"]
    assert spend.held_tokens == 0
    assert (await app_of(gw)[STORE_KEY].spend_since(record.id, 0))[0] == spend.tokens


async def test_failed_upstream_calls_are_not_charged(
    up: tuple[FakeOpenAI, TestClient[Any, Any]],
) -> None:
    fake, gw = up
    secret = await create_key(gw, budget_tokens=10_000, tpm=10_000)
    fake.script(status=503, times=3)
    for _ in range(3):
        async with gw.post(CHAT, json=body(), headers=auth(secret)) as resp:
            assert resp.status == 503
    record = app_of(gw)[KEYS_KEY].lookup(secret)
    assert record is not None
    spend = await app_of(gw)[GATE_KEY].spending(record)
    assert spend is not None and (spend.tokens, spend.usd, spend.held_tokens) == (0, 0.0, 0)
    async with gw.get("/v1/models", headers=auth(secret)) as resp:
        assert resp.headers["x-ratelimit-remaining-tokens"] == "10000"


async def test_an_admin_change_during_a_reload_is_kept(
    up: tuple[FakeOpenAI, TestClient[Any, Any]],
) -> None:
    """A reload's older snapshot must not undo a revocation made while it was running."""
    _, gw = up
    app = app_of(gw)
    cache, store = app[KEYS_KEY], app[STORE_KEY]
    record, secret = await store.create_key(name="r")
    cache.put(record)
    started, proceed = asyncio.Event(), asyncio.Event()

    async def slow_sync(keys: list[Any]) -> None:
        started.set()
        await proceed.wait()

    cache._on_load = slow_sync
    reload = asyncio.create_task(cache.load())
    await started.wait()
    cache.put(await store.revoke_key(record.id))  # what the admin API does
    proceed.set()
    await reload
    found = cache.lookup(secret)
    assert found is not None and found.revoked_at is not None


def test_a_budget_refusal_costs_no_request_slot() -> None:
    from gateway.admission import Gate
    from gateway.errors import QuotaExceeded
    from gateway.records import KeyRecord

    gate = Gate(None)  # type: ignore[arg-type]  # no store needed: nothing is loaded here
    key = KeyRecord(
        id="k", name="k", prefix="p", digest="d", created_at=0, updated_at=0,
        rpm=5, budget_tokens=10,
    )  # fmt: skip
    ticket = gate.enter(key)
    assert ticket is not None
    with pytest.raises(QuotaExceeded):
        gate.charge(ticket, (50, 0.0), (50, 0.0))
    gate.leave(ticket)
    assert gate.headers(key)["x-ratelimit-remaining-requests"] == "5"
    ticket = gate.enter(key)
    assert ticket is not None
    gate.charge(ticket, (5, 0.0), (5, 0.0))
    gate.settle(ticket, 3, 0.0)
    gate.leave(ticket)
    spend = gate.spent(key)
    assert spend is not None and (spend.tokens, spend.held_tokens) == (3, 0)


async def test_two_syncs_of_a_new_key_do_not_forget_what_it_spent_between_them() -> None:
    # The admin API loads a new key's spending, and a reload (PostgreSQL's NOTIFY) runs its own
    # sync of the same key at once. A request settles between the two loads: its spend is not
    # in the usage table yet, so the later load must not replace the book's figure.
    from gateway.admission import Gate
    from gateway.records import KeyRecord

    class SlowStore:
        def __init__(self) -> None:
            self.release = asyncio.Event()
            self.calls = 0

        async def spend_since(self, key_id: str, start: float) -> tuple[int, float]:
            self.calls += 1
            if self.calls == 1:
                await self.release.wait()  # the reload's read, still on its way
            return 0, 0.0

    store = SlowStore()
    gate = Gate(store)  # type: ignore[arg-type]  # only spend_since is used
    key = KeyRecord(
        id="k", name="k", prefix="p", digest="d", created_at=0, updated_at=0,
        budget_tokens=1000,
    )  # fmt: skip
    reload = asyncio.create_task(gate.sync([key]))
    await asyncio.sleep(0)  # the reload is waiting for the table
    await gate.sync([key])  # the admin API's sync loads first
    ticket = gate.enter(key)
    assert ticket is not None
    gate.charge(ticket, (20, 0.0), (20, 0.0))
    gate.settle(ticket, 11, 0.0)
    gate.leave(ticket)
    store.release.set()
    await reload
    spend = gate.spent(key)
    assert spend is not None and spend.tokens == 11
