"""Attacks on the Redis-backed dashboard sessions (commits f989962, e7bae1e). Real
redis-server, real app; every test states the promise it checks and what happens."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from aiohttp.pytest_plugin import AiohttpClient
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis

from gateway.app import create_app
from gateway.config import load_settings
from gateway.reload import reload_config
from gateway.state import DASHBOARD_SESSIONS_KEY
from tests.conftest import MakeSettings, app_of, start_gateway
from tests.redis_server import RedisServer
from tests.test_dashboard_shared import ADMIN, NEW, _signed_in_with, page

THIRD = "a-third-admin-key-0123456789"


def _write(
    path: Path, tmp: Path, redis: str, key: str, *, timeout: float, dashboard: bool = True
) -> None:
    path.write_text(
        f'[server]\ndatabase = "{tmp / "keys.db"}"\nadmin_key = "{key}"\n'
        f'redis_url = "{redis}"\nredis_timeout_seconds = {timeout}\n'
        f"dashboard = {'true' if dashboard else 'false'}\n",
        encoding="utf-8",
    )


async def _gw(
    aiohttp_client: AiohttpClient, tmp: Path, redis: str, name: str, key: str, wait: float
) -> tuple[TestClient[Any, Any], Path]:
    config = tmp / f"{name}.toml"
    _write(config, tmp, redis, key, timeout=wait)
    load = lambda: load_settings(config, {})  # noqa: E731
    return await aiohttp_client(create_app(load(), reload=load)), config


async def test_a_restart_to_another_key_with_the_dashboard_off_then_a_rollback_revives_sessions(
    aiohttp_client: AiohttpClient, make_settings: MakeSettings, redis_server: RedisServer
) -> None:
    """docs/dashboard.md: "A process that starts ends every session not sealed with its admin
    key ... a key changed by a restart ends the old key's sessions, and a rollback to the old
    key brings none back." The startup clear runs only when `dashboard` is on: an operator
    who restarts with a new key B and the dashboard off (say, during an incident) ends
    nothing; the later rollback to A opens A's old (possibly stolen) cookie again."""
    first = await start_gateway(
        aiohttp_client, make_settings(admin_key=ADMIN, redis_url=redis_server.url)
    )
    token = await _signed_in_with(first, ADMIN)
    await first.close()
    second = await start_gateway(  # new key, dashboard shut
        aiohttp_client,
        make_settings(admin_key=NEW, dashboard=False, redis_url=redis_server.url),
    )
    await second.close()
    third = await start_gateway(  # rollback
        aiohttp_client, make_settings(admin_key=ADMIN, redis_url=redis_server.url)
    )
    assert (await page(third, token))[0] == 303, "the old key's session came back"


async def test_a_restart_without_an_admin_key_then_with_it_back_revives_sessions(
    aiohttp_client: AiohttpClient, make_settings: MakeSettings, redis_server: RedisServer
) -> None:
    """A reload that takes the admin key out ends every session ("putting the old key back
    later brings none back"), and "a process that starts ends every session not sealed with
    its admin key, as a reload that changes the key does". A restart without an admin key
    clears nothing (the clear is skipped when `admin_key` is None), so restarting with the
    key back opens the old sessions again."""
    first = await start_gateway(
        aiohttp_client, make_settings(admin_key=ADMIN, redis_url=redis_server.url)
    )
    token = await _signed_in_with(first, ADMIN)
    await first.close()
    second = await start_gateway(aiohttp_client, make_settings(redis_url=redis_server.url))
    await second.close()
    third = await start_gateway(
        aiohttp_client, make_settings(admin_key=ADMIN, redis_url=redis_server.url)
    )
    assert (await page(third, token))[0] == 303, "the old key's session came back"


async def test_an_owed_clear_is_forgotten_when_the_old_key_comes_back(
    aiohttp_client: AiohttpClient, tmp_path: Path, redis_server: RedisServer
) -> None:
    """docs: a reload changing the admin key ends the old key's sessions ("putting the old
    key back later brings none back"); one Redis did not take is "owed: that process refuses
    every session (503) until Redis takes the deletion". A reload A->B while Redis is paused
    owes clear(keep=B); a second reload B->A replaces the owed clear by clear(keep=A) (one
    `_keep` slot), so when Redis is back the A session that should have ended is kept and
    opens again (200)."""
    gw, config = await _gw(aiohttp_client, tmp_path, redis_server.url, "one", ADMIN, 0.2)
    token = await _signed_in_with(gw, ADMIN)
    assert (await page(gw, token))[0] == 200
    pauser = Redis.from_url(redis_server.url)
    try:
        await pauser.execute_command("CLIENT", "PAUSE", 3000, "WRITE")
        _write(config, tmp_path, redis_server.url, NEW, timeout=0.2)  # the cookie leaked
        assert await reload_config(app_of(gw))
        _write(config, tmp_path, redis_server.url, ADMIN, timeout=0.2)  # a quick rollback
        assert await reload_config(app_of(gw))
        await pauser.execute_command("CLIENT", "UNPAUSE")
    finally:
        await pauser.aclose()
    assert (await page(gw, token))[0] == 303, "the session A->B should have ended is open"


async def test_a_retried_clear_of_a_superseded_key_ends_the_new_keys_sessions(
    aiohttp_client: AiohttpClient, tmp_path: Path, redis_server: RedisServer
) -> None:
    """docs: "each replica's reload ends the sessions of the old key and keeps those opened
    with the new key on replicas reloaded before it". Replica one's reload A->B was not taken
    (owed, keep=B); a dashboard request retries it; while that retry is in flight the operator
    reloads B->C. `clear(C)` only waits for the running task, which still has keep=B, and it
    deletes the C session opened on replica two (already on C): that browser is signed out."""
    url = redis_server.url
    one, config_one = await _gw(aiohttp_client, tmp_path, url, "one", ADMIN, 1.0)
    two, config_two = await _gw(aiohttp_client, tmp_path, url, "two", ADMIN, 1.0)
    await _signed_in_with(one, ADMIN)  # an old-key session, for the clear A->B to delete
    pauser = Redis.from_url(url)
    try:
        await pauser.execute_command("CLIENT", "PAUSE", 1600, "WRITE")
        _write(config_one, tmp_path, url, NEW, timeout=1.0)
        assert await reload_config(app_of(one))  # A->B: not taken (owed, keep=B)
        await pauser.execute_command("CLIENT", "UNPAUSE")
        await asyncio.sleep(0.2)
        _write(config_two, tmp_path, url, THIRD, timeout=1.0)
        assert await reload_config(app_of(two))  # the rollout of C reaches replica two
        token_c = await _signed_in_with(two, THIRD)  # (after that failed clear of one)
        assert (await page(two, token_c))[0] == 200
        await asyncio.sleep(0.3)
        assert (await page(two, token_c))[0] == 200
        await pauser.execute_command("CLIENT", "PAUSE", 500, "WRITE")
        book = app_of(one)[DASHBOARD_SESSIONS_KEY]
        assert book._owed and book._keep == NEW
        retry = asyncio.create_task(page(one, "whatever"))  # runs the owed clear (keep=B)
        await asyncio.sleep(0.2)
        _write(config_one, tmp_path, url, THIRD, timeout=1.0)
        assert await reload_config(app_of(one))  # B->C while the retry runs
        await retry
    finally:
        await pauser.aclose()
    assert (await page(two, token_c))[0] == 200, "the new key's session was ended"


async def test_anonymous_requests_walk_the_whole_keyspace_again_and_again_while_a_clear_is_owed(
    aiohttp_client: AiohttpClient, tmp_path: Path, redis_server: RedisServer
) -> None:
    """e7bae1e: "anonymous GETs could make a fresh process walk the keyspace again and again.
    It runs once" (test_the_clear_at_start_walks_redis_once). While a clear is owed (Redis
    refusing writes: NOREPLICAS here, as in a failover; or READONLY), `get` runs `_settle`
    before it even looks at the cookie, so every cookieless GET /dashboard starts a new full
    SCAN of Redis (every key, not only sessions) that fails at its DEL: 20 anonymous GETs
    one after another are 20 walks of the keyspace."""
    url = redis_server.url
    r = Redis.from_url(url)
    try:
        pipe = r.pipeline(transaction=False)
        for i in range(20_000):
            pipe.set(f"tk:other:{i}", "x")  # the limits' counters, say
        await pipe.execute()
        gw, config = await _gw(aiohttp_client, tmp_path, url, "one", ADMIN, 0.5)
        await _signed_in_with(gw, ADMIN)
        await r.config_set("min-replicas-to-write", 1)  # writes refused (NOREPLICAS)
        _write(config, tmp_path, url, NEW, timeout=0.5)
        assert await reload_config(app_of(gw))  # the clear is owed
        await r.config_resetstat()
        for _ in range(20):  # no cookie at all
            async with gw.get("/dashboard", allow_redirects=False) as resp:
                assert resp.status in (303, 503)
        info = await r.info("commandstats")
        scans = info.get("cmdstat_scan", {}).get("calls", 0)
        assert scans <= 2 * (20_000 // 500 + 5), f"{scans} SCAN calls for 20 anonymous GETs"
    finally:
        await r.config_set("min-replicas-to-write", 0)
        await r.aclose()


async def test_a_foreign_hash_under_the_session_prefix_is_not_dropped_at_start(
    aiohttp_client: AiohttpClient, make_settings: MakeSettings, redis_server: RedisServer
) -> None:
    """docs/dashboard.md: "Anything else under `tk:dash:s:` (not a hash, not one we wrote) is
    dropped then too" (when a process starts). A hash none of whose fields is csrf, admin or
    expires reads as [None, None, None] in `_drop`, which takes that for "gone since" and
    keeps it: it is never dropped (harmless to sessions; the docs promise otherwise)."""
    r = Redis.from_url(redis_server.url)
    try:
        await r.hset("tk:dash:s:foreign", mapping={"owner": "another-app"})
        await start_gateway(
            aiohttp_client, make_settings(admin_key=ADMIN, redis_url=redis_server.url)
        )
        assert await r.exists("tk:dash:s:foreign") == 0, "a hash not of ours was kept"
    finally:
        await r.aclose()
