"""Configuration reload without a restart (issue #12), in process: what changes for new
requests, what in-flight requests keep, what breakers keep, and what a bad config changes
(nothing). `gateway serve` itself, with SIGHUP and `gateway reload`, is in test_lifecycle.py.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
from pathlib import Path
from typing import Any

import openai
import pytest
from aiohttp.pytest_plugin import AiohttpClient, AiohttpServer
from aiohttp.test_utils import TestClient
from structlog.testing import capture_logs

from gateway import reload as reload_module
from gateway.app import create_app
from gateway.config import load_settings
from gateway.reload import reload_config
from gateway.snapshot import Snapshot
from gateway.state import KEYS_KEY, LIVE_KEY, RELOADER_KEY, STORE_KEY
from tests.conftest import NEVER_HANG, app_of, create_key, openai_client, usage_rows
from tests.fakes import FakeOpenAI

HELLO = [{"role": "user", "content": "hello"}]


def current(client: TestClient[Any, Any]) -> Snapshot:
    return app_of(client)[LIVE_KEY].current


class Reloadable:
    """A gateway started from a config file, and the two fake upstreams it may point at."""

    def __init__(self, tmp_path: Path, a: FakeOpenAI, b: FakeOpenAI) -> None:
        self.path = tmp_path / "gateway.toml"
        self.database = tmp_path / "keys.db"
        self.a, self.b = a, b
        self.key = ""

    gw: TestClient[Any, Any]  # once started

    def write(self, body: str) -> None:
        self.path.write_text(
            f'[server]\ndatabase = "{self.database}"\nusage_flush_seconds = 0.05\n'
            f"keys_refresh_seconds = 0.1\n\n{body}",
            encoding="utf-8",
        )

    def provider(self, name: str, fake: FakeOpenAI, *keys: str) -> str:
        api_keys = ", ".join(f'"{k}"' for k in keys)
        return (
            f'[[providers]]\nname = "{name}"\ntype = "openai"\n'
            f'base_url = "{fake.base_url}"\napi_keys = [{api_keys}]\n\n'
        )

    async def start(self, aiohttp_client: AiohttpClient, body: str) -> TestClient[Any, Any]:
        self.write(body)
        load = lambda: load_settings(self.path, {})  # noqa: E731 - as `serve` passes it
        app = create_app(load(), reload=load)
        self.gw = await aiohttp_client(app, server_kwargs={"handler_cancellation": True})
        self.key = await create_key(self.gw)
        return self.gw

    async def reload(self, body: str | None = None) -> bool:
        if body is not None:
            self.write(body)
        return await reload_config(app_of(self.gw))

    def client(self) -> openai.AsyncOpenAI:
        return openai_client(self.gw, self.key)


def model(name: str, *targets: str) -> str:
    listed = ", ".join(f'{{ provider = "{t}", model = "up-{t}" }}' for t in targets)
    return f'[[models]]\nname = "{name}"\ntargets = [{listed}]\n\n'


@pytest.fixture
async def setup(tmp_path: Path, aiohttp_server: AiohttpServer) -> Reloadable:
    a, b = FakeOpenAI(), FakeOpenAI()
    await a.start(aiohttp_server)
    await b.start(aiohttp_server)
    return Reloadable(tmp_path, a, b)


async def test_providers_models_and_routing_change_for_new_requests(
    setup: Reloadable, aiohttp_client: AiohttpClient
) -> None:
    s = setup
    await s.start(aiohttp_client, s.provider("a", s.a, "ka") + model("m", "a"))
    async with s.client() as client:
        first = await client.chat.completions.create(model="m", messages=HELLO)
        assert first.model == "up-a"
        routing = "[routing]\nmax_attempts = 1\n\n"
        new = routing + s.provider("a", s.a, "ka") + s.provider("b", s.b, "kb")
        with capture_logs() as logs:
            assert await s.reload(new + model("m", "b") + model("m2", "a"))
        assert (await client.chat.completions.create(model="m", messages=HELLO)).model == "up-b"
        assert (await client.chat.completions.create(model="m2", messages=HELLO)).model == "up-a"
        assert (await client.chat.completions.create(model="b/x", messages=HELLO)).model == "x"
        assert [m.id async for m in client.models.list()] == ["m", "m2", "demo"]
        s.b.script(status=500)  # one attempt now: the 500 is the answer
        with pytest.raises(openai.InternalServerError):
            await client.chat.completions.create(model="m", messages=HELLO)
    line = next(e for e in logs if e["event"] == "config_reloaded")
    assert line["providers_added"] == ["b"] and line["models_added"] == ["m2"]
    assert line["models_changed"] == ["m"] and line["routing"] == ["changed"]
    assert app_of(s.gw)[RELOADER_KEY].reloads == 1


async def test_groups_change_for_keys_on_reload(
    setup: Reloadable, aiohttp_client: AiohttpClient
) -> None:
    s = setup
    base = s.provider("a", s.a, "ka") + model("m", "a") + model("m2", "a")
    await s.start(aiohttp_client, base + '[[groups]]\nname = "team"\nmodels = ["m"]\n')
    member = await create_key(s.gw, group_name="team")
    async with openai_client(s.gw, member) as client:
        await client.chat.completions.create(model="m", messages=HELLO)
        with pytest.raises(openai.PermissionDeniedError):
            await client.chat.completions.create(model="m2", messages=HELLO)
        assert await s.reload(base + '[[groups]]\nname = "team"\nmodels = ["m2"]\nrpm = 1\n')
        await client.chat.completions.create(model="m2", messages=HELLO)
        with pytest.raises(openai.RateLimitError):  # the group's new rpm applies too
            await client.chat.completions.create(model="m2", messages=HELLO)


async def test_in_flight_requests_and_streams_finish_on_the_old_config(
    setup: Reloadable, aiohttp_client: AiohttpClient
) -> None:
    s = setup
    await s.start(aiohttp_client, s.provider("a", s.a, "ka") + model("m", "a"))
    old = current(s.gw)
    rest, answer = asyncio.Event(), asyncio.Event()
    s.a.script(content="one two three four", hold=rest, hold_after=1)  # the stream
    s.a.script(hold=answer)  # the non-streaming request
    async with s.client() as client:
        stream = await client.chat.completions.create(model="m", messages=HELLO, stream=True)
        first = await anext(aiter(stream))
        s.a.request_seen.clear()
        waiting = asyncio.create_task(client.chat.completions.create(model="m", messages=HELLO))
        await s.a.request_seen.wait()
        # Provider `a` is gone from the new config; `m` now goes to `b`.
        assert await s.reload(s.provider("b", s.b, "kb") + model("m", "b"))
        assert (await client.chat.completions.create(model="m", messages=HELLO)).model == "up-b"
        assert not old.sessions["a"].closed  # requests still run on it
        rest.set()
        chunks = [first, *[c async for c in stream]]
        answer.set()
        reply = await waiting
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "one two three four" and chunks[-1].choices[0].finish_reason == "stop"
    assert reply.model == "up-a"
    rows = await usage_rows(s.gw)
    assert sorted(r["provider"] for r in rows) == ["a", "a", "b"]
    async with asyncio.timeout(NEVER_HANG):  # the old session closes once they are done
        await old.closed.wait()
    assert old.sessions["a"].closed


async def test_breakers_of_unchanged_accounts_keep_their_state(
    setup: Reloadable, aiohttp_client: AiohttpClient
) -> None:
    s = setup
    await s.start(aiohttp_client, s.provider("a", s.a, "k0", "k1") + model("m", "a"))
    breakers = current(s.gw).router.breakers
    breakers.failed(("a", 0), retry_after=60)
    breakers.failed(("a", 1), retry_after=60)
    # k0 moves to index 1 and k1 is replaced; a model is added.
    assert await s.reload(s.provider("a", s.a, "k2", "k0") + model("m", "a") + model("n", "a"))
    after = current(s.gw).router.breakers
    assert after.state(("a", 1)) == "open"  # k0, wherever it is in the list
    assert after.state(("a", 0)) == "closed"  # k2 is a new account
    async with s.client() as client:
        for _ in range(2):
            await client.chat.completions.create(model="m", messages=HELLO)
    assert {r.headers["authorization"] for r in s.a.chat_requests} == {"Bearer k2"}
    # The same provider at another address is another upstream: its breakers start closed.
    assert await s.reload(s.provider("a", s.b, "k2", "k0") + model("m", "a"))
    assert current(s.gw).router.breakers.state(("a", 1)) == "closed"


@pytest.mark.parametrize(
    ("broken", "error"),
    [
        ("[server\n", "not valid TOML"),
        ('[routing]\nmax_attempts = "three"\n', "routing.max_attempts"),
        (model("z", "nowhere"), "no provider named 'nowhere'"),
    ],
)
async def test_a_config_that_fails_validation_is_refused_and_the_old_one_stays(
    setup: Reloadable, aiohttp_client: AiohttpClient, broken: str, error: str
) -> None:
    s = setup
    good = s.provider("a", s.a, "ka") + model("m", "a")
    await s.start(aiohttp_client, good)
    before = current(s.gw)
    with capture_logs() as logs:
        assert not await s.reload(good + broken)
    failed = next(e for e in logs if e["event"] == "config_reload_failed")
    assert failed["log_level"] == "error" and error in failed["error"]
    assert current(s.gw) is before
    async with s.client() as client:
        assert (await client.chat.completions.create(model="m", messages=HELLO)).model == "up-a"
    assert await s.reload(good + model("n", "a"))  # a good config is taken afterwards


async def test_metrics_public_reloads_and_the_rest_waits_for_a_restart(
    setup: Reloadable, aiohttp_client: AiohttpClient
) -> None:
    s = setup
    body = s.provider("a", s.a, "ka")
    await s.start(aiohttp_client, body)
    assert (await s.gw.get("/metrics")).status == 404  # no admin key, not public
    with capture_logs() as logs:
        assert await s.reload(body + "\n[metrics]\npublic = true\nmax_keys = 5\n")
    warning = next(e for e in logs if e["event"] == "config_reload_needs_restart")
    assert warning["fields"] == ["metrics.max_keys"]
    metrics = current(s.gw).settings.metrics
    assert (metrics.public, metrics.max_keys) == (True, 1000)
    resp = await s.gw.get("/metrics")
    assert resp.status == 200 and "tokenkiosk_requests_total" in await resp.text()


async def test_server_fields_bound_at_start_keep_their_running_values(
    setup: Reloadable, aiohttp_client: AiohttpClient
) -> None:
    s = setup
    body = s.provider("a", s.a, "ka")
    await s.start(aiohttp_client, body)
    running = current(s.gw).settings.server
    moved = body.replace("[[providers]]", "default_model = 'a/x'\n\n[[providers]]", 1)
    s.write(moved)
    s.path.write_text(
        s.path.read_text().replace("[server]\n", "[server]\nport = 9999\nlog_level = 'debug'\n"),
        encoding="utf-8",
    )
    with capture_logs() as logs:
        assert await s.reload()
    warning = next(e for e in logs if e["event"] == "config_reload_needs_restart")
    assert warning["fields"] == ["server.port", "server.log_level"]
    reloaded = next(e for e in logs if e["event"] == "config_reloaded")
    assert reloaded["settings_changed"] == ["server.default_model"]  # what was taken
    server = current(s.gw).settings.server
    assert (server.port, server.log_level) == (running.port, running.log_level)
    assert server.default_model == "a/x"  # not bound at start: taken
    resp = await s.gw.post(
        "/api/v1/chat",
        json={"messages": HELLO},
        headers={"Authorization": f"Bearer {s.key}"},
    )
    assert (await resp.json())["model"] == "x"


async def test_concurrent_reloads_apply_in_order(
    setup: Reloadable, aiohttp_client: AiohttpClient
) -> None:
    s = setup
    await s.start(aiohttp_client, s.provider("a", s.a, "ka"))
    s.write(s.provider("a", s.a, "ka") + model("m", "a"))
    results = await asyncio.gather(*(s.reload() for _ in range(3)))
    assert results == [True, True, True]
    assert [m.name for m in current(s.gw).settings.models] == ["m", "demo"]


async def test_sighup_reloads_the_running_app(
    setup: Reloadable, aiohttp_client: AiohttpClient
) -> None:
    s = setup
    await s.start(aiohttp_client, s.provider("a", s.a, "ka"))
    reloader = app_of(s.gw)[RELOADER_KEY]
    s.write(s.provider("a", s.a, "ka") + model("m", "a"))
    reloader.finished.clear()
    os.kill(os.getpid(), signal.SIGHUP)  # the app's handler, installed at its start
    async with asyncio.timeout(NEVER_HANG):
        await reloader.finished.wait()
    assert reloader.reloads == 1
    async with s.client() as client:
        assert (await client.chat.completions.create(model="m", messages=HELLO)).model == "up-a"


async def test_sighups_while_a_reload_runs_and_another_waits_are_that_waiting_one(
    setup: Reloadable, aiohttp_client: AiohttpClient
) -> None:
    # A stream of SIGHUPs queued a reload each, and a stop waited for every one.
    s = setup
    await s.start(aiohttp_client, s.provider("a", s.a, "ka"))
    app = app_of(s.gw)
    reloader = app[RELOADER_KEY]
    s.write(s.provider("a", s.a, "ka") + model("m", "a"))
    for _ in range(50):
        reload_module._on_sighup(app)
    assert len(reloader.tasks) == 2
    async with asyncio.timeout(NEVER_HANG):
        await asyncio.gather(*reloader.tasks)
    assert reloader.reloads == 2
    assert [m.name for m in current(s.gw).settings.models] == ["m", "demo"]


async def test_a_reload_the_database_fails_changes_nothing(
    setup: Reloadable, aiohttp_client: AiohttpClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = setup
    await s.start(aiohttp_client, s.provider("a", s.a, "ka") + model("m", "a"))
    before = current(s.gw)
    cache = app_of(s.gw)[KEYS_KEY]
    store = app_of(s.gw)[STORE_KEY]

    async def unreachable() -> list[Any]:
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(store, "list_keys", unreachable)
    team = '[[groups]]\nname = "team"\nmodels = ["m"]\n'
    with capture_logs() as logs:
        assert not await s.reload(s.provider("b", s.b, "kb") + model("m", "b") + team)
    assert (
        "disk I/O error" in next(e for e in logs if e["event"] == "config_reload_failed")["error"]
    )
    assert current(s.gw) is before
    assert cache.with_groups(await create_key_record(s)).models == ()  # old groups kept
    async with s.client() as client:
        assert (await client.chat.completions.create(model="m", messages=HELLO)).model == "up-a"


async def create_key_record(s: Reloadable) -> Any:
    """A new key record in group `team`."""
    record, _ = await app_of(s.gw)[STORE_KEY].create_key(name="t", group_name="team")
    return record


async def test_prices_follow_a_reload_and_an_unknown_price_list_is_refused(
    setup: Reloadable, aiohttp_client: AiohttpClient
) -> None:
    s = setup
    priced = model("m", "a") + "input_price_per_mtok = 1000000.0\noutput_price_per_mtok = 0.0\n\n"
    await s.start(aiohttp_client, s.provider("a", s.a, "ka") + priced)
    cheaper = priced.replace("1000000.0", "500000.0")
    assert await s.reload(s.provider("a", s.a, "ka") + cheaper)
    async with s.client() as client:
        await client.chat.completions.create(model="m", messages=HELLO)
    (row,) = await usage_rows(s.gw)
    assert row["cost_usd"] == pytest.approx(row["prompt_tokens"] * 0.5)
    unknown = s.provider("a", s.a, "ka").replace(
        'type = "openai"', 'type = "openai"\npricing = "x"'
    )
    with capture_logs() as logs:
        assert not await s.reload(unknown + cheaper)
    failed = next(e for e in logs if e["event"] == "config_reload_failed")
    assert "providers.a.pricing: 'x'" in failed["error"]


async def test_prices_wait_for_a_restart_and_a_new_admin_key_is_named_not_shown(
    setup: Reloadable, aiohttp_client: AiohttpClient
) -> None:
    s = setup
    body = s.provider("a", s.a, "ka")
    await s.start(aiohttp_client, body)
    running = current(s.gw).settings.prices
    admin = "sk-admin-new-0123456789abcdef"
    s.write("[prices]\nupdate_interval = 120.0\n\n" + body)
    s.path.write_text(
        s.path.read_text().replace("[server]\n", f'[server]\nadmin_key = "{admin}"\n'),
        encoding="utf-8",
    )
    with capture_logs() as logs:
        assert await s.reload()
    warning = next(e for e in logs if e["event"] == "config_reload_needs_restart")
    assert warning["fields"] == ["prices.update_interval"]  # the price list loads at start
    assert current(s.gw).settings.prices == running
    reloaded = next(e for e in logs if e["event"] == "config_reloaded")
    assert reloaded["settings_changed"] == ["server.admin_key"]
    assert admin not in repr(logs)
    resp = await s.gw.get("/admin/keys", headers={"Authorization": f"Bearer {admin}"})
    assert resp.status == 200  # taken
