"""The admin API: guarded by the admin key, never shows a secret twice, changes apply at once."""

from __future__ import annotations

import json
from typing import Any

import pytest
from aiohttp.pytest_plugin import AiohttpClient
from aiohttp.test_utils import TestClient

from gateway.settings import GroupConfig, Settings
from tests.conftest import MakeSettings, start_gateway

ADMIN = "admin-key-0123456789abcdef"
HI = {"model": "demo", "messages": [{"role": "user", "content": "hi"}]}


def admin(key: str = ADMIN) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
async def gw(
    aiohttp_client: AiohttpClient, make_settings: MakeSettings, database: str
) -> TestClient[Any, Any]:
    """The gateway with an admin key, on each backend in turn (SQLite, PostgreSQL)."""
    base = make_settings(admin_key=ADMIN, database=database)
    settings = Settings(
        server=base.server,
        providers=base.providers,
        models=base.models,
        groups=(GroupConfig(name="team", rpm=100),),
    )
    return await start_gateway(aiohttp_client, settings)


async def test_admin_api_is_off_without_an_admin_key(
    aiohttp_client: AiohttpClient, make_settings: MakeSettings
) -> None:
    gw = await start_gateway(aiohttp_client, make_settings())
    async with gw.get("/admin/keys", headers=admin()) as resp:
        assert resp.status == 404
        assert (await resp.json())["error"]["type"] == "not_found_error"


@pytest.mark.parametrize(
    "headers",
    [{}, admin("wrong-admin-key-000000"), {"Authorization": ADMIN}, admin(ADMIN + "x")],
)
async def test_admin_key_is_required(gw: TestClient[Any, Any], headers: dict[str, str]) -> None:
    for method, path in (("GET", "/admin/keys"), ("GET", "/admin/usage"), ("POST", "/admin/keys")):
        async with gw.request(method, path, headers=headers, json={"name": "x"}) as resp:
            assert resp.status == 401
            assert (await resp.json())["error"]["type"] == "authentication_error"


async def test_a_virtual_key_is_not_an_admin_key(gw: TestClient[Any, Any]) -> None:
    async with gw.post("/admin/keys", json={"name": "a"}, headers=admin()) as resp:
        secret = (await resp.json())["key"]
    async with gw.get("/admin/keys", headers=admin(secret)) as resp:
        assert resp.status == 401


async def test_key_lifecycle(gw: TestClient[Any, Any]) -> None:
    create = {
        "name": "alice",
        "models": ["demo"],
        "rpm": 5,
        "budget_usd": 2.5,
        "budget_period": "month",
        "expires_at": "30d",
        "group": "team",
        "notes": "billing team",
        "metadata": {"team": "billing"},
    }
    async with gw.post("/admin/keys", json=create, headers=admin()) as resp:
        assert resp.status == 201
        created = await resp.json()
    secret = created["key"]
    assert secret.startswith("sk-kiosk-") and len(secret) >= 40
    assert created["prefix"] == secret[:12]
    assert created["group"] == "team" and created["notes"] == "billing team"
    assert created["spend"] == {
        "period_start": created["spend"]["period_start"],
        "tokens": 0,
        "usd": 0.0,
    }
    key_id = created["id"]

    # The new key works at once, with its limits.
    async with gw.post("/v1/chat/completions", json=HI, headers=admin(secret)) as resp:
        assert resp.status == 200
        assert resp.headers["x-ratelimit-limit-requests"] == "5"

    for path in ("/admin/keys", f"/admin/keys/{key_id}"):
        async with gw.get(path, headers=admin()) as resp:
            text = await resp.text()
        assert secret not in text and "digest" not in text  # never again
    async with gw.get(f"/admin/keys/{key_id}", headers=admin()) as resp:
        shown = await resp.json()
    assert shown["spend"]["tokens"] > 0  # the request above

    async with gw.patch(
        f"/admin/keys/{key_id}",
        json={"rpm": None, "name": "alice2", "group": None},
        headers=admin(),
    ) as resp:
        updated = await resp.json()
    assert (updated["name"], updated["rpm"], updated["group"]) == ("alice2", None, None)
    async with gw.post("/v1/chat/completions", json=HI, headers=admin(secret)) as resp:
        assert "x-ratelimit-limit-requests" not in resp.headers  # no limit any more

    async with gw.delete(f"/admin/keys/{key_id}", headers=admin()) as resp:
        assert (await resp.json())["revoked_at"] is not None
    async with gw.post("/v1/chat/completions", json=HI, headers=admin(secret)) as resp:
        assert resp.status == 401
        assert (await resp.json())["error"]["code"] == "key_revoked"


@pytest.mark.parametrize(
    ("method", "path", "payload", "param"),
    [
        ("POST", "/admin/keys", {}, "name"),
        ("POST", "/admin/keys", {"name": "a", "rpm": 0}, "rpm"),
        ("POST", "/admin/keys", {"name": "a", "budget_period": "year"}, "budget_period"),
        ("POST", "/admin/keys", {"name": "a", "colour": "red"}, "colour"),
        ("POST", "/admin/keys", {"name": "a", "group": "nobody"}, "group"),
        ("POST", "/admin/keys", {"name": "a", "expires_at": "yesterday"}, "expires_at"),
        ("POST", "/admin/keys", {"name": "a", "expires_at": 1.0}, "expires_at"),
    ],
)
async def test_bad_admin_input_is_a_400_naming_the_field(
    gw: TestClient[Any, Any], method: str, path: str, payload: dict[str, Any], param: str
) -> None:
    async with gw.request(method, path, json=payload, headers=admin()) as resp:
        error = (await resp.json())["error"]
    assert resp.status == 400
    assert error["param"] == param


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("name", "key-for-\u202eved"),  # shows as "key-for-dev"
        ("name", "\u2067prod\u2069"),
        ("name", "two\nlines"),
        ("name", "tab\tbed"),
        ("name", "\x1b[31mred"),  # a terminal escape, for `keys list`
        ("notes", "fine\r\nthen \u202e"),
        ("notes", "bell\x07"),
        ("metadata", {"team": "a\u200fb"}),
        ("metadata", {"\u202dteam": "a"}),
        ("name", "two\u2028lines"),
        ("name", "two\u2029paragraphs"),
        ("models", ["gpt-4-\u202eved"]),
        ("models", ["\x1b[31mred"]),
        ("models", ["two\nlines"]),
    ],
)
async def test_text_that_reorders_or_controls_what_is_shown_is_refused(
    gw: TestClient[Any, Any], field: str, value: Any
) -> None:
    """A key's name could hold Unicode's bidirectional overrides, so one key read as another in
    the dashboard and the CLI, and control characters (a terminal escape in `keys list`)."""
    body = {"name": "a", field: value}
    async with gw.post("/admin/keys", json=body, headers=admin()) as resp:
        error = (await resp.json())["error"]
    assert (resp.status, error["param"]) == (400, field)
    assert "control characters and bidirectional formatting characters" in error["message"]
    async with gw.post("/admin/keys", json={"name": "a"}, headers=admin()) as resp:
        key_id = (await resp.json())["id"]
    async with gw.patch(f"/admin/keys/{key_id}", json={field: value}, headers=admin()) as resp:
        assert resp.status == 400
    async with gw.get("/admin/keys", headers=admin()) as resp:
        assert [(k["name"], k["notes"]) for k in (await resp.json())["data"]] == [("a", "")]


async def test_names_and_notes_keep_any_script_and_notes_their_line_breaks(
    gw: TestClient[Any, Any],
) -> None:
    body = {
        "name": "Zoë's 日本 key \u05e9\u05dc\u05d5\u05dd 🔑",  # (Hebrew: direction is no override)
        "notes": "first line\r\nsecond\tline\n",
        "metadata": {"équipe": "données", "who": "\U0001f469\u200d\U0001f4bb"},  # (a ZWJ)
        "models": ["gpt-4o", "openai/*"],
    }
    async with gw.post("/admin/keys", json=body, headers=admin()) as resp:
        created = await resp.json()
    assert resp.status == 201, created
    assert {f: created[f] for f in body} == body


async def test_unknown_key_and_empty_update(gw: TestClient[Any, Any]) -> None:
    async with gw.get("/admin/keys/key_nope", headers=admin()) as resp:
        assert resp.status == 404
    async with gw.post("/admin/keys", json={"name": "a"}, headers=admin()) as resp:
        key_id = (await resp.json())["id"]
    async with gw.patch(f"/admin/keys/{key_id}", json={}, headers=admin()) as resp:
        assert resp.status == 400


async def test_usage_report(gw: TestClient[Any, Any]) -> None:
    async with gw.post("/admin/keys", json={"name": "a"}, headers=admin()) as resp:
        created = await resp.json()
    for _ in range(3):
        async with gw.post("/v1/chat/completions", json=HI, headers=admin(created["key"])) as resp:
            assert resp.status == 200
    async with gw.post(
        "/v1/chat/completions", json={**HI, "model": "ghost"}, headers=admin(created["key"])
    ) as resp:
        assert resp.status == 404
    async with gw.get(
        "/admin/usage", params={"by": "model", "since": "1h", "key": created["id"]}, headers=admin()
    ) as resp:
        report = await resp.json()
    assert report["by"] == "model"
    by_model = {row["group"]: row for row in report["data"]}
    assert by_model["demo"]["requests"] == 3 and by_model["demo"]["errors"] == 0
    assert by_model["demo"]["p50_latency_ms"] is not None
    assert by_model["-"]["errors"] == 1
    async with gw.get("/admin/usage", headers=admin()) as resp:  # by key: with its name
        [row] = (await resp.json())["data"]
    assert (row["group"], row["name"], row["requests"]) == (created["id"], "a", 4)
    async with gw.get("/admin/usage", params={"until": "1h"}, headers=admin()) as resp:
        assert (await resp.json())["data"] == []  # nothing before an hour ago
    for params, param in (({"by": "week"}, "by"), ({"since": "soon"}, "since")):
        async with gw.get("/admin/usage", params=params, headers=admin()) as resp:
            assert resp.status == 400
            assert json.loads(await resp.text())["error"]["param"] == param
