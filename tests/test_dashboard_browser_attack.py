"""The dashboard in a real browser (headless Chromium, as tests/test_dashboard_browser.py drives
it) against hostile input: strings a client, the admin API or a wrong form puts on its pages,
and another site's page in the same browser forging forms, framing the dashboard and posting
with `fetch`. Nothing may run, and nothing may change.

Every payload, if it ever ran, would set `window.__pwned` or the document's title; a page with
a Content-Security-Policy violation (an injected script that was only stopped by the policy)
fails too, through the console errors the `Browser` records.
"""

from __future__ import annotations

import urllib.parse
from typing import Any

import pytest
from aiohttp import web
from aiohttp.pytest_plugin import AiohttpClient, AiohttpServer
from aiohttp.test_utils import TestClient

from gateway.state import KEYS_KEY
from tests.conftest import MakeSettings, app_of, create_key, start_gateway
from tests.test_dashboard_browser import ADMIN, Browser, chromium, open_page, pytestmark

__all__ = ["chromium", "pytestmark"]  # the fixture and the skip without Chromium, as there

HEADERS = {"Authorization": f"Bearer {ADMIN}"}
RUN = "window.__pwned=1;document.title='pwned'"
PAYLOADS = (
    f'"><script>{RUN}</script><img src=x onerror="{RUN}">',
    f"'onmouseover='{RUN}' x='</textarea><svg onload={RUN}>",
    f"javascript:{RUN}//\u202e<a href=javascript:{RUN}>x</a>",
)


@pytest.fixture
async def gw(aiohttp_client: AiohttpClient, make_settings: MakeSettings) -> TestClient[Any, Any]:
    return await start_gateway(aiohttp_client, make_settings(admin_key=ADMIN))


async def sign_in(b: Browser) -> None:
    await b.goto("/dashboard/signin")
    await b.page.fill("#admin_key", ADMIN)
    await b.page.click("main button[type=submit]")
    await b.page.wait_for_url(b.base + "/dashboard")


async def nothing_ran(b: Browser) -> None:
    assert await b.page.evaluate("window.__pwned") is None
    assert await b.page.title() != "pwned"


async def test_hostile_strings_are_only_text(chromium: Any, gw: TestClient[Any, Any]) -> None:
    """Key names, notes and metadata from the admin API, model ids a client sends (the key's
    table and its chart's legend), and a wrong form value echoed in the form's error."""
    ids = []
    for i, payload in enumerate(PAYLOADS):
        body = {"name": payload[:200], "notes": payload, "metadata": {"x": payload}}
        # Straight into the store: the admin API now refuses the third (its bidirectional
        # override), and a key made before it did must still show as text.
        secret = await create_key(gw, **body)
        record = app_of(gw)[KEYS_KEY].lookup(secret)
        assert record is not None and record.name == payload[:200]
        ids.append(record.id)
        auth = {"Authorization": f"Bearer {secret}"}
        for model in (f"demo/{payload}", f"demo/{i}"):
            chat = {"model": model, "messages": [{"role": "user", "content": payload}]}
            async with gw.post("/v1/chat/completions", json=chat, headers=auth) as resp:
                assert resp.status == 200, await resp.text()
    b = await open_page(chromium, gw, 1280, 900)
    await sign_in(b)
    for path in ("/dashboard", "/dashboard?period=24h", "/dashboard/keys", "/dashboard/upstreams"):
        await b.goto(path)
        await nothing_ran(b)
    for key_id in ids:
        for path in (f"/dashboard/keys/{key_id}?period=24h", f"/dashboard/keys/{key_id}/revoke"):
            await b.goto(path)
            await b.page.hover("h1")
            for cell in await b.page.locator("td, .u-legend th").all():
                await cell.hover()
            await nothing_ran(b)
        # The chart's legend names the hostile model, as text.
        legend = await b.page.goto(b.base + f"/dashboard/keys/{key_id}?period=24h")
        assert legend is not None
        assert await b.page.locator(".u-legend").count() == 1
        labels = await b.page.locator(".u-legend .u-label").all_inner_texts()
        assert any(label.startswith("demo/") and len(label) > 10 for label in labels), labels
    # A wrong value comes back in the form and in its error message, still as text.
    await b.goto("/dashboard/keys")
    for payload in PAYLOADS:
        await b.page.fill("input[name=name]", "x")
        await b.page.fill("input[name=expires_at]", payload)
        await b.page.click("text=Create key")
        assert "expires_at" in await b.text("[role=alert]")
        assert await b.page.input_value("input[name=expires_at]") == payload
        await nothing_ran(b)
    assert b.errors == []
    await b.shot("hostile-strings")
    # A page that says what was wrong with the URL (an unknown key id, echoed).
    for payload in PAYLOADS:
        response = await b.page.goto(
            b.base + "/dashboard/keys/" + urllib.parse.quote(payload, safe="")
        )
        assert response is not None and response.status == 404
        assert "No key with id" in await b.text("[role=alert]")
        await nothing_ran(b)
    # Chromium reports each 404 on the console; nothing else (no policy violation) may be there.
    assert all("404" in error for error in b.errors), b.errors


HOSTILE_PAGE = """<!doctype html><html><body>
<form id="forged" method="post" action="{gw}/dashboard/keys/{key}/revoke">
  <input name="csrf" value="guessed">
</form>
<form id="plain" method="post" enctype="text/plain" action="{gw}/dashboard/keys/{key}/revoke">
  <input name="csrf" value="guessed">
</form>
<iframe id="framed" src="{gw}/dashboard/keys"></iframe>
</body></html>"""


async def test_another_sites_page_changes_nothing(
    chromium: Any, gw: TestClient[Any, Any], aiohttp_server: AiohttpServer
) -> None:
    """A page on another port of the same host (the same *site*: `SameSite=Strict` sends the
    cookie) forges the revoke form, with and without a token, as `text/plain`, posts with
    `fetch` (no-cors, credentials included) and frames the dashboard."""
    async with gw.post("/admin/keys", json={"name": "target"}, headers=HEADERS) as resp:
        key_id = (await resp.json())["id"]
    base = str(gw.make_url("")).rstrip("/")

    async def hostile(request: web.Request) -> web.Response:
        return web.Response(text=HOSTILE_PAGE.format(gw=base, key=key_id), content_type="text/html")

    app = web.Application()
    app.router.add_get("/", hostile)
    evil = await aiohttp_server(app)
    b = await open_page(chromium, gw, 1280, 900)
    await sign_in(b)
    evil_url = str(evil.make_url("/"))
    for form in ("#forged", "#plain"):
        await b.page.goto(evil_url)
        async with b.page.expect_navigation():
            await b.page.evaluate(f"document.querySelector('{form}').submit()")
        assert "/revoke" in b.page.url
        assert "did not come from the dashboard" in await b.page.content() or form == "#plain"
    # The framed dashboard is refused (frame-ancestors 'none', X-Frame-Options: DENY).
    await b.page.goto(evil_url)
    framed = b.page.frame_locator("#framed")
    assert await framed.locator("#keys").count() == 0
    # fetch() from the other page: an opaque answer, and nothing done.
    await b.page.evaluate(
        """async ([gw, key]) => {
            const form = 'application/x-www-form-urlencoded';
            for (const [path, type] of [[`/dashboard/keys/${key}/revoke`, form],
                                        ['/dashboard/signout', form],
                                        [`/dashboard/keys/${key}/revoke`, 'text/plain']]) {
                await fetch(gw + path, {method: 'POST', mode: 'no-cors', credentials: 'include',
                                        headers: {'Content-Type': type}, body: 'csrf=guessed'});
            }
        }""",
        [base, key_id],
    )
    async with gw.get(f"/admin/keys/{key_id}", headers=HEADERS) as resp:
        assert (await resp.json())["revoked_at"] is None
    # Still signed in, the key still active.
    b.errors.clear()
    await b.goto(f"/dashboard/keys/{key_id}")
    assert "active" in await b.text("h1")
    assert b.errors == []
