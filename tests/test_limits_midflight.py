"""Limits changed while a key's requests run: a concurrency limit given mid-flight counts the
requests already running, and a tokens-per-minute limit removed and given again keeps what
was spent this minute. In memory and shared through a real Redis."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from gateway.state import INFLIGHT_KEY
from tests.conftest import app_of
from tests.fakes import FakeOpenAI
from tests.test_accounting import make_settings, new_key, patch, up
from tests.test_limits import CHAT, auth, body

__all__ = ["make_settings", "up"]  # (the fixtures, shared with test_accounting)


async def status_of(gw: TestClient[Any, Any], secret: str, **extra: Any) -> tuple[int, str]:
    async with gw.post(CHAT, json=body(**extra), headers=auth(secret)) as r:
        return r.status, await r.text()


async def held(
    gw: TestClient[Any, Any], fake: FakeOpenAI, secret: str, count: int, release: asyncio.Event
) -> list[asyncio.Task[tuple[int, str]]]:
    """`count` requests of the key, each held at the upstream until `release` is set."""
    fake.script(hold=release, times=count)
    tasks = []
    for _ in range(count):
        fake.request_seen.clear()
        tasks.append(asyncio.create_task(status_of(gw, secret)))
        await fake.request_seen.wait()
    return tasks


@pytest.mark.parametrize("rpm", [None, 1_000], ids=["tpm_only", "with_rpm"])
async def test_a_tokens_per_minute_limit_removed_and_given_again_keeps_the_minute(
    up: tuple[FakeOpenAI, TestClient[Any, Any]], rpm: int | None
) -> None:
    """A request holds most of the key's tokens per minute, so the next is refused. The admin
    removes the limit and gives it again at once: the minute's spending is still there (as
    if the limit had stayed), not a fresh bucket the client did not wait for. (With another
    limit left, requests go through the limiter while the limit is gone.)"""
    fake, gw = up
    secret, key_id = await new_key(gw, tpm=100, rpm=rpm)
    release = asyncio.Event()
    first = await held(gw, fake, secret, 1, release)  # holds 59 of the 100
    refused = await status_of(gw, secret)
    assert refused[0] == 429 and "tokens per minute" in refused[1], refused
    await patch(gw, key_id, tpm=None)
    assert (await status_of(gw, secret))[0] == 200  # no limit: admitted
    await patch(gw, key_id, tpm=100)
    again = await status_of(gw, secret)
    assert again[0] == 429 and "tokens per minute" in again[1], again
    release.set()
    assert (await first[0])[0] == 200


async def test_a_limit_given_while_none_was_there_starts_full(
    up: tuple[FakeOpenAI, TestClient[Any, Any]],
) -> None:
    """A key that never had a tokens-per-minute limit gets one: its first minute is full
    (what it used before the limit existed is not held against it)."""
    _, gw = up
    secret, key_id = await new_key(gw)
    for _ in range(3):
        assert (await status_of(gw, secret))[0] == 200
    await patch(gw, key_id, tpm=100)
    assert (await status_of(gw, secret))[0] == 200


# What the key has when its requests start (none of it a concurrency limit).
BEFORE: dict[str, dict[str, Any]] = {
    "nothing": {},
    "budget": {"budget_tokens": 1_000_000},
    "rpm": {"rpm": 1_000},
    "tpm": {"tpm": 1_000_000},
}


async def streams(
    gw: TestClient[Any, Any], fake: FakeOpenAI, secret: str, count: int, release: asyncio.Event
) -> list[asyncio.Task[bytes]]:
    """`count` streams of the key, each open (a chunk sent) until `release` is set."""
    fake.script(hold=release, hold_after=1, times=count)

    async def stream() -> bytes:
        extra = {"stream": True, "stream_options": {"include_usage": True}}
        async with gw.post(CHAT, json=body(**extra), headers=auth(secret)) as r:
            assert r.status == 200, await r.text()
            return await r.read()

    tasks = []
    for _ in range(count):
        fake.request_seen.clear()
        tasks.append(asyncio.create_task(stream()))
        await fake.request_seen.wait()
    return tasks


@pytest.mark.parametrize("before", list(BEFORE))
async def test_a_concurrency_limit_given_mid_flight_counts_the_requests_running(
    up: tuple[FakeOpenAI, TestClient[Any, Any]], before: str
) -> None:
    """Three streams of a key are open when the admin gives it `max_concurrency` 1: a new
    request is refused, as if the limit had been there when they started. Once they end, their
    slots are free again (not stuck), and the count is right (not negative): a limit of 2 then
    admits two requests at once, not three."""
    fake, gw = up
    secret, key_id = await new_key(gw, **BEFORE[before])
    release = asyncio.Event()
    running = await streams(gw, fake, secret, 3, release)
    serving = list(app_of(gw)[INFLIGHT_KEY])  # the gateway's tasks serving them
    assert len(serving) == 3
    await patch(gw, key_id, max_concurrency=1)
    refused = await status_of(gw, secret)
    assert refused[0] == 429 and "in flight" in refused[1], refused
    await patch(gw, key_id, max_concurrency=3)
    refused = await status_of(gw, secret)
    assert refused[0] == 429 and "in flight" in refused[1], refused
    release.set()
    for task in running:
        await task
    # A slot adopted mid-flight is freed as the task serving its request ends (a moment
    # after the stream's end reached the client).
    await asyncio.wait(serving)
    assert (await status_of(gw, secret))[0] == 200
    await patch(gw, key_id, max_concurrency=2)
    again = asyncio.Event()
    two = await held(gw, fake, secret, 2, again)
    refused = await status_of(gw, secret)
    assert refused[0] == 429 and "in flight" in refused[1], refused
    again.set()
    assert [(await t)[0] for t in two] == [200, 200]
