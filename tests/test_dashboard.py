"""The dashboard over raw HTTP: off without an admin key, sessions, cookie flags, CSRF, pages."""

from __future__ import annotations

import asyncio
import re
import time
from typing import Any

import openai
import pytest
from aiohttp.pytest_plugin import AiohttpClient, AiohttpServer
from aiohttp.test_utils import TestClient

from gateway.dashboard import guard
from gateway.dashboard.sessions import SessionBook
from gateway.settings import ModelConfig, OpenAIConfig, RoutingSettings, Target
from gateway.state import DASHBOARD_SESSIONS_KEY as DASHBOARD_SESSIONS, STORE_KEY as STORE
from tests.conftest import MakeSettings, create_key, openai_client, start_gateway
from tests.fakes import FakeOpenAI

ADMIN = "admin-key-0123456789abcdef"
FORM = {"Content-Type": "application/x-www-form-urlencoded"}
# Upstream keys no random token of a page (a CSRF token, a nonce) could hold by chance.
UP_KEYS = ("sk-upstream-test-key-0", "sk-upstream-test-key-1")


@pytest.fixture
async def gw(aiohttp_client: AiohttpClient, make_settings: MakeSettings) -> TestClient[Any, Any]:
    return await start_gateway(aiohttp_client, make_settings(admin_key=ADMIN))


@pytest.fixture
def short_brake(monkeypatch: pytest.MonkeyPatch) -> None:
    """Wrong admin keys cost 10 ms, not half a second each, for tests that send many (they
    count refusals; test_a_wrong_admin_key_costs_its_sender_the_delay times the real one)."""
    monkeypatch.setattr(guard, "_FAILED_SIGN_IN_DELAY", 0.01)


async def sign_in(gw: TestClient[Any, Any], key: str = ADMIN) -> str:
    """Sign in; the CSRF token of the new session."""
    async with gw.post("/dashboard/signin", data={"admin_key": key}, allow_redirects=False) as r:
        assert r.status == 303, await r.text()
        assert r.headers["Location"] == "/dashboard"
    async with gw.get("/dashboard") as resp:
        assert resp.status == 200
        found = re.search(r'name="csrf" value="([^"]+)"', await resp.text())
    assert found is not None
    return found.group(1)


async def test_off_without_an_admin_key(
    aiohttp_client: AiohttpClient, make_settings: MakeSettings
) -> None:
    gw = await start_gateway(aiohttp_client, make_settings())
    for method, path in (
        ("GET", "/dashboard"),
        ("GET", "/dashboard/signin"),
        ("POST", "/dashboard/signin"),
        ("GET", "/dashboard/keys"),
        ("GET", "/dashboard/static/dashboard.js"),
    ):
        async with gw.request(method, path, data={"admin_key": "x"}) as resp:
            assert resp.status == 404, path


async def test_off_when_the_config_says_so(
    aiohttp_client: AiohttpClient, make_settings: MakeSettings
) -> None:
    gw = await start_gateway(aiohttp_client, make_settings(admin_key=ADMIN, dashboard=False))
    async with gw.get("/dashboard/signin") as resp:
        assert resp.status == 404


async def test_pages_need_a_session(gw: TestClient[Any, Any]) -> None:
    for path in ("/dashboard", "/dashboard/keys", "/dashboard/upstreams", "/dashboard/keys/x"):
        async with gw.get(path, allow_redirects=False) as resp:
            assert resp.status == 303
            assert resp.headers["Location"] == "/dashboard/signin"
    async with gw.post("/dashboard/keys", data={"name": "x", "csrf": "x"}) as resp:
        assert resp.status == 403
    async with gw.get("/dashboard/signin") as resp:
        assert resp.status == 200
        assert "Admin key" in await resp.text()


async def test_cookie_flags_and_security_headers(gw: TestClient[Any, Any]) -> None:
    async with gw.post(
        "/dashboard/signin", data={"admin_key": ADMIN}, allow_redirects=False
    ) as resp:
        assert resp.status == 303
        cookie = resp.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/dashboard" in cookie
    assert "Secure" not in cookie  # plain HTTP, no trusted proxy
    async with gw.get("/dashboard") as resp:
        csp = resp.headers["Content-Security-Policy"]
        assert "script-src 'self'" in csp and "'unsafe-inline'" not in csp
        assert resp.headers["X-Frame-Options"] == "DENY"
        assert resp.headers["Cache-Control"] == "no-store"
        assert resp.content_type == "text/html"


async def test_cookie_is_secure_behind_a_trusted_https_proxy(
    aiohttp_client: AiohttpClient, make_settings: MakeSettings
) -> None:
    gw = await start_gateway(
        aiohttp_client, make_settings(admin_key=ADMIN, trust_forwarded_proto=True)
    )
    async with gw.post(
        "/dashboard/signin",
        data={"admin_key": ADMIN},
        headers={"X-Forwarded-Proto": "https"},
        allow_redirects=False,
    ) as resp:
        assert "Secure" in resp.headers["Set-Cookie"]


async def test_forwarded_proto_is_ignored_unless_trusted(gw: TestClient[Any, Any]) -> None:
    async with gw.post(
        "/dashboard/signin",
        data={"admin_key": ADMIN},
        headers={"X-Forwarded-Proto": "https"},
        allow_redirects=False,
    ) as resp:
        assert "Secure" not in resp.headers["Set-Cookie"]


async def test_a_wrong_admin_key_costs_its_sender_the_delay(gw: TestClient[Any, Any]) -> None:
    started = time.monotonic()
    async with gw.post("/dashboard/signin", data={"admin_key": "wrong"}) as resp:
        assert resp.status == 401
    assert time.monotonic() - started >= guard._FAILED_SIGN_IN_DELAY == 0.5


@pytest.mark.usefixtures("short_brake")
async def test_wrong_admin_key_and_the_brake_on_guessing(gw: TestClient[Any, Any]) -> None:
    gw.app[DASHBOARD_SESSIONS].failure_clock = lambda: 1000.0  # type: ignore[index]
    for _ in range(5):
        async with gw.post("/dashboard/signin", data={"admin_key": "wrong"}) as resp:
            assert resp.status == 401
            assert "Set-Cookie" not in resp.headers
    async with gw.post("/dashboard/signin", data={"admin_key": ADMIN}) as resp:
        assert resp.status == 429  # even the right key, for the rest of the minute
        assert resp.headers["Retry-After"] == "60"
    gw.app[DASHBOARD_SESSIONS].failure_clock = lambda: 1061.0  # type: ignore[index]
    await sign_in(gw)


async def test_csrf_token_and_origin_are_checked(gw: TestClient[Any, Any]) -> None:
    csrf = await sign_in(gw)
    for data, headers in (
        ({"name": "x"}, {}),  # no token
        ({"name": "x", "csrf": csrf + "x"}, {}),  # another token
        ({"name": "x", "csrf": csrf}, {"Origin": "https://evil.example"}),
        ({"name": "x", "csrf": csrf}, {"Origin": "null"}),
    ):
        async with gw.post("/dashboard/keys", data=data, headers=headers) as resp:
            assert resp.status == 403
    assert await gw.app[STORE].list_keys() == []  # type: ignore[index]
    origin = str(gw.make_url("")).rstrip("/")
    async with gw.post(
        "/dashboard/keys", data={"name": "ok", "csrf": csrf}, headers={"Origin": origin}
    ) as resp:
        assert resp.status == 200
        assert "sk-kiosk-" in await resp.text()


async def test_sign_in_from_another_origin_is_refused(gw: TestClient[Any, Any]) -> None:
    async with gw.post(
        "/dashboard/signin",
        data={"admin_key": ADMIN},
        headers={"Origin": "https://evil.example"},
    ) as resp:
        assert resp.status == 403


async def test_sign_out_ends_the_session_on_the_server(gw: TestClient[Any, Any]) -> None:
    csrf = await sign_in(gw)
    token = gw.session.cookie_jar.filter_cookies(gw.make_url("/dashboard"))["kiosk_session"]
    async with gw.post("/dashboard/signout", data={"csrf": csrf}, allow_redirects=False) as r:
        assert r.status == 303
    # The old cookie, replayed, opens nothing.
    async with gw.get(
        "/dashboard", headers={"Cookie": f"kiosk_session={token.value}"}, allow_redirects=False
    ) as resp:
        assert resp.status == 303


async def test_a_new_admin_key_ends_old_sessions() -> None:
    book = SessionBook(clock=lambda: 0.0)
    token, _ = await book.open("old", ttl=60)
    assert await book.get(token, "old") is not None
    assert await book.get(token, "new") is None
    assert await book.get(token, "old") is None  # dropped for good


async def test_sessions_expire() -> None:
    now = [0.0]
    book = SessionBook(clock=lambda: now[0])
    token, _ = await book.open(ADMIN, ttl=60)
    now[0] = 59.9
    assert await book.get(token, ADMIN) is not None
    now[0] = 60.0
    assert await book.get(token, ADMIN) is None
    assert await book.get(None, ADMIN) is None and await book.get("nonsense", ADMIN) is None


async def test_forms_must_be_small_and_url_encoded(gw: TestClient[Any, Any]) -> None:
    csrf = await sign_in(gw)
    async with gw.post("/dashboard/keys", json={"name": "x", "csrf": csrf}) as resp:
        assert resp.status == 415
    big = {"name": "x" * 70_000, "csrf": csrf}
    async with gw.post("/dashboard/keys", data=big) as resp:
        assert resp.status == 413


async def test_static_files_have_their_types(gw: TestClient[Any, Any]) -> None:
    for name, kind in (
        ("dashboard.js", "text/javascript"),
        ("uPlot.iife.min.js", "text/javascript"),
        ("uPlot.min.css", "text/css"),
        ("dashboard.css", "text/css"),
        ("uPlot.LICENSE", "text/plain"),
    ):
        async with gw.get(f"/dashboard/static/{name}") as resp:
            assert resp.status == 200, name
            assert resp.content_type == kind
            assert resp.headers["X-Content-Type-Options"] == "nosniff"
    for name in ("..%2Fpages.py", "nope.js", "__init__.py", ".hidden.js"):
        async with gw.get(f"/dashboard/static/{name}") as resp:
            assert resp.status == 404, name


async def test_key_lifecycle_through_forms(gw: TestClient[Any, Any]) -> None:
    csrf = await sign_in(gw)
    form = {"csrf": csrf, "name": "alice", "models": "demo", "rpm": "30", "budget_usd": "5"}
    form["budget_period"] = "month"
    async with gw.post("/dashboard/keys", data=form) as resp:
        page = await resp.text()
    secret = re.search(r'<code id="secret">([^<]+)</code>', page)
    assert secret is not None
    [key] = await gw.app[STORE].list_keys()  # type: ignore[index]
    assert (key.name, key.models, key.rpm, key.budget_usd) == ("alice", ("demo",), 30, 5.0)
    async with openai_client(gw, secret.group(1)) as oai:
        await oai.chat.completions.create(
            model="demo", messages=[{"role": "user", "content": "hello"}]
        )
    async with gw.get("/dashboard") as resp:
        page = await resp.text()
        assert re.search(r'id="today-requests">1<', page)
        assert "alice" in page
    async with gw.get("/dashboard/keys") as resp:
        page = await resp.text()
        assert "alice" in page and "of $5.00" in page and "30 req/min" in page
    edit = {"csrf": csrf, "name": "alice2", "models": "", "rpm": "", "budget_usd": "7"}
    edit["budget_period"] = "month"
    async with gw.post(f"/dashboard/keys/{key.id}", data=edit, allow_redirects=False) as resp:
        assert resp.status == 303
    key = await gw.app[STORE].require_key(key.id)  # type: ignore[index]
    assert (key.name, key.models, key.rpm, key.budget_usd) == ("alice2", (), None, 7.0)
    async with gw.get(f"/dashboard/keys/{key.id}") as resp:
        page = await resp.text()
        assert 'id="key-requests">1<' in page and "Latency p95" in page
    bad = {"csrf": csrf, "name": "alice2", "rpm": "-3"}
    async with gw.post(f"/dashboard/keys/{key.id}", data=bad) as resp:
        assert resp.status == 200 and 'class="error"' in await resp.text()
    async with gw.get(f"/dashboard/keys/{key.id}/revoke") as resp:
        assert "Revoke for good" in await resp.text()
    async with gw.post(f"/dashboard/keys/{key.id}/revoke", data={"csrf": csrf}) as resp:
        assert resp.status == 200 and "revoked" in await resp.text()
    assert (await gw.app[STORE].require_key(key.id)).revoked_at is not None  # type: ignore[index]


async def test_create_errors_show_on_the_form(gw: TestClient[Any, Any]) -> None:
    csrf = await sign_in(gw)
    for form in (
        {"name": ""},
        {"name": "x", "group": "nope"},
        {"name": "x", "expires_at": "1d ago"},
    ):
        async with gw.post("/dashboard/keys", data={"csrf": csrf, **form}) as resp:
            assert resp.status == 200
            assert 'class="error"' in await resp.text()
    assert await gw.app[STORE].list_keys() == []  # type: ignore[index]


async def test_upstreams_page_shows_every_account(gw: TestClient[Any, Any]) -> None:
    await sign_in(gw)
    async with gw.get("/dashboard/upstreams") as resp:
        page = await resp.text()
    assert "demo" in page and "closed" in page


async def test_keys_page_escapes_names(gw: TestClient[Any, Any]) -> None:
    await create_key(gw, name="<script>alert(1)</script>")
    await sign_in(gw)
    async with gw.get("/dashboard/keys") as resp:
        page = await resp.text()
    assert "<script>alert(1)" not in page and "&lt;script&gt;" in page


async def test_sessions_are_bounded() -> None:
    book = SessionBook(clock=lambda: 0.0)
    first, _ = await book.open(ADMIN, ttl=60)
    for _ in range(1000):
        await book.open(ADMIN, ttl=60)
    assert len(book) == 1000
    assert await book.get(first, ADMIN) is None  # the oldest made room


async def test_head_and_unknown_periods(gw: TestClient[Any, Any]) -> None:
    await sign_in(gw)
    async with gw.head("/dashboard") as resp:
        assert resp.status == 200
    for query in ("?period=9999d", "?period=%00", "?period="):
        async with gw.get("/dashboard" + query) as resp:
            assert resp.status == 200
            assert "Last 7d" in await resp.text()


async def test_a_form_without_a_length_is_refused(gw: TestClient[Any, Any]) -> None:
    csrf = await sign_in(gw)

    async def chunks() -> Any:
        yield f"csrf={csrf}&name=x".encode()

    async with gw.post("/dashboard/keys", data=chunks(), headers=FORM) as resp:
        assert resp.status == 413
    assert await gw.app[STORE].list_keys() == []  # type: ignore[index]


async def test_unknown_key_pages_are_404(gw: TestClient[Any, Any]) -> None:
    csrf = await sign_in(gw)
    async with gw.get("/dashboard/keys/key_nope") as resp:
        assert resp.status == 404
        assert resp.content_type == "text/html"
        assert "No key with id &#39;key_nope&#39;." in await resp.text()
    async with gw.post("/dashboard/keys/key_nope/revoke", data={"csrf": csrf}) as resp:
        assert resp.status == 404


@pytest.mark.parametrize(
    "body",
    [
        b"name=\xff\xfe&csrf=",
        b"name=%ff&csrf=",
        b"name=a&name=b&csrf=",
        b"\x00\x00",
        b"=&=&&csrf",
        b"a=&" * 100 + b"csrf=",
    ],
)
@pytest.mark.usefixtures("short_brake")
async def test_hostile_form_bodies(gw: TestClient[Any, Any], body: bytes) -> None:
    csrf = await sign_in(gw)
    data = body + csrf.encode() if body.endswith(b"csrf=") else body
    for path in ("/dashboard/keys", "/dashboard/signin"):
        async with gw.post(path, data=data, headers=FORM) as resp:
            assert resp.status in (200, 400, 401, 403), (path, resp.status)


@pytest.mark.usefixtures("short_brake")
async def test_guesses_sent_at_once_are_counted_one_by_one(gw: TestClient[Any, Any]) -> None:
    async def guess(n: int) -> int:
        async with gw.post("/dashboard/signin", data={"admin_key": f"guess-{n}"}) as resp:
            return resp.status

    statuses = await asyncio.gather(*(guess(n) for n in range(20)))
    assert sorted(statuses) == [401] * 5 + [429] * 15


async def test_upstreams_page_shows_an_open_breaker_and_its_failures(
    aiohttp_server: AiohttpServer, aiohttp_client: AiohttpClient, make_settings: MakeSettings
) -> None:
    fake = FakeOpenAI()
    await fake.start(aiohttp_server)
    settings = make_settings(
        admin_key=ADMIN,
        routing=RoutingSettings(backoff_initial=0.001, backoff_max=0.002),
        providers=(OpenAIConfig(name="up", base_url=fake.base_url, api_keys=UP_KEYS),),
        models=(ModelConfig(name="m", targets=(Target(provider="up", model="gpt-x"),)),),
    )
    gw = await start_gateway(aiohttp_client, settings)
    fake.always(status=503)
    async with openai_client(gw, await create_key(gw)) as oai:
        for _ in range(3):
            with pytest.raises(openai.InternalServerError):
                await oai.chat.completions.create(
                    model="m", messages=[{"role": "user", "content": "x"}]
                )
    await sign_in(gw)
    async with gw.get("/dashboard/upstreams") as resp:
        page = await resp.text()
    rows = re.findall(r"<tr>(.*?)</tr>", page, re.S)
    up = [r for r in rows if "up <small" in r]
    assert len(up) == 2  # one row per account: "key 1 of 2", "key 2 of 2"
    assert all('class="status open"' in r for r in up), up
    assert all(re.search(r"in \d+ s", r) for r in up)  # when each is tried again
    assert all(re.search(r"3 in the last 30 s; latest \d+ s ago", r) for r in up)
    assert all(re.search(r">3; latest 20\d\d-", r) for r in up)  # failed requests, 24 h
    assert all(key not in page for key in UP_KEYS)  # never an upstream key


async def test_an_expired_key_can_be_edited_without_touching_its_expiry(
    gw: TestClient[Any, Any],
) -> None:
    store = gw.app[STORE]  # type: ignore[index]
    record, _ = await store.create_key(name="old", expires_at=time.time() - 60)
    csrf = await sign_in(gw)
    async with gw.get(f"/dashboard/keys/{record.id}") as resp:
        page = await resp.text()
    assert "expired" in page
    shown = re.search(r'name="expires_at" value="([^"]*)"', page)
    assert shown is not None and shown.group(1)
    form = {"csrf": csrf, "name": "renamed", "expires_at": shown.group(1)}
    async with gw.post(f"/dashboard/keys/{record.id}", data=form, allow_redirects=False) as r:
        assert r.status == 303
    key = await store.require_key(record.id)
    assert key.name == "renamed" and key.expires_at == record.expires_at
    form["expires_at"] = ""  # cleared: never expires
    async with gw.post(f"/dashboard/keys/{record.id}", data=form, allow_redirects=False) as r:
        assert r.status == 303
    assert (await store.require_key(record.id)).expires_at is None


async def test_the_lock_on_guessing_outlasts_no_window() -> None:
    """The failures were timed with the wall clock: one stepped back (NTP, a VM resumed) left
    them in the future, and the wait was their age plus a minute. They are timed with the
    monotonic clock, and a wait is never more than the window."""
    assert SessionBook().failure_clock is time.monotonic
    now = [10_000.0]
    book = SessionBook(failure_clock=lambda: now[0])
    for _ in range(5):
        assert (await book.attempt())[0] == 0
    now[0] -= 1800
    wait, _ = await book.attempt()
    assert 0 < wait <= 60


async def test_a_clear_keeps_the_sessions_of_the_key_it_is_given() -> None:
    book = SessionBook(clock=lambda: 0.0)
    old, _ = await book.open("old", ttl=60)
    new, _ = await book.open("new", ttl=60)
    assert await book.clear("new") == 1
    assert await book.get(new, "new") is not None
    assert await book.get(old, "old") is None
    assert await book.clear() == 1 and len(book) == 0
