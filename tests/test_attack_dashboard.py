"""The dashboard attacked from outside, a third time: what a client, an upstream, the admin API
or another page in the same browser can put in front of the operator, and what breaks.

The tests above the line "What held" each showed a defect before its fix (the commit that
fixed it says which); those below it are attacks that found nothing, kept so they stay that
way. More of those are in tests/test_dashboard.py, tests/test_attack_admin.py and
tests/test_dashboard_browser_attack.py (the same attacks in Chromium).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import msgspec
import pytest
from aiohttp.pytest_plugin import AiohttpClient
from aiohttp.test_utils import TestClient

from gateway.app import create_app
from gateway.config import load_settings
from gateway.reload import reload_config
from gateway.settings import ModelConfig, Target
from gateway.state import KEYS_KEY, STORE_KEY
from tests.conftest import MakeSettings, app_of, start_gateway
from tests.test_dashboard import ADMIN, sign_in

HEADERS = {"Authorization": f"Bearer {ADMIN}"}
# A model on the demo provider that costs something, so a key spends.
PRICED = ModelConfig(
    name="priced",
    targets=(Target(provider="demo", model="demo"),),
    input_price_per_mtok=1000.0,
    output_price_per_mtok=1000.0,
)


@pytest.fixture
async def gw(aiohttp_client: AiohttpClient, make_settings: MakeSettings) -> TestClient[Any, Any]:
    return await start_gateway(aiohttp_client, make_settings(admin_key=ADMIN, models=(PRICED,)))


async def create(gw: TestClient[Any, Any], **body: Any) -> dict[str, Any]:
    async with gw.post("/admin/keys", json={"name": "k", **body}, headers=HEADERS) as resp:
        assert resp.status == 201, await resp.text()
        created: dict[str, Any] = await resp.json()
    return created


async def chat(gw: TestClient[Any, Any], secret: str, model: str = "priced") -> int:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
    auth = {"Authorization": f"Bearer {secret}"}
    async with gw.post("/v1/chat/completions", json=body, headers=auth) as resp:
        await resp.read()
        return resp.status


async def test_a_tiny_budget_beside_real_spend_is_a_full_bar_not_a_500(
    gw: TestClient[Any, Any],
) -> None:
    """A budget the admin API takes (any positive number) that the key's spend is more than
    1e306 times over: the bar's percentage was round(inf), an OverflowError, a 500 on the
    Keys page (every key's row gone with it) and on the key's own page."""
    created = await create(gw, budget_usd=100.0, budget_period="day")
    assert await chat(gw, created["key"]) == 200
    patch = {"budget_usd": 1e-320}
    async with gw.patch(f"/admin/keys/{created['id']}", json=patch, headers=HEADERS) as resp:
        assert resp.status == 200, await resp.text()
    await sign_in(gw)
    for path in ("/dashboard/keys", f"/dashboard/keys/{created['id']}"):
        async with gw.get(path) as resp:
            assert resp.status == 200, path
            assert '<progress max="100" value="100">' in await resp.text()


@pytest.mark.parametrize("budget", ["inf", "Infinity", "1e999", "-inf", "nan"])
async def test_the_key_form_refuses_a_budget_the_admin_api_refuses(
    gw: TestClient[Any, Any], budget: str
) -> None:
    """The form's text went through msgspec's lax conversion, which reads "inf" and "1e999" as
    an infinite float: a key with a budget the JSON API refuses ("Number out of range"), and
    which the API then showed as `null`, as if it had none."""
    async with gw.post(
        "/admin/keys",
        data=f'{{"name": "k", "budget_usd": {budget}}}'.encode(),
        headers={**HEADERS, "Content-Type": "application/json"},
    ) as resp:
        assert resp.status == 400
    csrf = await sign_in(gw)
    form = {"name": "k", "budget_usd": budget, "csrf": csrf}
    async with gw.post("/dashboard/keys", data=form) as resp:
        assert resp.status == 200  # the form again, saying what is wrong
        text = await resp.text()
    assert 'role="alert"' in text and "budget_usd" in text
    created = await create(gw)
    form = {"name": "k", "budget_usd": budget, "csrf": csrf}
    async with gw.post(f"/dashboard/keys/{created['id']}", data=form) as resp:
        assert resp.status == 200
        assert "budget_usd" in await resp.text()
    async with gw.get("/admin/keys", headers=HEADERS) as resp:
        assert [k["budget_usd"] for k in (await resp.json())["data"]] == [None]


def chart_data(page: str, block: str) -> dict[str, Any]:
    found = re.search(rf'<script type="application/json" id="{block}">(.*?)</script>', page, re.S)
    assert found is not None
    data: dict[str, Any] = msgspec.json.decode(found.group(1))
    return data


async def test_a_client_naming_many_models_cannot_swell_its_keys_page(
    aiohttp_client: AiohttpClient, make_settings: MakeSettings, database: str
) -> None:
    """Every model id a key's requests named was a series of the key's chart and a row of its
    table: a client sending `demo/<anything>` 20,000 ways made its page 18 MB, built and
    rendered on the event loop for over a second (every request through the gateway waiting),
    and a chart of 20,000 series for the operator's browser. Now the top models by tokens
    are drawn and the rest summed as one series; the table shows the models with the most
    requests and says how many more there are."""
    gw = await start_gateway(aiohttp_client, make_settings(admin_key=ADMIN, database=database))
    created = await create(gw)
    models = [f"demo/m{i:03}" for i in range(50 + 10)]
    top = ["demo/big", "demo/bigger"]
    for model in [*models, *top, *top, "demo/bigger"]:
        assert await chat(gw, created["key"], model) == 200
    await sign_in(gw)
    async with gw.get(f"/dashboard/keys/{created['id']}?period=24h") as resp:
        assert resp.status == 200
        page = await resp.text()
    data = chart_data(page, "chart-key")
    labels = [s["label"] for s in data["series"]]
    assert len(labels) == 8
    assert labels[:2] == ["demo/bigger", "demo/big"] and labels[-1] == "(other models)"
    per_request = 11  # the demo provider's tokens for "hi"
    total = sum(sum(s["values"]) for s in data["series"])
    assert total == per_request * (len(models) + 5)
    rows = re.findall(r"<tr><td>(demo/[^<]*)</td>", page)
    assert len(rows) == 50
    assert rows[:2] == ["demo/big", "demo/bigger"]  # in name order, the busiest kept
    assert "12 more models" in page


async def test_the_keys_page_is_paged(gw: TestClient[Any, Any]) -> None:
    """Every key was a row of one Keys page: with 5,000 keys it was 3 MB, took 1.4 s (a query
    and a spending look-up per key) and held the event loop for half a second at once while
    Jinja rendered it. Now 50 keys a page, newest first; a page number that is not one is a
    400 page, one past the end the last page."""
    store = app_of(gw)[STORE_KEY]
    for i in range(120):
        app_of(gw)[KEYS_KEY].put((await store.create_key(name=f"key-{i:03}"))[0])
    await sign_in(gw)

    async def names(query: str) -> list[str]:
        async with gw.get(f"/dashboard/keys{query}") as resp:
            assert resp.status == 200, query
            return re.findall(r'<a href="/dashboard/keys/key_\w+">(key-\d+)</a>', await resp.text())

    first = await names("")
    assert first == [f"key-{i:03}" for i in range(119, 69, -1)]
    assert await names("?page=1") == first
    assert await names("?page=3") == [f"key-{i:03}" for i in range(19, -1, -1)]
    assert await names("?page=4") == await names("?page=999999999") == await names("?page=3")
    async with gw.get("/dashboard/keys?page=2") as resp:
        page = await resp.text()
    assert "Page 2 of 3" in page
    assert 'href="/dashboard/keys?page=1"' in page and 'href="/dashboard/keys?page=3"' in page
    for bad in ("0", "-1", "abc", "1e3", "2.0", "\u0663", "9" * 40, ""):
        async with gw.get("/dashboard/keys", params={"page": bad}) as resp:
            assert resp.status == 400, bad
            assert resp.content_type == "text/html"
            assert "page" in await resp.text()


# What held


async def test_a_session_id_planted_before_sign_in_is_not_the_one_after(
    gw: TestClient[Any, Any],
) -> None:
    """Session fixation: a cookie a hostile page or person set before sign-in is replaced by a
    new random token, and the planted value opens nothing afterwards."""
    planted = "planted-by-someone-else"
    gw.session.cookie_jar.update_cookies({"kiosk_session": planted}, gw.make_url("/dashboard"))
    await sign_in(gw)
    token = gw.session.cookie_jar.filter_cookies(gw.make_url("/dashboard"))["kiosk_session"]
    assert token.value != planted and len(token.value) >= 43
    gw.session.cookie_jar.clear()
    cookie = {"Cookie": f"kiosk_session={planted}"}
    async with gw.get("/dashboard", headers=cookie, allow_redirects=False) as resp:
        assert resp.status == 303 and resp.headers["Location"] == "/dashboard/signin"


async def test_another_sessions_csrf_token_is_refused(
    gw: TestClient[Any, Any], aiohttp_client: AiohttpClient
) -> None:
    other = await aiohttp_client(gw.server)  # another browser, signed in on its own
    theirs = await sign_in(other)
    mine = await sign_in(gw)
    assert theirs != mine
    async with gw.post("/dashboard/keys", data={"name": "x", "csrf": theirs}) as resp:
        assert resp.status == 403
    async with gw.post("/dashboard/signout", data={"csrf": theirs}) as resp:
        assert resp.status == 403
    async with gw.get("/admin/keys", headers=HEADERS) as resp:
        assert (await resp.json())["data"] == []


@pytest.mark.parametrize("target", ["//evil.example", "\\\\evil.example", "https://evil.example"])
async def test_sign_in_goes_to_the_dashboard_whatever_the_query_says(
    gw: TestClient[Any, Any], target: str
) -> None:
    for name in ("next", "return_to", "redirect", "url"):
        async with gw.post(
            "/dashboard/signin",
            params={name: target},
            data={"admin_key": ADMIN, name: target},
            allow_redirects=False,
        ) as resp:
            assert resp.status == 303
            assert resp.headers["Location"] == "/dashboard"


async def test_no_state_changes_through_get(gw: TestClient[Any, Any]) -> None:
    created = await create(gw)
    csrf = await sign_in(gw)
    for path in (
        f"/dashboard/keys/{created['id']}/revoke?csrf={csrf}",
        f"/dashboard/signout?csrf={csrf}",
        f"/dashboard/keys?name=x&csrf={csrf}",
    ):
        async with gw.get(path, allow_redirects=False) as resp:
            assert resp.status in (200, 405), path
    async with gw.get("/admin/keys", headers=HEADERS) as resp:
        [key] = (await resp.json())["data"]
    assert key["revoked_at"] is None
    async with gw.get("/dashboard", allow_redirects=False) as resp:
        assert resp.status == 200  # still signed in


async def test_sessions_opened_with_an_admin_key_stay_ended_when_it_comes_back(
    aiohttp_client: AiohttpClient, tmp_path: Path
) -> None:
    """docs/dashboard.md: a session ends when the admin key changes in a reload. It was only
    checked when the session was next used, so an operator who took the key out (the
    dashboard off) or changed it, and later put it back, brought every session of before
    back to life, a stolen cookie included."""
    config = tmp_path / "gateway.toml"

    def write(server: str) -> None:
        config.write_text(
            f'[server]\ndatabase = "{tmp_path / "keys.db"}"\n{server}\n', encoding="utf-8"
        )

    write(f'admin_key = "{ADMIN}"')
    load = lambda: load_settings(config, {})  # noqa: E731 - as `serve` passes it
    gw = await aiohttp_client(create_app(load(), reload=load))
    await sign_in(gw)
    for between in ("", 'admin_key = "another-admin-key-0123456789"', "dashboard = false"):
        write(between)
        assert await reload_config(app_of(gw))
        write(f'admin_key = "{ADMIN}"')
        assert await reload_config(app_of(gw))
        async with gw.get("/dashboard", allow_redirects=False) as resp:
            assert resp.status == 303, between or "no admin key"
            assert resp.headers["Location"] == "/dashboard/signin"
        await sign_in(gw)
    # A reload that leaves the admin key as it was leaves the session alone.
    assert await reload_config(app_of(gw))
    async with gw.get("/dashboard", allow_redirects=False) as resp:
        assert resp.status == 200
