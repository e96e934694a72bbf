"""The dashboard in a real browser: headless Chromium (Debian's `chromium` package, never a
downloaded one) driven by Playwright through sign-in, a key's whole life and sign-out.

Any JavaScript console error or page error (a Content-Security-Policy violation included)
fails the test. Screenshots of every page, at desktop and phone width, go to `$TEST_ARTIFACTS`
(default `tests/artifacts/`). Without Chromium or Playwright these tests skip, saying why.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import openai
import pytest
from aiohttp.pytest_plugin import AiohttpClient
from aiohttp.test_utils import TestClient

from tests.conftest import MakeSettings, openai_client, start_gateway

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ADMIN = "admin-key-browser-0123456789"
ARTIFACTS = Path(os.environ.get("TEST_ARTIFACTS") or Path(__file__).parent / "artifacts")

playwright_api = pytest.importorskip(
    "playwright.async_api", reason="Playwright for Python is not installed (dev dependency)"
)
pytestmark = pytest.mark.skipif(
    shutil.which(CHROMIUM) is None,
    reason=f"no Chromium at {CHROMIUM} (apt-get install chromium; .ci/run does)",
)


class Browser:
    """One browser page that records every console error and page error."""

    def __init__(self, page: Any, base: str) -> None:
        self.page = page
        self.base = base
        self.errors: list[str] = []
        page.on("console", self._console)
        page.on("pageerror", lambda exc: self.errors.append(f"page error: {exc}"))

    def _console(self, message: Any) -> None:
        if message.type in ("error", "assert"):
            self.errors.append(f"console {message.type}: {message.text}")

    async def goto(self, path: str) -> None:
        response = await self.page.goto(self.base + path)
        assert response is not None and response.ok, path

    async def shot(self, name: str) -> None:
        # Playwright makes the directory if it is missing.
        await self.page.screenshot(path=str(ARTIFACTS / f"dashboard-{name}.png"), full_page=True)

    async def text(self, selector: str) -> str:
        return str(await self.page.locator(selector).inner_text())


@pytest.fixture
async def gw(aiohttp_client: AiohttpClient, make_settings: MakeSettings) -> TestClient[Any, Any]:
    return await start_gateway(aiohttp_client, make_settings(admin_key=ADMIN))


@pytest.fixture
async def chromium() -> AsyncIterator[Any]:
    async with playwright_api.async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            yield browser
        finally:
            await browser.close()


async def open_page(chromium: Any, gw: TestClient[Any, Any], width: int, height: int) -> Browser:
    context = await chromium.new_context(viewport={"width": width, "height": height})
    return Browser(await context.new_page(), str(gw.make_url("")).rstrip("/"))


async def chart_total(b: Browser, block: str, series: int = 0) -> float:
    """The sum of one series of a chart's data, and that uPlot drew it (a canvas)."""
    assert await b.page.locator(f'[data-chart="{block}"] canvas').count() >= 1
    total: float = await b.page.evaluate(
        "([id, i]) => JSON.parse(document.getElementById(id).textContent)"
        ".series[i].values.reduce((a, v) => a + v, 0)",
        [block, series],
    )
    return total


async def test_sign_in_key_life_and_sign_out(chromium: Any, gw: TestClient[Any, Any]) -> None:
    b = await open_page(chromium, gw, 1280, 900)
    page = b.page

    # Signed out, the dashboard sends the browser to the sign-in page.
    await b.goto("/dashboard")
    assert page.url.endswith("/dashboard/signin")
    await page.fill("#admin_key", "not-the-key")
    await page.click("button[type=submit]")
    assert "not the admin key" in await b.text("[role=alert]")
    # The page came with status 401, which Chromium reports on the console: the one expected.
    assert len(b.errors) == 1 and "401" in b.errors[0], b.errors
    b.errors.clear()
    await b.shot("signin")
    await page.fill("#admin_key", ADMIN)
    await page.click("main button[type=submit]")
    await page.wait_for_url(b.base + "/dashboard")
    await b.shot("overview-empty")

    # Create a key: its secret is shown once, with a copy button.
    await page.click("nav >> text=Keys")
    await page.fill("input[name=name]", "browser-key")
    await page.fill("input[name=models]", "demo")
    await page.fill("input[name=budget_usd]", "5")
    await page.select_option("select[name=budget_period]", "month")
    await page.click("text=Create key")
    secret = (await b.text("#secret")).strip()
    assert secret.startswith("sk-kiosk-")
    await page.click("button[data-copy]")
    await page.locator(".copied").wait_for(state="visible")
    await b.shot("key-created")

    # Use it with the real OpenAI client, against the demo model.
    async with openai_client(gw, secret) as oai:
        answer = await oai.chat.completions.create(
            model="demo", messages=[{"role": "user", "content": "hello from the browser test"}]
        )
    assert answer.usage is not None
    tokens = answer.usage.total_tokens

    # The request shows in the overview's figures, charts and top lists.
    await page.click("nav >> text=Overview")
    assert await b.text("#today-requests") == "1"
    assert await chart_total(b, "chart-requests") == 1
    assert await chart_total(b, "chart-tokens") == tokens
    assert "browser-key" in await b.text("#top-keys")
    assert "demo" in await b.text("#top-models")
    await b.shot("overview")
    await page.click("text=24h")
    assert await chart_total(b, "chart-requests") == 1

    # The keys list, then the key's own page: usage by model, latency.
    await page.click("nav >> text=Keys")
    row = page.locator("tr", has_text="browser-key")
    assert "active" in await row.inner_text()
    assert "of $5.00" in await row.inner_text()
    await b.shot("keys")
    await page.click("text=browser-key")
    assert await b.text("#key-requests") == "1"
    assert await chart_total(b, "chart-key") == tokens
    assert "demo" in await b.text("#per-model")
    await b.shot("key-detail")

    # Edit its limits and models.
    await page.fill("input[name=rpm]", "42")
    await page.fill("input[name=models]", "demo, openai/*")
    await page.click("text=Save")
    assert "Saved." in await b.text("[role=status]")
    assert await page.input_value("input[name=rpm]") == "42"
    assert await page.input_value("input[name=models]") == "demo, openai/*"
    await b.shot("key-edited")

    # Revoke it, after a confirmation; the key stops working at once.
    await page.click("text=Revoke this key")
    await b.shot("key-revoke-confirm")
    await page.click("text=Revoke for good")
    assert "revoked" in await b.text("h1")
    async with openai_client(gw, secret) as oai:
        with pytest.raises(openai.AuthenticationError):
            await oai.chat.completions.create(
                model="demo", messages=[{"role": "user", "content": "again"}]
            )
    await b.shot("key-revoked")

    await page.click("nav >> text=Upstreams")
    assert "closed" in await b.text("#upstreams")
    await b.shot("upstreams")

    # Sign out: back at the sign-in page, and the dashboard is closed again.
    await page.click("text=Sign out")
    await page.wait_for_url(b.base + "/dashboard/signin")
    await b.goto("/dashboard/keys")
    assert page.url.endswith("/dashboard/signin")
    assert b.errors == []


async def test_phone_sized_screen(chromium: Any, gw: TestClient[Any, Any]) -> None:
    """At 390 px every page fits the width (no sideways scrolling) and still draws its charts."""
    b = await open_page(chromium, gw, 390, 844)
    await b.goto("/dashboard/signin")
    await b.shot("phone-signin")
    await b.page.fill("#admin_key", ADMIN)
    await b.page.click("main button[type=submit]")
    await b.page.wait_for_url(b.base + "/dashboard")
    await b.page.click("nav >> text=Keys")
    await b.page.fill("input[name=name]", "phone-key")
    await b.page.click("text=Create key")
    await b.page.click("text=Go to the key")
    pages = {
        "overview": "/dashboard",
        "keys": "/dashboard/keys",
        "upstreams": "/dashboard/upstreams",
    }
    pages["key-detail"] = b.page.url.removeprefix(b.base)
    for name, path in pages.items():
        await b.goto(path)
        width = await b.page.evaluate("document.documentElement.scrollWidth")
        assert width <= 390, f"{name} is {width} px wide"
        await b.shot(f"phone-{name}")
    assert b.errors == []
