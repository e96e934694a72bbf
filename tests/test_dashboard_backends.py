"""The dashboard's pages read the same figures from either backend (SQLite, then a real
PostgreSQL): today's and a period's totals by hour and by day (the daily rollup), top keys and
models, a key's page with its models and refusals, and the upstreams' recent failures."""

from __future__ import annotations

import re
from typing import Any

import openai
import pytest
from aiohttp.pytest_plugin import AiohttpClient, AiohttpServer
from aiohttp.test_utils import TestClient

from gateway.settings import ModelConfig, OpenAIConfig, RoutingSettings, Target
from gateway.state import STORE_KEY
from tests.conftest import MakeSettings, app_of, create_key, openai_client, start_gateway
from tests.fakes import FakeOpenAI
from tests.test_dashboard import ADMIN, sign_in

HELLO = [{"role": "user", "content": "hello"}]


def cells(page: str, table: str) -> list[list[str]]:
    """The text of each body row's cells in the table with id `table`."""
    found = re.search(rf'<table id="{table}">.*?<tbody>(.*?)</tbody>', page, re.S)
    assert found is not None, page
    rows = re.findall(r"<tr>(.*?)</tr>", found.group(1), re.S)
    return [[re.sub(r"<[^>]+>", "", c).strip() for c in re.findall(r"<td[^>]*>(.*?)</td>", r, re.S)]
            for r in rows]  # fmt: skip


async def page_of(gw: TestClient[Any, Any], path: str) -> str:
    async with gw.get(path) as resp:
        assert resp.status == 200, path
        return await resp.text()


async def test_pages_show_the_same_figures_on_either_backend(
    aiohttp_server: AiohttpServer,
    aiohttp_client: AiohttpClient,
    make_settings: MakeSettings,
    database: str,
) -> None:
    fake = FakeOpenAI()
    await fake.start(aiohttp_server)
    settings = make_settings(
        database=database,
        admin_key=ADMIN,
        routing=RoutingSettings(backoff_initial=0.001, backoff_max=0.002),
        providers=(OpenAIConfig(name="up", base_url=fake.base_url, api_keys=("k0",)),),
        models=(ModelConfig(name="m", targets=(Target(provider="up", model="gpt-x"),)),),
    )
    gw = await start_gateway(aiohttp_client, settings)
    secret = await create_key(gw, name="alice", rpm=3)
    fake.always(status=503)
    async with openai_client(gw, secret) as oai:
        for _ in range(2):
            await oai.chat.completions.create(model="demo", messages=HELLO)  # type: ignore[arg-type]
        with pytest.raises(openai.APIStatusError) as failed:
            await oai.chat.completions.create(model="m", messages=HELLO)  # type: ignore[arg-type]
        assert failed.value.status_code >= 500
        with pytest.raises(openai.RateLimitError):  # refused: counted, not a usage row
            await oai.chat.completions.create(model="demo", messages=HELLO)  # type: ignore[arg-type]
    [key] = await app_of(gw)[STORE_KEY].list_keys()
    await sign_in(gw)
    for period in ("24h", "7d", "30d"):  # by hour, then by day from the rollup
        page = await page_of(gw, f"/dashboard?period={period}")
        assert re.search(r'id="today-requests">4<', page), period
        assert re.search(r'id="period-requests">4<', page), period
        top_keys = cells(page, "top-keys")
        assert [r[0].split()[0] for r in top_keys] == ["alice"] and top_keys[0][1] == "3"
        models = {r[0]: r[1] for r in cells(page, "top-models")}
        assert models == {"demo": "2", "m": "1"}, period
    page = await page_of(gw, f"/dashboard/keys/{key.id}")
    assert 'id="key-requests">4<' in page
    per_model = {r[0]: r[1:3] for r in cells(page, "per-model")}
    assert per_model == {"-": ["1", "1"], "demo": ["2", "0"], "m": ["1", "1"]}
    [refusal] = cells(page, "refusals")
    assert refusal[1:] == ["429", "1"]
    keys_page = await page_of(gw, "/dashboard/keys")
    [last_use] = re.findall(r'data-label="Last use">([^<]*)<', keys_page)
    assert re.fullmatch(r"20\d\d-\d\d-\d\d \d\d:\d\d UTC", last_use), last_use
    upstreams = await page_of(gw, "/dashboard/upstreams")
    [up] = [r for r in re.findall(r"<tr>(.*?)</tr>", upstreams, re.S) if "up <small" in r]
    assert re.search(r">1; latest 20\d\d-", up), up
