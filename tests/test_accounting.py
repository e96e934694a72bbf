"""What a request used is accounted whatever happens while it runs: its settling fails, or its
key is given a budget while it is in flight. In memory and shared through a real Redis."""

from __future__ import annotations

import asyncio
import functools
from typing import Any

import pytest
from aiohttp.pytest_plugin import AiohttpClient, AiohttpServer
from aiohttp.test_utils import TestClient
from structlog.testing import capture_logs

from gateway.budgets import Spend
from gateway.state import GATE_KEY, KEYS_KEY, PRICES_KEY, USAGE_KEY
from tests.conftest import MakeSettings, app_of, create_key, sse_events, usage_rows
from tests.fakes import FakeOpenAI
from tests.test_limits import CHAT, HELD, RESERVED, auth, body, rig

ADMIN = "admin-key-0123456789abcdef"


@pytest.fixture
def make_settings(make_settings: MakeSettings, limits_backend: dict[str, Any]) -> MakeSettings:
    """Every test here runs twice: limits in memory, and shared through a real Redis."""
    return functools.partial(make_settings, admin_key=ADMIN, **limits_backend)


@pytest.fixture
async def up(
    aiohttp_server: AiohttpServer, aiohttp_client: AiohttpClient, make_settings: MakeSettings
) -> tuple[FakeOpenAI, TestClient[Any, Any]]:
    return await rig(aiohttp_server, aiohttp_client, make_settings)


async def spend_of(gw: TestClient[Any, Any], secret: str) -> Spend:
    """The key's spending as the admin API reads it."""
    app = app_of(gw)
    record = app[KEYS_KEY].lookup(secret)
    assert record is not None
    spend = await app[GATE_KEY].spending(record)
    assert spend is not None
    return spend


async def new_key(gw: TestClient[Any, Any], **fields: Any) -> tuple[str, str]:
    async with gw.post("/admin/keys", json={"name": "k", **fields}, headers=auth(ADMIN)) as r:
        assert r.status == 201, await r.text()
        made = await r.json()
    return made["key"], made["id"]


async def patch(gw: TestClient[Any, Any], key_id: str, **fields: Any) -> dict[str, Any]:
    async with gw.patch(f"/admin/keys/{key_id}", json=fields, headers=auth(ADMIN)) as r:
        assert r.status == 200, await r.text()
        got: dict[str, Any] = await r.json()
    return got


async def admin_spend(gw: TestClient[Any, Any], key_id: str) -> dict[str, Any]:
    async with gw.get(f"/admin/keys/{key_id}", headers=auth(ADMIN)) as r:
        assert r.status == 200
        spend: dict[str, Any] = (await r.json())["spend"]
    return spend


async def used_by(gw: TestClient[Any, Any], stream: bool, secret: str) -> dict[str, Any]:
    """One request (streamed or not) that must be answered; the usage it reports."""
    extra = {"stream": True, "stream_options": {"include_usage": True}} if stream else {}
    async with gw.post(CHAT, json=body(**extra), headers=auth(secret)) as resp:
        assert resp.status == 200, await resp.text()
        if not stream:
            usage: dict[str, Any] = (await resp.json())["usage"]
            return usage
        usage = sse_events(await resp.read())[-1]["usage"]
        return usage


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_a_held_request_whose_settling_fails_is_answered_and_gives_back_its_hold(
    up: tuple[FakeOpenAI, TestClient[Any, Any]], stream: bool
) -> None:
    """A request of a key with limits settles in its own task; when that fails (here: the
    price lookup breaks once the upstream has the request, as a hostile answer's usage or a
    price list could make it), the client still gets its answer, the failure is logged, the
    row and the log line go out, and the hold is given back with the tokens counted."""
    fake, gw = up
    # Room for one request's hold (HELD) in the tokens per minute, not two: a hold never given
    # back refuses the second request.
    secret = await create_key(gw, tpm=HELD + RESERVED - 1, budget_tokens=10_000)
    prices = app_of(gw)[PRICES_KEY]
    price = prices.price

    def broken(*args: Any) -> Any:
        if fake.chat_requests:  # admitted (priced) already: it breaks as the request settles
            raise RuntimeError("price book broken")
        return price(*args)

    prices.price = broken  # type: ignore[method-assign]
    with capture_logs() as logs:
        usage = await used_by(gw, stream, secret)
        await app_of(gw)[USAGE_KEY].wait_recorded(1)
    assert [e["event"] for e in logs if e["log_level"] == "error"] == ["settle_failed"]
    assert any(e["event"] == "request" and e.get("status") == 200 for e in logs)
    [row] = await usage_rows(gw)
    assert row["status"] == 200
    assert (row["prompt_tokens"], row["completion_tokens"]) == (
        usage["prompt_tokens"],
        usage["completion_tokens"],
    )
    spend = await spend_of(gw, secret)
    assert (spend.tokens, spend.held_tokens) == (usage["total_tokens"], 0)

    prices.price = price  # type: ignore[method-assign]
    await used_by(gw, stream, secret)  # fits: the first one's hold was given back


@pytest.mark.parametrize(
    "limits",
    [{}, {"rpm": 100}, {"budget_tokens": 10_000, "budget_period": "week"}],
    ids=["no-limits", "rpm", "weekly-budget"],
)
async def test_a_budget_given_while_a_request_runs_counts_what_it_used(
    up: tuple[FakeOpenAI, TestClient[Any, Any]], limits: dict[str, int]
) -> None:
    """A key without a budget (or with a weekly one) has a stream in flight when the admin
    API gives it a daily one: what the stream used is not in the usage table the new budget's
    spending was read from, so it is counted when the stream ends, and the next request is
    refused when it no longer fits."""
    fake, gw = up
    secret, key_id = await new_key(gw, name="late", **limits)
    release = asyncio.Event()
    fake.script(hold=release, hold_after=2)  # two chunks, then the upstream waits
    stream_body = body(stream=True, stream_options={"include_usage": True})
    async with gw.post(CHAT, json=stream_body, headers=auth(secret)) as resp:
        assert resp.status == 200  # in flight: its first chunks are out
        # Room for one more request (RESERVED) beside nothing spent, not beside this stream.
        budget = {"budget_tokens": RESERVED + 5, "budget_usd": 1.0, "budget_period": "day"}
        assert (await patch(gw, key_id, **budget))["spend"]["tokens"] == 0
        release.set()
        usage = sse_events(await resp.read())[-1]["usage"]
    await app_of(gw)[USAGE_KEY].wait_recorded(1)
    assert usage["total_tokens"] > 5

    spend = await admin_spend(gw, key_id)
    assert spend["tokens"] == usage["total_tokens"]
    assert spend["usd"] == pytest.approx(usage["total_tokens"] / 1000)  # $0.001 a token
    async with gw.post(CHAT, json=body(), headers=auth(secret)) as resp:
        assert resp.status == 429
        assert (await resp.json())["error"]["code"] == "insufficient_quota"
