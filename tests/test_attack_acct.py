"""Attacks on the accounting of requests in flight while their key's budget changes."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiohttp.pytest_plugin import AiohttpClient, AiohttpServer
from aiohttp.test_utils import TestClient

from gateway.settings import ModelConfig, OpenAIConfig, Target
from gateway.state import GATE_KEY, KEYS_KEY, STORE_KEY, USAGE_KEY
from tests.conftest import MakeSettings, app_of, sse_events, start_gateway, usage_rows
from tests.fakes import FakeOpenAI
from tests.test_accounting import (
    ADMIN,
    admin_spend,
    make_settings,
    new_key,
    patch,
    spend_of,
    up,
)
from tests.test_limits import CHAT, HELD, RESERVED, auth, body, rig

STREAM = body(stream=True, stream_options={"include_usage": True})

__all__ = ["make_settings", "up"]  # (the fixtures, shared with test_accounting)


async def one(gw: TestClient[Any, Any], secret: str) -> int:
    async with gw.post(CHAT, json=body(), headers=auth(secret)) as r:
        assert r.status == 200, await r.text()
        total: int = (await r.json())["usage"]["total_tokens"]
    return total


async def test_a_period_changed_while_a_request_runs_keeps_the_new_periods_spending(
    up: tuple[FakeOpenAI, TestClient[Any, Any]],
) -> None:
    """A daily budget becomes a total one while a held stream runs: the total's spending is
    read from the table; the stream's end must add to it, not reset it by its old period."""
    fake, gw = up
    secret, key_id = await new_key(gw, budget_tokens=100_000, budget_period="day")
    before = await one(gw, secret)
    release = asyncio.Event()
    fake.script(hold=release, hold_after=2)
    async with gw.post(CHAT, json=STREAM, headers=auth(secret)) as resp:
        assert resp.status == 200
        changed = await patch(gw, key_id, budget_period="total")
        assert changed["spend"]["tokens"] == before
        release.set()
        usage = sse_events(await resp.read())[-1]["usage"]
    await app_of(gw)[USAGE_KEY].wait_recorded(2)
    assert (await admin_spend(gw, key_id))["tokens"] == before + usage["total_tokens"]
    assert (await spend_of(gw, secret)).held_tokens == 0


async def test_a_budget_removed_and_given_again_keeps_the_holds_of_requests_in_flight(
    up: tuple[FakeOpenAI, TestClient[Any, Any]],
) -> None:
    """A stream holds budget; the budget is removed and given again; a second stream then
    holds budget. When the first ends, the second's hold must still be held."""
    fake, gw = up
    secret, key_id = await new_key(gw, budget_tokens=100_000)
    first, second = asyncio.Event(), asyncio.Event()
    fake.script(hold=first, hold_after=2)
    async with gw.post(CHAT, json=STREAM, headers=auth(secret)) as a:
        assert a.status == 200
        await patch(gw, key_id, budget_tokens=None)
        await patch(gw, key_id, budget_tokens=100_000)
        fake.script(hold=second, hold_after=2)
        async with gw.post(CHAT, json=STREAM, headers=auth(secret)) as b:
            assert b.status == 200
            first.set()
            used_a = sse_events(await a.read())[-1]["usage"]["total_tokens"]
            await app_of(gw)[USAGE_KEY].wait_recorded(1)
            spend = await spend_of(gw, secret)
            assert (spend.tokens, spend.held_tokens) == (used_a, HELD)
            second.set()
            used_b = sse_events(await b.read())[-1]["usage"]["total_tokens"]
    await app_of(gw)[USAGE_KEY].wait_recorded(2)
    spend = await spend_of(gw, secret)
    assert (spend.tokens, spend.held_tokens) == (used_a + used_b, 0)
    assert len(await usage_rows(gw)) == 2


async def test_a_key_cache_load_that_read_the_keys_before_a_budget_was_given_keeps_it(
    up: tuple[FakeOpenAI, TestClient[Any, Any]],
) -> None:
    """A poll of the key cache reads the keys, then the admin API gives one a budget (its
    spending read from the table), then the poll's budget sync runs on the records it read:
    the budget's spending must not be forgotten (nor the shared one dropped)."""
    _, gw = up
    app = app_of(gw)
    secret, key_id = await new_key(gw)
    used = await one(gw, secret)
    store, cache = app[STORE_KEY], app[KEYS_KEY]
    list_keys = store.list_keys
    read, go_on = asyncio.Event(), asyncio.Event()

    async def slow_list_keys() -> Any:
        keys = await list_keys()
        read.set()
        await go_on.wait()
        return keys

    store.list_keys = slow_list_keys  # type: ignore[method-assign]
    poll = asyncio.create_task(cache.load())
    await read.wait()
    store.list_keys = list_keys  # type: ignore[method-assign]
    given = await patch(gw, key_id, budget_tokens=used + RESERVED - 1)
    assert given["spend"]["tokens"] == used
    go_on.set()
    await poll
    assert (await admin_spend(gw, key_id))["tokens"] == used
    async with gw.post(CHAT, json=body(), headers=auth(secret)) as resp:
        assert resp.status == 429  # RESERVED does not fit beside what was used


@pytest.mark.parametrize("end", ["client-hangs-up", "upstream-drops", "upstream-error-event"])
@pytest.mark.parametrize("limits", [{}, {"tpm": 10_000}], ids=["no-limits", "tpm"])
async def test_a_budget_given_mid_stream_counts_a_stream_that_ends_badly_once(
    up: tuple[FakeOpenAI, TestClient[Any, Any]], end: str, limits: dict[str, int]
) -> None:
    """However the stream ends, what its row says it used is what the budget counts, nothing
    stays held, and the next request's tokens per minute are all there."""
    fake, gw = up
    secret, key_id = await new_key(gw, **limits)
    release = asyncio.Event()
    knobs: dict[str, Any] = {"content": "one two three four five six"}
    if end == "client-hangs-up":
        knobs |= {"hold": release, "hold_after": 2}
    elif end == "upstream-drops":
        knobs |= {"hold": release, "hold_after": 2, "drop_after": 3}
    else:
        knobs |= {"hold": release, "hold_after": 2, "error_after": 3}
    fake.script(**knobs)
    async with gw.post(CHAT, json=STREAM, headers=auth(secret)) as resp:
        assert resp.status == 200
        await resp.content.readany()
        await patch(gw, key_id, budget_tokens=100_000, budget_usd=10.0)
        if end != "client-hangs-up":
            release.set()
            await resp.read()
    if end == "client-hangs-up":
        await fake.client_disconnected.wait()
    await app_of(gw)[USAGE_KEY].wait_recorded(1)
    [row] = await usage_rows(gw)
    assert row["total_tokens"] > 0
    spend = await spend_of(gw, secret)
    assert (spend.tokens, spend.held_tokens) == (row["total_tokens"], 0)
    assert spend.usd == pytest.approx(row["cost_usd"])
    async with gw.post(CHAT, json=body(), headers=auth(secret)) as resp:
        assert resp.status == 200
        if limits:
            used = (await resp.json())["usage"]["total_tokens"]
            # (At least: the bucket refills meanwhile. A hold never given back takes ~60.)
            left = int(resp.headers["x-ratelimit-remaining-tokens"])
            assert left >= 10_000 - row["total_tokens"] - used


async def test_a_token_budget_made_a_usd_one_mid_stream_counts_the_stream_once(
    up: tuple[FakeOpenAI, TestClient[Any, Any]],
) -> None:
    """The budget of a key with a stream in flight goes from tokens to USD (same period): no
    spending is read again, the stream's cost counts once, and its hold goes."""
    fake, gw = up
    secret, key_id = await new_key(gw, budget_tokens=100_000, budget_period="month")
    before = await one(gw, secret)
    release = asyncio.Event()
    fake.script(hold=release, hold_after=2)
    async with gw.post(CHAT, json=STREAM, headers=auth(secret)) as resp:
        assert resp.status == 200
        await patch(gw, key_id, budget_tokens=None, budget_usd=5.0)
        release.set()
        usage = sse_events(await resp.read())[-1]["usage"]
    await app_of(gw)[USAGE_KEY].wait_recorded(2)
    spend = await admin_spend(gw, key_id)
    total = before + usage["total_tokens"]
    assert (spend["tokens"], spend["usd"]) == (total, pytest.approx(total / 1000))
    assert (await spend_of(gw, secret)).held_tokens == 0


async def test_a_key_revoked_mid_stream_is_answered_and_counted(
    up: tuple[FakeOpenAI, TestClient[Any, Any]],
) -> None:
    fake, gw = up
    secret, key_id = await new_key(gw, budget_tokens=100_000, tpm=10_000)
    release = asyncio.Event()
    fake.script(hold=release, hold_after=2)
    async with gw.post(CHAT, json=STREAM, headers=auth(secret)) as resp:
        assert resp.status == 200
        async with gw.delete(f"/admin/keys/{key_id}", headers=auth(ADMIN)) as revoked:
            assert revoked.status == 200, await revoked.text()
        release.set()
        usage = sse_events(await resp.read())[-1]["usage"]
    await app_of(gw)[USAGE_KEY].wait_recorded(1)
    [row] = await usage_rows(gw)
    assert (row["status"], row["total_tokens"]) == (200, usage["total_tokens"])
    assert (await admin_spend(gw, key_id))["tokens"] == usage["total_tokens"]
    async with gw.post(CHAT, json=body(), headers=auth(secret)) as resp:
        assert resp.status == 401


@pytest.mark.parametrize(
    ("fault", "stream"),
    [("drop", False), ("drop", True), ("503", False), ("503", True), ("reset", True)],
)
async def test_a_request_that_fails_over_gives_back_its_hold_and_counts_once(
    aiohttp_server: AiohttpServer,
    aiohttp_client: AiohttpClient,
    make_settings: MakeSettings,
    stream: bool,
    fault: str,
) -> None:
    """A route fails (connection dropped, 503, stream reset before its first chunk)."""
    first, second = FakeOpenAI(), FakeOpenAI()
    await first.start(aiohttp_server)
    await second.start(aiohttp_server)
    settings = make_settings(
        providers=(
            OpenAIConfig(name="a", base_url=first.base_url),
            OpenAIConfig(name="b", base_url=second.base_url),
        ),
        models=(
            ModelConfig(
                name="m",
                targets=(Target(provider="a", model="x"), Target(provider="b", model="y")),
                input_price_per_mtok=1000.0,
                output_price_per_mtok=1000.0,
            ),
        ),
    )
    gw = await start_gateway(aiohttp_client, settings)
    secret, _ = await new_key(gw, budget_tokens=100_000, budget_usd=10.0, tpm=10_000)
    knobs: dict[str, Any] = {
        "drop": {"drop_before_response": True},
        "503": {"status": 503},
        "reset": {"drop_after": 0},
    }[fault]
    first.script(**knobs)
    async with gw.post(CHAT, json=STREAM if stream else body(), headers=auth(secret)) as resp:
        status = resp.status
        await resp.read()
    await app_of(gw)[USAGE_KEY].wait_recorded(1)
    [row] = await usage_rows(gw)
    # (Whether it failed over, and to which route, is routing's business: whatever it did,
    # the budget counts what the row says, once, and holds nothing after.)
    assert row["status"] == status
    spend = await spend_of(gw, secret)
    assert (spend.tokens, spend.held_tokens, spend.held_usd) == (row["total_tokens"], 0, 0.0)
    assert spend.usd == pytest.approx(row["cost_usd"])


class SlowRead:
    """The store's `spend_since`, whose answer (the table as it was when the read ran) comes
    back only once the test says so: requests end while a budget's spending loads."""

    def __init__(self, gw: TestClient[Any, Any]) -> None:
        self.store = app_of(gw)[STORE_KEY]
        self.read = self.store.spend_since
        self.done, self.go_on = asyncio.Event(), asyncio.Event()
        self.store.spend_since = self.spend_since  # type: ignore[method-assign]

    async def spend_since(self, key_id: str, since: float) -> tuple[int, float]:
        spent = await self.read(key_id, since)
        self.done.set()
        await self.go_on.wait()
        return spent


async def _quiet(
    aiohttp_server: AiohttpServer, aiohttp_client: AiohttpClient, make_settings: MakeSettings
) -> tuple[FakeOpenAI, TestClient[Any, Any]]:
    """A gateway whose key cache never polls on its own: only the admin API loads a budget."""
    return await rig(aiohttp_server, aiohttp_client, make_settings, keys_refresh_seconds=3600.0)


@pytest.mark.parametrize(
    "limits",
    [{}, {"tpm": 10_000}, {"budget_tokens": 100_000, "budget_period": "week"}],
    ids=["no-limits", "tpm", "weekly-budget"],
)
async def test_a_request_ending_while_a_budget_loads_counts_once(
    aiohttp_server: AiohttpServer,
    aiohttp_client: AiohttpClient,
    make_settings: MakeSettings,
    limits: dict[str, Any],
) -> None:
    """The admin API gives a key a daily budget while its stream runs; the stream ends (its
    row queued, not in the table the budget's spending was read from) while that read is on
    its way back: the budget must count it."""
    fake, gw = await _quiet(aiohttp_server, aiohttp_client, make_settings)
    secret, key_id = await new_key(gw, **limits)
    release = asyncio.Event()
    fake.script(hold=release, hold_after=2)
    slow = SlowRead(gw)
    async with gw.post(CHAT, json=STREAM, headers=auth(secret)) as resp:
        assert resp.status == 200
        given = asyncio.create_task(patch(gw, key_id, budget_tokens=100_000, budget_period="day"))
        await slow.done.wait()  # the table is read: the stream is not in it
        release.set()
        usage = sse_events(await resp.read())[-1]["usage"]
    await app_of(gw)[USAGE_KEY].wait_recorded(1)  # it ended: its row is queued
    slow.go_on.set()
    assert (await given)["spend"]["tokens"] == usage["total_tokens"]
    [row] = await usage_rows(gw)
    spend = await spend_of(gw, secret)
    assert (spend.tokens, spend.held_tokens) == (row["total_tokens"], 0)
    assert spend.usd == pytest.approx(row["cost_usd"])


@pytest.mark.parametrize(
    "limits",
    [{"tpm": 10_000}, {"budget_tokens": 100_000, "budget_period": "week"}],
    ids=["tpm", "weekly-budget"],
)
async def test_a_held_request_settled_just_before_a_budget_loads_counts_once(
    aiohttp_server: AiohttpServer,
    aiohttp_client: AiohttpClient,
    make_settings: MakeSettings,
    limits: dict[str, Any],
) -> None:
    """A request with a ticket settles in its handler and its row is queued a moment later
    (after its answer is out): a budget's spending loaded in between must count it once."""
    fake, gw = await _quiet(aiohttp_server, aiohttp_client, make_settings)
    secret, key_id = await new_key(gw, **limits)
    gate = app_of(gw)[GATE_KEY]
    leave = gate.leave
    slow = SlowRead(gw)

    def leave_then_load(ticket: Any) -> None:
        leave(ticket)  # (settled already; its row is not queued yet)
        slow.go_on.set()  # the load goes on before the row is queued

    gate.leave = leave_then_load  # type: ignore[method-assign]
    release = asyncio.Event()
    fake.script(hold=release, hold_after=2)
    async with gw.post(CHAT, json=STREAM, headers=auth(secret)) as resp:
        assert resp.status == 200
        given = asyncio.create_task(patch(gw, key_id, budget_tokens=100_000, budget_period="day"))
        await slow.done.wait()
        release.set()
        usage = sse_events(await resp.read())[-1]["usage"]
    await given
    await app_of(gw)[USAGE_KEY].wait_recorded(1)
    [row] = await usage_rows(gw)
    assert row["total_tokens"] == usage["total_tokens"]
    spend = await spend_of(gw, secret)
    assert (spend.tokens, spend.held_tokens) == (row["total_tokens"], 0)
    assert spend.usd == pytest.approx(row["cost_usd"])
