"""Dashboard sessions shared through Redis: a browser signed in on one worker (or replica) is
signed in on all, a sign-out anywhere ends it everywhere, failed sign-ins count once for all,
and Redis not answering is a 503 page, never a sign-in loop. Real redis-server instances
(`tests/redis_server.py`); one test runs a real `gateway serve --workers 2`."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientSession, ClientTimeout, TCPConnector
from aiohttp.pytest_plugin import AiohttpClient, AiohttpServer
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis

from gateway.dashboard import guard
from gateway.dashboard.guard import COOKIE
from gateway.dashboard.sessions import digest
from gateway.dashboard.shared_sessions import SharedSessionBook
from gateway.state import DASHBOARD_SESSIONS_KEY
from tests.conftest import NEVER_HANG, MakeSettings, app_of
from tests.fakes import FakeOpenAI
from tests.redis_server import RedisServer
from tests.replicas import replicas, write_config
from tests.test_limits_redis import two_gateways

ADMIN = "admin-key-0123456789abcdef"
CSRF = re.compile(r'name="csrf" value="([^"]+)"')


async def signed_in_on(gw: TestClient[Any, Any]) -> str:
    """Sign in on `gw`; the session cookie's token."""
    async with gw.post(
        "/dashboard/signin", data={"admin_key": ADMIN}, allow_redirects=False
    ) as resp:
        assert resp.status == 303, await resp.text()
        return resp.cookies[COOKIE].value


def cookie(token: str) -> dict[str, str]:
    return {"Cookie": f"{COOKIE}={token}"}


async def page(gw: TestClient[Any, Any], token: str) -> tuple[int, str]:
    async with gw.get("/dashboard", headers=cookie(token), allow_redirects=False) as resp:
        return resp.status, await resp.text()


async def pair(
    aiohttp_server: AiohttpServer,
    aiohttp_client: AiohttpClient,
    make_settings: MakeSettings,
    redis_url: str,
) -> tuple[TestClient[Any, Any], TestClient[Any, Any]]:
    _, one, two = await two_gateways(
        aiohttp_server, aiohttp_client, make_settings, redis_url=redis_url, admin_key=ADMIN
    )
    return one, two


async def test_a_session_opened_on_one_replica_is_open_on_the_other(
    aiohttp_server: AiohttpServer,
    aiohttp_client: AiohttpClient,
    make_settings: MakeSettings,
    redis_url: str,
) -> None:
    one, two = await pair(aiohttp_server, aiohttp_client, make_settings, redis_url)
    assert isinstance(app_of(one)[DASHBOARD_SESSIONS_KEY], SharedSessionBook)
    token = await signed_in_on(one)
    status, text = await page(two, token)
    assert status == 200
    found = CSRF.search(text)
    assert found is not None
    # Signed out on the other replica: ended on both (not only in that process's memory).
    async with two.post(
        "/dashboard/signout",
        data={"csrf": found.group(1)},
        headers=cookie(token),
        allow_redirects=False,
    ) as resp:
        assert resp.status == 303
        assert resp.headers["Location"] == "/dashboard/signin"
    for gw in (one, two):
        status, _ = await page(gw, token)
        assert status == 303


async def test_failed_sign_ins_count_once_for_every_replica(
    aiohttp_server: AiohttpServer,
    aiohttp_client: AiohttpClient,
    make_settings: MakeSettings,
    redis_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Five wrong admin keys a minute, whichever process they reach: each counted its own
    before, so N workers let N times as many guesses through."""
    monkeypatch.setattr(guard, "_FAILED_SIGN_IN_DELAY", 0.01)
    one, two = await pair(aiohttp_server, aiohttp_client, make_settings, redis_url)
    statuses = []
    for i in range(6):
        gw = (one, two)[i % 2]
        async with gw.post("/dashboard/signin", data={"admin_key": f"wrong {i}"}) as resp:
            statuses.append(resp.status)
    assert statuses == [401] * 5 + [429]
    for gw in (one, two):  # the right key too, for the rest of the minute, everywhere
        async with gw.post(
            "/dashboard/signin", data={"admin_key": ADMIN}, allow_redirects=False
        ) as resp:
            assert resp.status == 429
            assert int(resp.headers["Retry-After"]) >= 1


async def test_redis_not_answering_is_a_503_page_not_a_sign_in_loop(
    aiohttp_server: AiohttpServer,
    aiohttp_client: AiohttpClient,
    make_settings: MakeSettings,
    redis_server: RedisServer,
) -> None:
    one, _ = await pair(aiohttp_server, aiohttp_client, make_settings, redis_server.url)
    token = await signed_in_on(one)
    redis_server.stop()
    status, text = await page(one, token)
    assert status == 503 and "Redis" in text
    async with one.post(
        "/dashboard/signin", data={"admin_key": ADMIN}, allow_redirects=False
    ) as resp:
        assert resp.status == 503
        assert resp.headers["Retry-After"] == "1"
    redis_server.start()  # empty: the session went with Redis's data
    status, _ = await page(one, token)
    assert status == 303


async def test_shared_sessions_expire_end_with_a_new_admin_key_and_clear(
    redis_url: str,
) -> None:
    redis = Redis.from_url(redis_url)
    now = [1000.0]
    book = SharedSessionBook(redis, clock=lambda: now[0])
    try:
        tokens = [(await book.open(ADMIN, ttl=60))[0] for _ in range(3)]
        assert 0 < await redis.pttl(f"tk:dash:s:{digest(tokens[0])}") <= 60_001  # Redis ends it
        now[0] = 1059.9
        assert await book.get(tokens[0], ADMIN) is not None
        assert await book.get(tokens[0], "another admin key") is None
        assert await book.get(tokens[0], ADMIN) is None  # dropped for good
        now[0] = 1060.0
        assert await book.get(tokens[1], ADMIN) is None  # expired
        assert await book.get(None, ADMIN) is None and await book.get("nonsense", ADMIN) is None
        now[0] = 1000.0
        assert await book.clear() == 1  # the third: the others are gone already
        assert await book.get(tokens[2], ADMIN) is None
    finally:
        await redis.aclose()


async def test_a_browser_stays_signed_in_across_real_workers(
    tmp_path: Path, aiohttp_server: AiohttpServer, redis_server: RedisServer
) -> None:
    """`gateway serve --workers 2`: every page on a new connection (the kernel hands each to
    either worker). With sessions in one process's memory, about half went back to sign-in."""
    fake = FakeOpenAI()
    await fake.start(aiohttp_server)
    config = write_config(tmp_path, fake.base_url, redis_server.url, admin_key=ADMIN)
    connector = TCPConnector(force_close=True)
    timeout = ClientTimeout(total=NEVER_HANG)
    async with (
        replicas(config, 1, "--workers", "2") as (parent,),
        ClientSession(connector=connector, timeout=timeout) as session,
    ):
        async with session.post(
            f"{parent.url}/dashboard/signin", data={"admin_key": ADMIN}, allow_redirects=False
        ) as resp:
            assert resp.status == 303
            token = resp.cookies[COOKIE].value

        async def one() -> tuple[int, str]:
            async with session.get(
                f"{parent.url}/dashboard", headers=cookie(token), allow_redirects=False
            ) as resp:
                return resp.status, resp.headers["X-Request-ID"][:20]

        # At once, on as many connections: each worker takes some (one after another, the
        # kernel may hand them all to one).
        answers = await asyncio.gather(*(one() for _ in range(60)))
        assert len({worker for _, worker in answers}) == 2  # both workers answered
        assert [status for status, _ in answers] == [200] * 60
