"""The operator's surfaces attacked from outside: the admin API with absurd bodies and ids, and
the dashboard with hostile key names and model ids.

What a key's fields take is bounded (a model allow-list of 100,000 entries would be walked on
each of the key's requests); revoking twice changes nothing; ids that look like SQL or paths
are only unknown ids; keys created at once are all distinct; and whatever a client or an
operator puts in a key's name, notes or a model id, the dashboard shows it as text.
(Metrics labels, log lines, CORS and the dashboard's sign-in, CSRF and cookie are attacked in
tests/test_metrics.py, tests/test_logs.py, tests/test_cors.py and tests/test_dashboard.py.)
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

import pytest
from aiohttp.pytest_plugin import AiohttpClient
from aiohttp.test_utils import TestClient

from gateway.keyops import MAX_ALLOWED_MODELS
from tests.conftest import MakeSettings, start_gateway
from tests.test_dashboard import sign_in

ADMIN = "admin-key-0123456789abcdef"
HEADERS = {"Authorization": f"Bearer {ADMIN}"}
XSS = '</script><script>alert(1)</script><img src=x onerror="alert(2)">'


@pytest.fixture
async def gw(aiohttp_client: AiohttpClient, make_settings: MakeSettings) -> TestClient[Any, Any]:
    return await start_gateway(aiohttp_client, make_settings(admin_key=ADMIN))


async def create(gw: TestClient[Any, Any], **body: Any) -> dict[str, Any]:
    async with gw.post("/admin/keys", json={"name": "k", **body}, headers=HEADERS) as resp:
        assert resp.status == 201, await resp.text()
        created: dict[str, Any] = await resp.json()
    return created


@pytest.mark.parametrize(
    "models",
    [
        [f"demo/m{i}" for i in range(MAX_ALLOWED_MODELS + 1)],
        ["demo/" + "x" * 300],
        [""],
    ],
    ids=["too-many", "too-long", "empty"],
)
async def test_a_keys_model_allow_list_is_bounded(
    gw: TestClient[Any, Any], models: list[str]
) -> None:
    async with gw.post("/admin/keys", json={"name": "k", "models": models}, headers=HEADERS) as r:
        assert r.status == 400, await r.text()
        assert (await r.json())["error"]["param"].startswith("models")
    key_id = (await create(gw))["id"]
    patch = {"models": models}
    async with gw.patch(f"/admin/keys/{key_id}", json=patch, headers=HEADERS) as resp:
        assert resp.status == 400
    # The largest list allowed is taken, and the key works with it.
    allowed = [*(f"demo/m{i}" for i in range(MAX_ALLOWED_MODELS - 1)), "demo"]
    async with gw.patch(f"/admin/keys/{key_id}", json={"models": allowed}, headers=HEADERS) as r:
        assert r.status == 200
        assert len((await r.json())["models"]) == MAX_ALLOWED_MODELS


async def test_the_dashboard_refuses_an_allow_list_past_the_bound(
    gw: TestClient[Any, Any],
) -> None:
    csrf = await sign_in(gw)
    models = " ".join(f"demo/m{i}" for i in range(MAX_ALLOWED_MODELS + 1))
    form = {"name": "k", "models": models, "csrf": csrf}
    async with gw.post("/dashboard/keys", data=form) as resp:
        assert resp.status == 200  # the form again, saying what is wrong
        assert "models" in await resp.text()
    async with gw.get("/admin/keys", headers=HEADERS) as resp:
        assert (await resp.json())["data"] == []


async def test_revoking_twice_changes_nothing(gw: TestClient[Any, Any]) -> None:
    key_id = (await create(gw))["id"]
    async with gw.delete(f"/admin/keys/{key_id}", headers=HEADERS) as resp:
        first = await resp.json()
    async with gw.delete(f"/admin/keys/{key_id}", headers=HEADERS) as resp:
        assert resp.status == 200
        second = await resp.json()
    assert second["revoked_at"] == first["revoked_at"] is not None
    async with gw.patch(f"/admin/keys/{key_id}", json={"revoked_at": None}, headers=HEADERS) as r:
        assert r.status == 400  # nothing un-revokes a key


@pytest.mark.parametrize(
    "key_id", ["' OR '1'='1", "..%2F..%2Fkeys.db", "%00", "key_%25", "a" * 4000]
)
async def test_odd_key_ids_are_unknown_ids(gw: TestClient[Any, Any], key_id: str) -> None:
    await create(gw)
    for method in ("GET", "DELETE"):
        async with gw.request(method, f"/admin/keys/{key_id}", headers=HEADERS) as resp:
            assert resp.status == 404
            assert (await resp.json())["error"]["code"] == "key_not_found"
    async with gw.get("/admin/usage", params={"key": key_id}, headers=HEADERS) as resp:
        assert resp.status == 404
    async with gw.get("/admin/keys", headers=HEADERS) as resp:
        keys = (await resp.json())["data"]
    assert [key["revoked_at"] for key in keys] == [None]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("expires_at", "inf"),
        ("expires_at", "nan"),
        ("expires_at", 1e308),
        ("expires_at", -1e18),
        ("expires_at", "-30d"),
        ("budget_usd", 0),
        ("budget_usd", -1),
        ("rpm", 0),
    ],
)
async def test_absurd_limits_and_expiries_are_400s(
    gw: TestClient[Any, Any], field: str, value: object
) -> None:
    async with gw.post("/admin/keys", json={"name": "k", field: value}, headers=HEADERS) as r:
        assert r.status == 400, await r.text()
        assert (await r.json())["error"]["param"] == field


async def test_keys_created_at_once_are_distinct(gw: TestClient[Any, Any]) -> None:
    created = await asyncio.gather(*(create(gw, name=f"k{i}") for i in range(40)))
    assert len({c["id"] for c in created}) == len({c["key"] for c in created}) == 40
    async with gw.get("/admin/keys", headers=HEADERS) as resp:
        assert len((await resp.json())["data"]) == 40


async def test_the_dashboard_shows_hostile_names_and_model_ids_as_text(
    gw: TestClient[Any, Any],
) -> None:
    created = await create(gw, name=XSS, notes=XSS, metadata={XSS[:64]: XSS})
    auth = {"Authorization": f"Bearer {created['key']}"}
    body = {"model": "demo/" + XSS, "messages": [{"role": "user", "content": "hi"}]}
    async with gw.post("/v1/chat/completions", json=body, headers=auth) as resp:
        await resp.read()  # whatever the answer, the row names the model id
    await sign_in(gw)
    for page in ("/dashboard", "/dashboard/keys", f"/dashboard/keys/{created['id']}"):
        async with gw.get(page) as resp:
            assert resp.status == 200
            text = await resp.text()
        assert "<script>alert" not in text and "<img" not in text, page
        # Scripts are the page's own files only, and the chart data cannot close its block.
        for block in re.findall(r"<script[^>]*>(.*?)</script>", text, re.DOTALL):
            assert "<" not in block, page


@pytest.mark.parametrize("budget", [b"1e999", b"-1e999", b"Infinity", b"NaN"])
async def test_a_budget_json_cannot_carry_is_a_400_on_create_and_change(
    gw: TestClient[Any, Any], budget: bytes
) -> None:
    """JSON has no infinity or NaN, but some decoders read `1e999` as one: the admin API's
    refuses it ("out of range"), on a change as on a creation, and the key stays as it was."""
    key_id = (await create(gw, budget_usd=5))["id"]
    json_headers = {**HEADERS, "Content-Type": "application/json"}
    for method, path, body in (
        ("POST", "/admin/keys", b'{"name": "k", "budget_usd": %b}' % budget),
        ("PATCH", f"/admin/keys/{key_id}", b'{"budget_usd": %b}' % budget),
    ):
        async with gw.request(method, path, data=body, headers=json_headers) as resp:
            assert resp.status == 400, await resp.text()
            error = (await resp.json())["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["type"] == "invalid_request_error"
        if budget[-1:].isdigit():  # a number out of range; the others are not JSON at all
            assert error["param"] == "budget_usd"
    async with gw.get("/admin/keys", headers=HEADERS) as resp:
        assert [k["budget_usd"] for k in (await resp.json())["data"]] == [5]
