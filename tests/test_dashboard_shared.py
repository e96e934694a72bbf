"""Dashboard sessions shared through Redis: a browser signed in on one worker (or replica) is
signed in on all, a sign-out anywhere ends it everywhere, failed sign-ins count once for all,
and Redis not answering is a 503 page, never a sign-in loop. Real redis-server instances
(`tests/redis_server.py`); one test runs a real `gateway serve --workers 2`."""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientSession, ClientTimeout, TCPConnector
from aiohttp.pytest_plugin import AiohttpClient, AiohttpServer
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis
from structlog.testing import capture_logs

from gateway.app import create_app
from gateway.config import load_settings
from gateway.dashboard import guard, shared_sessions
from gateway.dashboard.guard import COOKIE
from gateway.dashboard.sessions import digest
from gateway.dashboard.shared_sessions import SharedSessionBook
from gateway.reload import reload_config
from gateway.state import DASHBOARD_SESSIONS_KEY
from tests.conftest import NEVER_HANG, MakeSettings, app_of, start_gateway
from tests.fakes import FakeOpenAI
from tests.redis_server import RedisServer
from tests.replicas import both_workers_serve, replicas, write_config
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


async def settled(gw: TestClient[Any, Any]) -> None:
    """The process's clear at start went through (it runs off the start)."""
    book = app_of(gw)[DASHBOARD_SESSIONS_KEY]
    assert isinstance(book, SharedSessionBook)
    async with asyncio.timeout(NEVER_HANG):
        await book._settle()


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
        # Refused, not dropped: a replica still on the old key (a rolling reload) does not
        # sign out the browsers of the new one.
        assert await book.get(tokens[0], ADMIN) is not None
        now[0] = 1060.0
        assert await book.get(tokens[1], ADMIN) is None  # expired, and dropped
        assert await redis.exists(f"tk:dash:s:{digest(tokens[1])}") == 0
        assert await book.get(None, ADMIN) is None and await book.get("nonsense", ADMIN) is None
        now[0] = 1000.0
        assert await book.clear() == 2  # the first and the third: the second is gone already
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
        # kernel may hand them all to one), once both serve.
        await both_workers_serve(parent.url)
        answers = await asyncio.gather(*(one() for _ in range(60)))
        assert len({worker for _, worker in answers}) == 2  # both workers answered
        assert [status for status, _ in answers] == [200] * 60


async def test_guesses_at_once_on_two_processes_get_no_more_than_five_compared(
    aiohttp_server: AiohttpServer,
    aiohttp_client: AiohttpClient,
    make_settings: MakeSettings,
    redis_server: RedisServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Checking the count and adding to it were two steps: each process passed the check at
    four, and one guess more per process got compared."""
    monkeypatch.setattr(guard, "_FAILED_SIGN_IN_DELAY", 0.05)
    one, two = await pair(aiohttp_server, aiohttp_client, make_settings, redis_server.url)

    async def guess(gw: TestClient[Any, Any], i: int) -> int:
        async with gw.post("/dashboard/signin", data={"admin_key": f"wrong {i}"}) as resp:
            return resp.status

    statuses = await asyncio.gather(*(guess((one, two)[i % 2], i) for i in range(20)))
    assert sorted(statuses) == [401] * 5 + [429] * 15


async def test_a_right_key_takes_back_its_attempt(
    aiohttp_server: AiohttpServer,
    aiohttp_client: AiohttpClient,
    make_settings: MakeSettings,
    redis_server: RedisServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Counted before the key is compared, a right key is not left as a failure: four
    wrong keys and any number of sign-ins leave one guess before the lock."""
    monkeypatch.setattr(guard, "_FAILED_SIGN_IN_DELAY", 0.01)
    one, two = await pair(aiohttp_server, aiohttp_client, make_settings, redis_server.url)
    for i in range(4):
        async with one.post("/dashboard/signin", data={"admin_key": f"wrong {i}"}) as resp:
            assert resp.status == 401
    for gw in (one, two, one):
        await signed_in_on(gw)
    async with two.post("/dashboard/signin", data={"admin_key": "wrong 5"}) as resp:
        assert resp.status == 401
    async with one.post("/dashboard/signin", data={"admin_key": ADMIN}) as resp:
        assert resp.status == 429


async def test_redis_refusing_writes_compares_no_key(
    aiohttp_server: AiohttpServer,
    aiohttp_client: AiohttpClient,
    make_settings: MakeSettings,
    redis_server: RedisServer,
) -> None:
    """Redis answering reads but refusing writes (maxmemory, a read-only replica after a
    failover): a guess it cannot count is not compared (it was, uncounted, unlogged and
    undelayed), so the right key is a 503 as much as a wrong one; once Redis takes writes
    again nothing of it was counted."""
    one, _ = await pair(aiohttp_server, aiohttp_client, make_settings, redis_server.url)
    admin = Redis.from_url(redis_server.url)
    try:
        await admin.config_set("maxmemory", 1)  # writes now fail with OOM; reads answer
        for key in [f"wrong {i}" for i in range(10)] + [ADMIN]:
            async with one.post(
                "/dashboard/signin", data={"admin_key": key}, allow_redirects=False
            ) as resp:
                assert resp.status == 503
                assert COOKIE not in resp.cookies
    finally:
        await admin.config_set("maxmemory", 0)
        await admin.aclose()
    token = await signed_in_on(one)
    assert (await page(one, token))[0] == 200


async def test_write_access_to_redis_does_not_mint_a_session(
    aiohttp_server: AiohttpServer,
    aiohttp_client: AiohttpClient,
    make_settings: MakeSettings,
    redis_server: RedisServer,
) -> None:
    """The binding of a session to the admin key was the key's plain SHA-256, the same in
    every session: whoever could write Redis copied it into a session of their own, or
    stretched one. It is an HMAC keyed with the admin key over the session's name, CSRF
    token and end."""
    one, _ = await pair(aiohttp_server, aiohttp_client, make_settings, redis_server.url)
    token = await signed_in_on(one)
    one.session.cookie_jar.clear()  # (each page below names its own cookie)
    assert (await page(one, token))[0] == 200
    attacker = Redis.from_url(redis_server.url)
    try:
        [name] = [n async for n in attacker.scan_iter(match="tk:dash:s:*")]
        fields = await attacker.hgetall(name)
        mine = "attacker-chosen-token"
        await attacker.hset(f"tk:dash:s:{digest(mine)}", mapping=fields)  # a copy
        await attacker.hset(
            f"tk:dash:s:{digest(mine + '2')}",
            mapping={b"csrf": b"c", b"admin": digest(ADMIN).encode(), b"expires": b"1e12"},
        )
        assert (await page(one, mine))[0] == 303
        assert (await page(one, mine + "2"))[0] == 303
        await attacker.hset(name, "expires", "1e12")  # stretched
        assert (await page(one, token))[0] == 303
        await attacker.hset(name, "expires", "nan")
        assert (await page(one, token))[0] == 303
    finally:
        await attacker.aclose()


async def test_failed_sign_ins_from_elsewhere_lock_for_a_minute_at_most(
    aiohttp_server: AiohttpServer,
    aiohttp_client: AiohttpClient,
    make_settings: MakeSettings,
    redis_server: RedisServer,
) -> None:
    """The count's times are Redis's; a score from elsewhere (`inf`, a clock far ahead) was
    an endless wait, or a 500 (`round(inf)`)."""
    one, _ = await pair(aiohttp_server, aiohttp_client, make_settings, redis_server.url)
    r = Redis.from_url(redis_server.url)
    try:
        await r.zadd("tk:dash:failed", {f"x{i}": float("inf") for i in range(5)})
        async with one.post("/dashboard/signin", data={"admin_key": ADMIN}) as resp:
            assert resp.status == 429
            assert 1 <= int(resp.headers["Retry-After"]) <= 60
    finally:
        await r.aclose()


async def test_sessions_a_reload_could_not_end_stay_refused_until_it_can(
    aiohttp_client: AiohttpClient,
    tmp_path: Path,
    redis_server: RedisServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A reload that turns the dashboard off ends every session; Redis not answering then
    left them in Redis, and turning the dashboard back on (the same admin key) revived them,
    a stolen cookie included. The clear is owed: sessions are refused (503) until it goes
    through."""
    monkeypatch.setattr(shared_sessions, "_CLEAR_RETRY_SECONDS", 0.0)  # (Redis back: at once)
    config = tmp_path / "gateway.toml"

    def write(dashboard: str) -> None:
        config.write_text(
            f'[server]\ndatabase = "{tmp_path / "keys.db"}"\nadmin_key = "{ADMIN}"\n'
            f'redis_url = "{redis_server.url}"\nredis_timeout_seconds = 0.2\n'
            f"dashboard = {dashboard}\n",
            encoding="utf-8",
        )

    write("true")
    load = lambda: load_settings(config, {})  # noqa: E731 - as `serve` passes it
    gw = await aiohttp_client(create_app(load(), reload=load))
    token = await signed_in_on(gw)
    assert (await page(gw, token))[0] == 200
    pauser = Redis.from_url(redis_server.url)
    try:
        with capture_logs() as logs:
            await pauser.execute_command("CLIENT", "PAUSE", 1500, "WRITE")
            write("false")  # an incident: the operator shuts the dashboard
            assert await reload_config(app_of(gw))
        assert [x["event"] for x in logs if "dashboard" in x["event"]] == [
            "dashboard_sessions_not_ended"
        ]
        write("true")
        assert await reload_config(app_of(gw))
        assert (await page(gw, token))[0] == 503  # still paused: refused, not revived
        await pauser.execute_command("CLIENT", "UNPAUSE")
    finally:
        await pauser.aclose()
    assert (await page(gw, token))[0] == 303  # the owed clear went through
    assert (await page(gw, await signed_in_on(gw)))[0] == 200


async def test_failures_timed_ahead_of_redis_clock_lock_no_longer_than_the_window(
    aiohttp_server: AiohttpServer,
    aiohttp_client: AiohttpClient,
    make_settings: MakeSettings,
    redis_server: RedisServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Failures timed ahead of Redis's clock (a primary whose clock ran ahead, then a failover;
    or one write to Redis) were never trimmed and the count got no expiry on the refusing
    path: sign-in stayed locked long past the wait it announced, for ever with `inf`. They
    count as made now, and the count expires a window after every attempt. (Window
    shortened to 0.4 s here.)"""
    monkeypatch.setattr(shared_sessions, "FAILURE_WINDOW", 0.4)
    one, _ = await pair(aiohttp_server, aiohttp_client, make_settings, redis_server.url)
    r = Redis.from_url(redis_server.url)
    try:
        sec, _us = await r.time()
        await r.zadd("tk:dash:failed", {f"ahead{i}": sec + 3600 for i in range(5)})
        async with one.post("/dashboard/signin", data={"admin_key": ADMIN}) as resp:
            assert resp.status == 429
            assert int(resp.headers["Retry-After"]) <= 1  # "wait 1 s"
        await asyncio.sleep(1.0)  # more than the window announced
        async with one.post(
            "/dashboard/signin", data={"admin_key": ADMIN}, allow_redirects=False
        ) as resp:
            assert resp.status == 303, f"still {resp.status} after the announced wait"
    finally:
        await r.aclose()


async def test_a_session_hash_with_a_non_ascii_seal_is_refused(
    aiohttp_server: AiohttpServer,
    aiohttp_client: AiohttpClient,
    make_settings: MakeSettings,
    redis_server: RedisServer,
) -> None:
    """A seal that is not ASCII reached `hmac.compare_digest` on str, which raises: a 500.
    Seals are compared as bytes."""
    one, _ = await pair(aiohttp_server, aiohttp_client, make_settings, redis_server.url)
    r = Redis.from_url(redis_server.url)
    try:
        mine = "attacker-token"
        await r.hset(
            f"tk:dash:s:{digest(mine)}",
            mapping={"csrf": "c", "admin": "é" * 64, "expires": "1e12"},
        )
        status, _ = await page(one, mine)
        assert status == 303
    finally:
        await r.aclose()


async def test_a_failure_count_of_another_type_is_dropped(
    aiohttp_server: AiohttpServer,
    aiohttp_client: AiohttpClient,
    make_settings: MakeSettings,
    redis_server: RedisServer,
) -> None:
    """A `tk:dash:failed` that was not a sorted set (one SET, another application sharing
    the Redis) made every sign-in a 503 for ever (WRONGTYPE, no expiry): the admin was locked
    out until someone deleted the key by hand. The script drops it."""
    one, _ = await pair(aiohttp_server, aiohttp_client, make_settings, redis_server.url)
    r = Redis.from_url(redis_server.url)
    try:
        await r.set("tk:dash:failed", "x")
        assert await r.ttl("tk:dash:failed") == -1
        async with one.post(
            "/dashboard/signin", data={"admin_key": ADMIN}, allow_redirects=False
        ) as resp:
            assert resp.status in (303, 429), f"{resp.status}: locked out with no end"
    finally:
        await r.aclose()


async def test_a_wrong_key_holds_the_turn_even_if_its_sender_hangs_up(
    tmp_path: Any, aiohttp_server: AiohttpServer, redis_server: RedisServer
) -> None:
    """The server cancels a handler whose client disconnects: a guesser who sent a wrong key
    and hung up cancelled the half-second delay, and the next attempt was compared at once.
    The turn is released by the loop when the delay is over, whatever the sender does."""

    fake = FakeOpenAI()
    await fake.start(aiohttp_server)
    config = write_config(tmp_path, fake.base_url, redis_server.url, admin_key=ADMIN)
    async with replicas(config, 1) as (gw,):
        host, port = gw.url.removeprefix("http://").split(":")
        body = b"admin_key=wrong"
        raw = (
            b"POST /dashboard/signin HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: application/x-www-form-urlencoded\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        _, writer = await asyncio.open_connection(host, int(port))
        writer.write(raw)
        await writer.drain()
        await asyncio.sleep(0.1)  # compared, now in its half-second
        writer.close()  # hang up
        await asyncio.sleep(0.05)
        async with ClientSession() as session:
            started = time.monotonic()
            async with session.post(
                f"{gw.url}/dashboard/signin", data={"admin_key": ADMIN}, allow_redirects=False
            ) as resp:
                assert resp.status == 303
            waited = time.monotonic() - started
            r = Redis.from_url(redis_server.url)
            try:
                assert await r.zcard("tk:dash:failed") == 1  # the hung-up guess was counted
            finally:
                await r.aclose()
        assert waited >= 0.25, f"the next attempt was compared after {waited:.3f} s"


async def test_a_key_changed_by_a_restart_ends_the_sessions_of_the_old_one(
    aiohttp_client: AiohttpClient, make_settings: MakeSettings, redis_server: RedisServer
) -> None:
    """A key changed by a restart (not a reload) cleared nothing: the old key's sessions were
    refused but kept, and a later restart with the old key back (a config rollback) opened a
    stolen cookie again. A process that starts ends every session not sealed with its admin
    key."""

    first = await start_gateway(
        aiohttp_client, make_settings(admin_key=ADMIN, redis_url=redis_server.url)
    )
    token = await signed_in_on(first)
    await first.close()  # restart with a new key
    second = await start_gateway(
        aiohttp_client,
        make_settings(admin_key="a-new-admin-key-0123456789", redis_url=redis_server.url),
    )
    assert (await page(second, token))[0] == 303
    await second.close()  # later: the old key back (a rollback)
    third = await start_gateway(
        aiohttp_client, make_settings(admin_key=ADMIN, redis_url=redis_server.url)
    )
    assert (await page(third, token))[0] == 303, "the session of before the change is open"


NEW = "a-new-admin-key-0123456789"


def _config(path: Path, tmp: Path, redis: str, key: str) -> None:
    path.write_text(
        f'[server]\ndatabase = "{tmp / "keys.db"}"\nadmin_key = "{key}"\nredis_url = "{redis}"\n',
        encoding="utf-8",
    )


async def _reloadable(
    aiohttp_client: AiohttpClient, tmp_path: Path, redis: str, name: str, key: str = ADMIN
) -> tuple[TestClient[Any, Any], Path]:
    """A gateway with its own config file, to reload on its own (one replica of several)."""
    config = tmp_path / f"{name}.toml"
    _config(config, tmp_path, redis, key)
    load = lambda: load_settings(config, {})  # noqa: E731 - as `serve` passes it
    gw = await aiohttp_client(create_app(load(), reload=load))
    return gw, config


async def _signed_in_with(gw: TestClient[Any, Any], key: str) -> str:
    async with gw.post("/dashboard/signin", data={"admin_key": key}, allow_redirects=False) as r:
        assert r.status == 303, await r.text()
        token = r.cookies["kiosk_session"].value
    gw.session.cookie_jar.clear()
    return token


async def test_a_non_utf8_name_under_the_session_prefix_is_dropped(
    aiohttp_client: AiohttpClient, make_settings: MakeSettings, redis_server: RedisServer
) -> None:
    """A key `tk:dash:s:\\xff` (one HSET by whoever can write Redis, or another application
    sharing it) made the clear of other keys' sessions raise UnicodeDecodeError: every
    dashboard page a 500. It is not a session of ours: the clear at start drops it."""
    r = Redis.from_url(redis_server.url)
    try:
        await r.hset(b"tk:dash:s:\xff", mapping={"csrf": "c", "admin": "x", "expires": "1"})
        gw = await start_gateway(
            aiohttp_client, make_settings(admin_key=ADMIN, redis_url=redis_server.url)
        )
        await settled(gw)
        assert await r.exists(b"tk:dash:s:\xff") == 0
        token = await signed_in_on(gw)
        gw.session.cookie_jar.clear()
        assert [(await page(gw, token))[0] for _ in range(2)] == [200, 200]
        async with gw.get("/dashboard", allow_redirects=False) as resp:  # no cookie at all
            assert resp.status == 303
    finally:
        await r.aclose()


async def test_a_key_of_another_type_under_the_session_prefix_is_dropped(
    aiohttp_client: AiohttpClient, make_settings: MakeSettings, redis_server: RedisServer
) -> None:
    """A string (or list, set...) under the session prefix made the clear raise WRONGTYPE:
    every dashboard page of every process started since was a 503 "Redis does not answer",
    for ever; one in place of a browser's own session made its pages 503. Neither is a
    session of ours: the clear at start drops the one, a page the other."""
    r = Redis.from_url(redis_server.url)
    try:
        await r.set("tk:dash:s:not-a-hash", "x")
        gw = await start_gateway(
            aiohttp_client, make_settings(admin_key=ADMIN, redis_url=redis_server.url)
        )
        await settled(gw)
        assert await r.exists("tk:dash:s:not-a-hash") == 0
        token = await signed_in_on(gw)
        gw.session.cookie_jar.clear()
        assert (await page(gw, token))[0] == 200
        await r.delete(f"tk:dash:s:{digest(token)}")
        await r.rpush(f"tk:dash:s:{digest(token)}", "x")  # its own session, another type
        assert (await page(gw, token))[0] == 303
        assert await r.exists(f"tk:dash:s:{digest(token)}") == 0
    finally:
        await r.aclose()


async def test_a_replica_still_on_the_old_key_leaves_the_new_keys_sessions_alone(
    aiohttp_client: AiohttpClient, tmp_path: Path, redis_server: RedisServer
) -> None:
    """During a rolling reload, a replica still on the old key refuses the sessions of the
    new one and leaves them alone. The sessions of another key were ended on a process's
    first dashboard request: one still on the old key, serving its first mid-rollout, ended
    the new key's. They are ended when a process starts."""
    one, config_one = await _reloadable(aiohttp_client, tmp_path, redis_server.url, "one")
    two, _ = await _reloadable(aiohttp_client, tmp_path, redis_server.url, "two")
    _config(config_one, tmp_path, redis_server.url, NEW)
    assert await reload_config(app_of(one))  # the rollout reaches replica one first
    token = await _signed_in_with(one, NEW)
    assert (await page(one, token))[0] == 200
    async with two.get("/dashboard/signin") as resp:  # (not a session page: no sweep)
        assert resp.status == 200
    assert (await page(two, token))[0] == 303  # refused by the old-key replica: as documented
    assert (await page(one, token))[0] == 200, "the old-key replica ended the new key's session"


async def test_a_rolling_reload_keeps_the_sessions_of_the_new_key(
    aiohttp_client: AiohttpClient, tmp_path: Path, redis_server: RedisServer
) -> None:
    """Each replica's reload ended every session, those opened with the new key on replicas
    reloaded before it too: with N replicas (or `--workers N`) reloaded in turn, a sign-in
    with the new key lasted until the next reload. A reload ends those of other keys."""
    one, config_one = await _reloadable(aiohttp_client, tmp_path, redis_server.url, "one")
    two, config_two = await _reloadable(aiohttp_client, tmp_path, redis_server.url, "two")
    _config(config_one, tmp_path, redis_server.url, NEW)
    assert await reload_config(app_of(one))
    token = await _signed_in_with(one, NEW)
    assert (await page(one, token))[0] == 200
    _config(config_two, tmp_path, redis_server.url, NEW)
    assert await reload_config(app_of(two))  # the rollout reaches replica two
    assert [(await page(gw, token))[0] for gw in (one, two)] == [200, 200], (
        "a session of the new key was ended by the rollout of that same key"
    )


async def test_the_clear_at_start_walks_redis_once(
    aiohttp_client: AiohttpClient, make_settings: MakeSettings, redis_server: RedisServer
) -> None:
    """The clear of other keys' sessions (a full SCAN of Redis) ran in a request, without a
    lock: every request arriving before the first finished ran its own, and anonymous GETs
    could make a fresh process walk the keyspace again and again. It runs once, when the
    process starts."""
    r = Redis.from_url(redis_server.url)
    try:
        pipe = r.pipeline(transaction=False)
        for i in range(20_000):
            pipe.set(f"tk:other:{i}", "x")  # the limits' counters, say
        await pipe.execute()
        await r.config_resetstat()
        gw = await start_gateway(
            aiohttp_client, make_settings(admin_key=ADMIN, redis_url=redis_server.url)
        )

        async def anonymous() -> int:
            async with gw.get("/dashboard", allow_redirects=False) as resp:
                return resp.status

        assert await asyncio.gather(*(anonymous() for _ in range(20))) == [303] * 20
        info = await r.info("commandstats")
        scans = info.get("cmdstat_scan", {}).get("calls", 0)
        assert 0 < scans <= 20_000 // 500 + 5, f"{scans} SCAN calls"
    finally:
        await r.aclose()


async def test_a_rollback_after_a_restart_that_only_saw_a_sign_in_brings_no_session_back(
    aiohttp_client: AiohttpClient, make_settings: MakeSettings, redis_server: RedisServer
) -> None:
    """A restart with a new key B where the operator only signed in (or opened nothing)
    ended nothing, and a rollback to A opened the old session (a stolen cookie) again. The
    process ends the sessions of another key when it starts."""
    first = await start_gateway(
        aiohttp_client, make_settings(admin_key=ADMIN, redis_url=redis_server.url)
    )
    token = await _signed_in_with(first, ADMIN)
    await first.close()  # restart with a new key (the old one may have leaked)
    second = await start_gateway(
        aiohttp_client, make_settings(admin_key=NEW, redis_url=redis_server.url)
    )
    await _signed_in_with(second, NEW)  # a dashboard request: the operator signs in
    await second.close()  # a config rollback
    third = await start_gateway(
        aiohttp_client, make_settings(admin_key=ADMIN, redis_url=redis_server.url)
    )
    assert (await page(third, token))[0] == 303, "the session of before the change is open"


def _write_config(
    path: Path, tmp: Path, redis: str, key: str, *, timeout: float, dashboard: bool = True
) -> None:
    path.write_text(
        f'[server]\ndatabase = "{tmp / "keys.db"}"\nadmin_key = "{key}"\n'
        f'redis_url = "{redis}"\nredis_timeout_seconds = {timeout}\n'
        f"dashboard = {'true' if dashboard else 'false'}\n",
        encoding="utf-8",
    )


async def _gw_with(
    aiohttp_client: AiohttpClient, tmp: Path, redis: str, name: str, key: str, wait: float
) -> tuple[TestClient[Any, Any], Path]:
    config = tmp / f"{name}.toml"
    _write_config(config, tmp, redis, key, timeout=wait)
    load = lambda: load_settings(config, {})  # noqa: E731
    return await aiohttp_client(create_app(load(), reload=load)), config


async def test_a_restart_with_the_dashboard_off_ends_every_session(
    aiohttp_client: AiohttpClient, make_settings: MakeSettings, redis_server: RedisServer
) -> None:
    """A restart with a new key B and the dashboard off (during an incident, say) ended
    nothing, and a later rollback to A opened A's old cookie again. A process that starts
    with the dashboard off (or no admin key) ends every session, as such a reload does."""
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


async def test_a_restart_without_an_admin_key_ends_every_session(
    aiohttp_client: AiohttpClient, make_settings: MakeSettings, redis_server: RedisServer
) -> None:
    """A restart without an admin key cleared nothing, so restarting with the key back
    opened the old sessions again."""
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


async def test_two_clears_owed_for_different_keys_end_every_session(
    aiohttp_client: AiohttpClient,
    tmp_path: Path,
    redis_server: RedisServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A reload A->B while Redis was paused owed clear(keep=B); a rollback B->A replaced it
    by clear(keep=A), so A's session, which the first should have ended, opened again once
    Redis was back. Two owed clears that keep different keys end every session."""
    monkeypatch.setattr(shared_sessions, "_CLEAR_RETRY_SECONDS", 0.0)  # (Redis back: at once)
    gw, config = await _gw_with(aiohttp_client, tmp_path, redis_server.url, "one", ADMIN, 0.2)
    token = await _signed_in_with(gw, ADMIN)
    assert (await page(gw, token))[0] == 200
    pauser = Redis.from_url(redis_server.url)
    try:
        await pauser.execute_command("CLIENT", "PAUSE", 3000, "WRITE")
        _write_config(config, tmp_path, redis_server.url, NEW, timeout=0.2)  # the cookie leaked
        assert await reload_config(app_of(gw))
        _write_config(config, tmp_path, redis_server.url, ADMIN, timeout=0.2)  # a quick rollback
        assert await reload_config(app_of(gw))
        await pauser.execute_command("CLIENT", "UNPAUSE")
    finally:
        await pauser.aclose()
    assert (await page(gw, token))[0] == 303, "the session A->B should have ended is open"


async def test_an_owed_clear_is_tried_again_a_second_later_at_the_soonest(
    aiohttp_client: AiohttpClient, tmp_path: Path, redis_server: RedisServer
) -> None:
    """While a clear was owed (Redis refusing writes), every request, a cookieless one too,
    started a new walk of Redis's whole keyspace. One that failed is tried again a second
    later at the soonest; requests meanwhile are refused at once."""
    url = redis_server.url
    r = Redis.from_url(url)
    try:
        pipe = r.pipeline(transaction=False)
        for i in range(20_000):
            pipe.set(f"tk:other:{i}", "x")  # the limits' counters, say
        await pipe.execute()
        gw, config = await _gw_with(aiohttp_client, tmp_path, url, "one", ADMIN, 0.5)
        await _signed_in_with(gw, ADMIN)
        await r.config_set("min-replicas-to-write", 1)  # writes refused (NOREPLICAS)
        _write_config(config, tmp_path, url, NEW, timeout=0.5)
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


async def test_a_foreign_hash_under_the_session_prefix_is_dropped_at_start(
    aiohttp_client: AiohttpClient, make_settings: MakeSettings, redis_server: RedisServer
) -> None:
    """A hash with none of a session's fields read as "gone since", and was kept."""
    r = Redis.from_url(redis_server.url)
    try:
        await r.hset("tk:dash:s:foreign", mapping={"owner": "another-app"})
        gw = await start_gateway(
            aiohttp_client, make_settings(admin_key=ADMIN, redis_url=redis_server.url)
        )
        await settled(gw)
        assert await r.exists("tk:dash:s:foreign") == 0, "a hash not of ours was kept"
    finally:
        await r.aclose()


async def test_a_sign_in_that_a_reload_overtakes_opens_no_session(
    aiohttp_client: AiohttpClient,
    tmp_path: Path,
    redis_server: RedisServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A sign-in whose key was compared before a reload changed it wrote its session (sealed
    with the old key) after the reload's clear had run: left in Redis, a later rollback to
    the old key opened it (helper-74). The sign-in checks the key in place once its session
    is written, and ends it if the key changed."""
    gw, config = await _gw_with(aiohttp_client, tmp_path, redis_server.url, "one", ADMIN, 1.0)
    book = app_of(gw)[DASHBOARD_SESSIONS_KEY]
    real = book.open
    opened: list[str] = []

    async def overtaken(admin_key: str, ttl: float) -> Any:
        token, session = await real(admin_key, ttl)
        opened.append(token)
        _write_config(config, tmp_path, redis_server.url, NEW, timeout=1.0)
        assert await reload_config(app_of(gw))  # the reload's clear has run by now
        return token, session

    monkeypatch.setattr(book, "open", overtaken)
    async with gw.post(
        "/dashboard/signin", data={"admin_key": ADMIN}, allow_redirects=False
    ) as resp:
        assert resp.status == 403
        assert "kiosk_session" not in resp.cookies
    r = Redis.from_url(redis_server.url)
    try:
        assert await r.exists(f"tk:dash:s:{digest(opened[0])}") == 0
    finally:
        await r.aclose()
