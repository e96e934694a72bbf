"""Process-level guarantees: CLI key changes reach a running server; a clean stop loses no usage."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sqlite3
import subprocess
import sys
from typing import Any

import pytest
from aiohttp import ClientSession, web
from aiohttp.pytest_plugin import AiohttpClient

from gateway import cli
from gateway.app import create_app
from gateway.state import KEYS_KEY, STORE_KEY
from tests.conftest import (
    NEVER_HANG,
    MakeSettings,
    app_of,
    cli_key,
    free_port,
    start_gateway,
    start_serve,
)

HELLO = {"model": "demo", "messages": [{"role": "user", "content": "hi"}]}


async def test_cli_changes_reach_the_running_server_at_its_next_poll(
    aiohttp_client: AiohttpClient,
    make_settings: MakeSettings,
    capsys: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The server polls for changes every `keys_refresh_seconds` (at most 2 s, as settings
    check): a change the CLI made is served from the first poll that begins after it."""
    settings = make_settings()
    client = await start_gateway(aiohttp_client, settings)
    db = settings.server.database
    cache = app_of(client)[KEYS_KEY]
    polls = 0
    poll = cache.refresh

    async def counted_poll() -> None:
        nonlocal polls
        polls += 1
        await poll()

    monkeypatch.setattr(cache, "refresh", counted_poll)  # what the running refresh loop calls

    async def cli_change(*argv: str) -> None:
        # In another thread, on its own connection, as a user would.
        loads = cache.loads
        assert await asyncio.to_thread(cli.main, [*argv, "--db", db]) == 0
        committed = polls  # a poll already under way may have looked before the commit
        async with asyncio.timeout(NEVER_HANG):
            await cache.wait_reload(loads)
        assert polls - committed <= 1

    await cli_change("keys", "create", "--name", "ops")
    secret = capsys.readouterr().out.strip().splitlines()[-1]
    headers = {"Authorization": f"Bearer {secret}"}
    assert (await client.post("/v1/chat/completions", json=HELLO, headers=headers)).status == 200

    key_id = next(k.id for k in await app_of(client)[STORE_KEY].list_keys() if k.name == "ops")
    await cli_change("keys", "revoke", key_id)
    resp = await client.post("/v1/chat/completions", json=HELLO, headers=headers)
    assert resp.status == 401
    assert (await resp.json())["error"]["code"] == "key_revoked"


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


async def refused(port: int) -> None:
    """Return once a connection to `port` is refused: the server closed its listening socket,
    the first thing it does on SIGTERM. Each try is a real connection, not a timed wait."""
    while True:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except (ConnectionRefusedError, ConnectionResetError):  # reset: closed while queued
            return
        writer.close()
        with contextlib.suppress(ConnectionResetError):
            await writer.wait_closed()


async def _serve_before(
    upstream: Any, tmp_path: Any, capsys: Any, *, grace: float, server: str = ""
) -> tuple[web.AppRunner, asyncio.subprocess.Process, str, int]:
    """A fake upstream served by `upstream`, and a real `gateway serve` in front of it with
    `grace` seconds to wind down (and the `[server]` lines `server`) and a key made with the
    CLI: (upstream runner, process, key, port). The caller ends both."""
    app = web.Application()
    app.router.add_post("/v1/chat/completions", upstream)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    up_port = runner.addresses[0][1]
    port = free_port()
    db = tmp_path / "keys.db"
    config = tmp_path / "gateway.toml"
    config.write_text(
        f'[server]\ndatabase = "{db}"\nshutdown_grace_seconds = {grace:g}\n{server}\n'
        f'[[providers]]\nname = "up"\ntype = "openai"\nbase_url = "http://127.0.0.1:{up_port}/v1"\n'
    )
    secret = await cli_key(db, capsys)
    proc = await start_serve(config, port, stdout=subprocess.DEVNULL)
    return runner, proc, secret, port


def _stream(session: ClientSession, port: int, secret: str) -> Any:
    """A streamed chat request to the `up` provider of the `gateway serve` on `port`."""
    body = {"model": "up/x", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    return session.post(
        f"http://127.0.0.1:{port}/v1/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {secret}"},
    )


async def test_sigterm_finishes_in_flight_work_and_exits_0(tmp_path: Any, capsys: Any) -> None:
    """`gateway serve` as a real process: SIGTERM lets an open stream finish, writes usage, 0."""
    chunks, rest = asyncio.Event(), asyncio.Event()

    async def upstream(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for word in ("one", " two", " three"):
            delta = {"role": "assistant", "content": word}
            event = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "x",
                     "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}  # fmt: skip
            await resp.write(b"data: " + json.dumps(event).encode() + b"\n\n")
            chunks.set()
            await rest.wait()  # the stream stays open until the server is shutting down
        await resp.write(b"data: [DONE]\n\n")
        return resp

    runner, proc, secret, port = await _serve_before(upstream, tmp_path, capsys, grace=10)
    try:
        async with asyncio.timeout(60):  # fail, never hang, whatever goes wrong
            assert proc.stderr is not None
            line = await proc.stderr.readline()
            assert b"listening" in line, line
            async with (
                ClientSession() as session,
                _stream(session, port, secret) as resp,
            ):
                await chunks.wait()
                proc.send_signal(signal.SIGTERM)
                await refused(port)  # its listener closed: the shutdown began mid-stream
                rest.set()
                tail = await resp.read()
            assert tail.endswith(b"data: [DONE]\n\n")  # the open stream finished
            assert await proc.wait() == 0
    finally:
        rest.set()  # whatever happened, let the upstream's handler end
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await runner.cleanup()
    with sqlite3.connect(tmp_path / "keys.db") as conn:
        assert conn.execute("SELECT status FROM usage").fetchall() == [(200,)]


async def test_usage_rows_lost_at_stop_make_the_exit_status_3(tmp_path: Any, capsys: Any) -> None:
    """A stop that cannot write its usage rows is not a clean stop: a supervisor sees it in the
    exit status (3) and on stderr, not only in the `usage_rows_lost` log line."""

    async def upstream(request: web.Request) -> web.Response:
        return web.json_response(
            {"id": "c", "object": "chat.completion", "created": 1, "model": "x",
             "choices": [{"index": 0, "finish_reason": "stop",
                          "message": {"role": "assistant", "content": "hello"}}],
             "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}
        )  # fmt: skip

    # The row waits in the queue: nothing is written before the stop.
    held = "usage_flush_seconds = 3600\nusage_batch_size = 1000\n"
    runner, proc, secret, port = await _serve_before(
        upstream, tmp_path, capsys, grace=1, server=held
    )
    try:
        async with asyncio.timeout(60):
            assert proc.stderr is not None
            line = await proc.stderr.readline()
            assert b"listening" in line, line
            async with (
                ClientSession() as session,
                session.post(
                    f"http://127.0.0.1:{port}/v1/chat/completions",
                    json={**HELLO, "model": "up/x"},
                    headers={"Authorization": f"Bearer {secret}"},
                ) as resp,
            ):
                assert resp.status == 200
            # The database loses its usage table under the running server.
            with sqlite3.connect(tmp_path / "keys.db", timeout=30) as conn:
                conn.execute("DROP TABLE usage")
            proc.send_signal(signal.SIGTERM)
            assert await proc.wait() == 3
            err = await proc.stderr.read()
            assert b"gateway: 1 usage rows could not be written to the database" in err, err
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await runner.cleanup()


async def _log_event(stream: asyncio.StreamReader, event: str) -> dict[str, Any]:
    """The next JSON log line of `event` the server writes (other lines are skipped)."""
    while True:
        line = await stream.readline()
        assert line, f"the server exited before logging {event}"
        if line.startswith(b"{") and json.loads(line).get("event") == event:
            return dict(json.loads(line))


async def test_sighup_and_gateway_reload_re_read_the_config(tmp_path: Any, capsys: Any) -> None:
    """`gateway serve` as a real process: `gateway reload` (which finds it by the pid file
    next to its database) and `kill -HUP` make it re-read its config; a bad config is refused
    and the running one stays; the pid file is gone once it stops."""
    port = free_port()
    db = tmp_path / "keys.db"
    config = tmp_path / "gateway.toml"
    head = f'[server]\ndatabase = "{db}"\n\n'
    config.write_text(head)
    secret = await cli_key(db, capsys)
    assert await asyncio.to_thread(cli.main, ["reload", "--db", str(db)]) == 1  # not running
    assert "no running server" in capsys.readouterr().err
    proc = await start_serve(config, port, stdout=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}/v1/models"
    headers = {"Authorization": f"Bearer {secret}"}

    async def models(session: ClientSession) -> list[str]:
        async with session.get(url, headers=headers) as resp:
            return [m["id"] for m in (await resp.json())["data"]]

    try:
        async with asyncio.timeout(60), ClientSession() as session:
            assert proc.stderr is not None and proc.stdout is not None
            assert b"listening" in await proc.stderr.readline()
            assert await models(session) == ["demo"]
            assert (tmp_path / "keys.db.pid").read_text().strip() == str(proc.pid)

            demo2 = '[[models]]\nname = "demo2"\ntargets = [{ provider = "demo", model = "x" }]\n'
            config.write_text(head + demo2)
            argv = ["reload", "--config", str(config)]
            assert await asyncio.to_thread(cli.main, argv) == 0
            assert f"pid {proc.pid}" in capsys.readouterr().out
            assert (await _log_event(proc.stdout, "config_reloaded"))["models_added"] == ["demo2"]
            assert await models(session) == ["demo2", "demo"]

            config.write_text(head + demo2 + "[[models]]\nname = 1\n")
            proc.send_signal(signal.SIGHUP)
            failed = await _log_event(proc.stdout, "config_reload_failed")
            assert "models[1].name" in failed["error"]
            assert await models(session) == ["demo2", "demo"]  # the running config stays

            # A price list the price database lacks is found beyond the config's own checks:
            # its error names the config file first all the same.
            priced = '[[providers]]\nname = "p"\ntype = "demo"\npricing = "nowhere"\n'
            config.write_text(head + demo2 + priced)
            proc.send_signal(signal.SIGHUP)
            failed = await _log_event(proc.stdout, "config_reload_failed")
            assert failed["error"].startswith(f"{config}: providers.p.pricing: 'nowhere'")
            assert await models(session) == ["demo2", "demo"]

            config.write_text(head)
            proc.send_signal(signal.SIGHUP)
            assert (await _log_event(proc.stdout, "config_reloaded"))["models_removed"] == ["demo2"]
            assert await models(session) == ["demo"]
            proc.send_signal(signal.SIGTERM)
            assert await proc.wait() == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert not (tmp_path / "keys.db.pid").exists()


@pytest.mark.parametrize(("setting", "loop"), [("", "uvloop"), ("uvloop = false\n", "asyncio")])
async def test_the_server_runs_on_uvloop_unless_told_not_to(
    tmp_path: Any, setting: str, loop: str
) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text(f'[server]\ndatabase = "{tmp_path / "keys.db"}"\n{setting}')
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "serve", "--config", str(config),
        "--port", str(free_port()), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        async with asyncio.timeout(60):
            assert proc.stdout is not None
            serving = await _log_event(proc.stdout, "serving")
            assert (serving["loop"], serving["backlog"]) == (loop, 1024)
            # What start-up made is out of the collector's sight (~90 ms a full collection).
            assert serving["frozen_objects"] > 50_000
            # ... a young collection about 3 times, a full one 10 times less often.
            assert serving["gc_thresholds"] == [2000, 10, 100]
            proc.send_signal(signal.SIGTERM)
            assert await proc.wait() == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_sigterm_ends_a_silent_stream_within_the_grace_period(
    tmp_path: Any, capsys: Any
) -> None:
    """A stream whose upstream went silent (pinged meanwhile) does not hold the process past
    its grace period: the client gets the shutdown error event and the process exits 0."""
    first, never = asyncio.Event(), asyncio.Event()

    async def upstream(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        delta = {"role": "assistant", "content": "one"}
        event = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "x",
                 "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}  # fmt: skip
        await resp.write(b"data: " + json.dumps(event).encode() + b"\n\n")
        first.set()
        await never.wait()  # silent from here on
        return resp

    runner, proc, secret, port = await _serve_before(upstream, tmp_path, capsys, grace=1)
    try:
        async with asyncio.timeout(60):
            assert proc.stderr is not None
            assert b"listening" in await proc.stderr.readline()
            async with (
                ClientSession() as session,
                _stream(session, port, secret) as resp,
            ):
                await first.wait()
                start = asyncio.get_running_loop().time()
                proc.send_signal(signal.SIGTERM)
                tail = await resp.read()
            assert await proc.wait() == 0
            took = asyncio.get_running_loop().time() - start
    finally:
        never.set()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await runner.cleanup()
    assert b"shutting down" in tail and b'"error"' in tail
    assert took < 8  # the grace period (1 s) and the stop, not the stream's silence


def _rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/<pid>/status")
async def test_many_reloads_with_a_stream_open_keep_memory_flat_and_the_stream_whole(
    tmp_path: Any, capsys: Any
) -> None:
    """Start-up objects are frozen out of the collector's sight: what reloads replace (the
    providers, their sessions) must still be freed, and a stream open across them ends whole."""
    first, rest = asyncio.Event(), asyncio.Event()

    async def upstream(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for word in ("one", " two"):
            delta = {"role": "assistant", "content": word}
            event = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "x",
                     "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}  # fmt: skip
            await resp.write(b"data: " + json.dumps(event).encode() + b"\n\n")
            first.set()
            await rest.wait()
        await resp.write(b"data: [DONE]\n\n")
        return resp

    app = web.Application()
    app.router.add_post("/v1/chat/completions", upstream)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    up_port = runner.addresses[0][1]
    port = free_port()
    db = tmp_path / "keys.db"
    config = tmp_path / "gateway.toml"
    up = (
        f'[[providers]]\nname = "up"\ntype = "openai"\nbase_url = "http://127.0.0.1:{up_port}/v1"\n'
    )
    variants = [
        f'[server]\ndatabase = "{db}"\n\n{up}',
        f'[server]\ndatabase = "{db}"\n\n{up}\n'
        + up.replace('"up"', '"up2"')
        + '[[models]]\nname = "m2"\ntargets = [{ provider = "up2", model = "x" }]\n',
    ]
    config.write_text(variants[0])
    secret = await cli_key(db, capsys)
    proc = await start_serve(config, port, stdout=subprocess.PIPE)

    async def reloads(count: int) -> None:
        assert proc.stdout is not None
        for i in range(count):
            config.write_text(variants[(i + 1) % 2])
            proc.send_signal(signal.SIGHUP)
            await _log_event(proc.stdout, "config_reloaded")

    try:
        async with asyncio.timeout(120), ClientSession() as session:
            assert proc.stderr is not None
            assert b"listening" in await proc.stderr.readline()
            headers = {"Authorization": f"Bearer {secret}"}
            async with _stream(session, port, secret) as resp:
                await first.wait()
                await reloads(40)  # warm up: caches, the first retired snapshots
                before = _rss_kb(proc.pid)
                await reloads(200)
                after = _rss_kb(proc.pid)
                rest.set()
                tail = await resp.read()
            models = f"http://127.0.0.1:{port}/v1/models"
            async with session.get(models, headers=headers) as listed:
                assert listed.status == 200
            proc.send_signal(signal.SIGTERM)
            assert await proc.wait() == 0
    finally:
        rest.set()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await runner.cleanup()
    assert tail.endswith(b"data: [DONE]\n\n") and b"two" in tail
    assert after < before * 1.1, (before, after)  # flat within 10 %


async def test_a_start_that_fails_after_the_database_opened_exits(tmp_path: Any) -> None:
    """The price check fails after the database (whose thread is not a daemon) is open: the
    process prints the error and exits 2, where it used to wait for that thread forever,
    deaf to SIGTERM too."""
    config = tmp_path / "gateway.toml"
    config.write_text(
        f'[server]\ndatabase = "{tmp_path / "keys.db"}"\n\n'
        '[[providers]]\nname = "o"\ntype = "openai"\npricing = "nosuchco"\n'
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "serve", "--config", str(config),
        "--port", str(free_port()), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        async with asyncio.timeout(30):
            _, err = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 2, err
    assert b"pricing: 'nosuchco'" in err
    assert b"Traceback" not in err
