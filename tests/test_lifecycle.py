"""Process-level guarantees: CLI key changes reach a running server; a clean stop loses no usage."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from typing import Any

from aiohttp.pytest_plugin import AiohttpClient

from gateway import cli
from gateway.app import create_app
from gateway.state import KEYS_KEY, STORE_KEY
from tests.conftest import MakeSettings, app_of, start_gateway

HELLO = {"model": "demo", "messages": [{"role": "user", "content": "hi"}]}


async def test_cli_changes_reach_the_running_server_within_two_seconds(
    aiohttp_client: AiohttpClient, make_settings: MakeSettings, capsys: Any
) -> None:
    settings = make_settings(keys_refresh_seconds=1.0)
    client = await start_gateway(aiohttp_client, settings)
    db = settings.server.database
    cache = app_of(client)[KEYS_KEY]

    # Created by the CLI in another thread, on its own connection, as a user would.
    loads = cache.loads
    code = await asyncio.to_thread(cli.main, ["keys", "create", "--name", "ops", "--db", db])
    assert code == 0
    secret = capsys.readouterr().out.strip().splitlines()[-1]
    headers = {"Authorization": f"Bearer {secret}"}
    started = time.monotonic()
    async with asyncio.timeout(2):
        await cache.wait_reload(loads)
    assert (await client.post("/v1/chat/completions", json=HELLO, headers=headers)).status == 200

    key_id = next(k.id for k in await app_of(client)[STORE_KEY].list_keys() if k.name == "ops")
    loads = cache.loads
    assert await asyncio.to_thread(cli.main, ["keys", "revoke", key_id, "--db", db]) == 0
    async with asyncio.timeout(2):
        await cache.wait_reload(loads)
    resp = await client.post("/v1/chat/completions", json=HELLO, headers=headers)
    assert resp.status == 401
    assert (await resp.json())["error"]["code"] == "key_revoked"
    assert time.monotonic() - started < 4


async def test_clean_stop_writes_every_usage_row(
    aiohttp_client: AiohttpClient, make_settings: MakeSettings
) -> None:
    # A flush interval far longer than the test: only the shutdown drain can write the rows.
    settings = make_settings(usage_flush_seconds=3600, usage_batch_size=10_000)
    client = await aiohttp_client(create_app(settings))
    record, secret = await app_of(client)[STORE_KEY].create_key(name="t")
    app_of(client)[KEYS_KEY].put(record)
    headers = {"Authorization": f"Bearer {secret}"}
    for _ in range(25):
        assert (
            await client.post("/v1/chat/completions", json=HELLO, headers=headers)
        ).status == 200
    await client.close()  # runs the cleanup contexts, as SIGINT/SIGTERM does under `serve`
    with sqlite3.connect(settings.server.database) as conn:
        count, keys = conn.execute("SELECT count(*), count(DISTINCT key_id) FROM usage").fetchone()
    assert (count, keys) == (25, 1)
