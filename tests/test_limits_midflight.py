"""Limits changed while a key's requests run: a concurrency limit given mid-flight counts the
requests already running, and a tokens-per-minute limit removed and given again keeps what
was spent this minute. In memory and shared through a real Redis."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

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
