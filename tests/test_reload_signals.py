"""SIGHUP around a `gateway serve` process's start and stop, as real processes
(`gateway.hangups`): a SIGHUP that comes while the server starts waits and is then a reload;
one that comes while it stops is ignored. Before, each was SIGHUP's default action (the end
of the process), found by an attack on reloads (2026-12-06)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientSession

from gateway import cli, hangups
from tests.conftest import NEVER_HANG, cli_key, free_port, start_serve
from tests.test_lifecycle import _log_event

HELLO = {"model": "demo", "messages": [{"role": "user", "content": "hi"}]}


def _catches(pid: int, sig: int = signal.SIGHUP) -> bool:
    """Whether process `pid` has a handler for `sig` (its SigCgt mask, Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) & (1 << (sig - 1)))
    raise AssertionError("no SigCgt line")


def _blocks(pid: int, sig: int = signal.SIGHUP) -> bool:
    """Whether process `pid`'s main thread blocks `sig` (its SigBlk mask, Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigBlk:"):
            return bool(int(line.split()[1], 16) & (1 << (sig - 1)))
    raise AssertionError("no SigBlk line")


async def _until(predicate: Any) -> None:
    """Return once `predicate()` holds (no event says so: the kernel's view of the process
    is polled), within NEVER_HANG."""
    async with asyncio.timeout(NEVER_HANG):
        while not predicate():  # noqa: ASYNC110 - the kernel's view of another process
            await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def _two_workers(config: Path, port: int) -> AsyncIterator[asyncio.subprocess.Process]:
    """`gateway serve --workers 2` on `config` and `port`, its stdout and stderr piped;
    stopped at the end."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "serve", "--config", str(config), "--port", str(port),
        "--workers", "2", stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            await proc.wait()


async def test_gateway_reload_during_a_clean_stop_does_not_kill_the_server(
    tmp_path: Path, capsys: Any
) -> None:
    """A stop waits (up to 10 s) for a database another process holds to write the usage
    rows still queued. Meanwhile the pid file is still there, so `gateway reload` finds the
    server and sends SIGHUP. The handler was removed first (`reload_ctx` is the first cleanup
    context to close), and the default action killed the process: every queued usage row
    lost, the exit status -SIGHUP instead of 0, the pid file left behind. Now a stop ignores
    SIGHUP."""
    db = tmp_path / "keys.db"
    config = tmp_path / "gateway.toml"
    config.write_text(
        f'[server]\ndatabase = "{db}"\nusage_flush_seconds = 3600\nusage_batch_size = 1000\n'
    )
    secret = await cli_key(db, capsys)
    port = free_port()
    proc = await start_serve(config, port, stdout=subprocess.DEVNULL)
    lock = sqlite3.connect(db, isolation_level=None)
    try:
        async with asyncio.timeout(60):
            assert proc.stderr is not None
            assert b"listening" in await proc.stderr.readline()
            headers = {"Authorization": f"Bearer {secret}"}
            async with ClientSession() as session:
                for _ in range(3):
                    url = f"http://127.0.0.1:{port}/v1/chat/completions"
                    async with session.post(url, json=HELLO, headers=headers) as resp:
                        assert resp.status == 200
            lock.execute("BEGIN IMMEDIATE")  # a backup or the CLI holds the write lock
            proc.send_signal(signal.SIGTERM)
            await _until(lambda: not _catches(proc.pid))  # the stop is under way
            argv = ["reload", "--db", str(db)]
            assert await asyncio.to_thread(cli.main, argv) == 0  # the pid file names it
            lock.execute("COMMIT")  # the database is free again: the rows can be written
            status = await proc.wait()
    finally:
        lock.close()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT count(*) FROM usage").fetchone()[0]
    assert (status, rows) == (0, 3), f"exit status {status}, {rows} of 3 usage rows written"


async def test_sighup_while_a_single_server_starts_does_not_kill_it(tmp_path: Path) -> None:
    """The SIGHUP handler is installed by the last cleanup context, after the database is
    opened, the price list and the key cache loaded: a `kill -HUP <pid>` (what
    `systemctl reload` sends to $MAINPID) that came meanwhile ended the process with the
    default action. Now it waits, and the server reloads once it can."""
    db = tmp_path / "keys.db"
    config = tmp_path / "gateway.toml"
    config.write_text(f'[server]\ndatabase = "{db}"\n')
    proc = await start_serve(config, free_port(), stdout=subprocess.PIPE)
    # The gateway's own start-up is under way: it has created its database (~0.2 s before
    # the handler is in place here).
    await _until(db.exists)
    try:
        async with asyncio.timeout(60):
            assert not _catches(proc.pid), "started too fast to show it"
            assert _blocks(proc.pid)
            proc.send_signal(signal.SIGHUP)  # the service manager reloads as it starts
            assert proc.stderr is not None
            line = await proc.stderr.readline()
            assert b"listening" in line, f"the server died: exit {await proc.wait()}"
            assert proc.stdout is not None
            await _log_event(proc.stdout, "config_reloaded")  # the SIGHUP waited: a reload
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            await proc.wait()


async def test_gateway_reload_while_workers_start_does_not_stop_the_server(
    tmp_path: Path, capsys: Any, redis_url: str
) -> None:
    """`serve --workers N`: the parent writes the pid file once it listens, before its
    workers serve. It forwarded SIGHUP to them at once; a worker not yet able to reload died
    of it, the parent saw a worker exit before all were ready and exited 1, with nothing on
    stderr: `gateway reload` right after a start stopped the whole server. Now the parent
    holds SIGHUP until every worker serves, and each worker reloads."""
    db = tmp_path / "keys.db"
    config = tmp_path / "gateway.toml"
    config.write_text(f'[server]\ndatabase = "{db}"\nredis_url = "{redis_url}"\n')
    await cli_key(db, capsys)
    port = free_port()
    async with _two_workers(config, port) as proc, asyncio.timeout(60):
        assert proc.stdout is not None and proc.stderr is not None
        await _log_event(proc.stdout, "worker_started")
        await _log_event(proc.stdout, "worker_started")
        # The pid file is there already, so this finds the parent and signals it (a
        # server that wrote it only once every worker serves would answer "not running").
        await asyncio.to_thread(cli.main, ["reload", "--db", str(db)])
        line = await proc.stderr.readline()
        assert b"listening" in line, f"the server stopped: exit {await proc.wait()}"
        healthz = f"http://127.0.0.1:{port}/healthz"
        async with ClientSession() as session, session.get(healthz) as resp:
            assert resp.status == 200
        for _ in range(2):  # each worker reloads once it can
            await _log_event(proc.stdout, "config_reloaded")


async def test_a_worker_started_again_takes_a_reload_forwarded_while_it_starts(
    tmp_path: Path, capsys: Any, redis_url: str
) -> None:
    """A worker that died is started again while the others serve. A SIGHUP forwarded while
    it starts waits for it (it starts with SIGHUP blocked, as its parent holds it around the
    start) instead of ending it, and it reloads."""
    db = tmp_path / "keys.db"
    config = tmp_path / "gateway.toml"
    config.write_text(f'[server]\ndatabase = "{db}"\nredis_url = "{redis_url}"\n')
    await cli_key(db, capsys)
    async with _two_workers(config, free_port()) as proc, asyncio.timeout(60):
        assert proc.stdout is not None and proc.stderr is not None
        first = await _log_event(proc.stdout, "worker_started")
        await _log_event(proc.stdout, "worker_started")
        assert b"listening" in await proc.stderr.readline()
        os.kill(first["pid"], signal.SIGKILL)
        await _log_event(proc.stdout, "worker_exited")
        again = await _log_event(proc.stdout, "worker_started")
        assert _blocks(again["pid"])  # still starting: SIGHUP waits
        proc.send_signal(signal.SIGHUP)
        seen = [await _next_of(proc.stdout, ("config_reloaded", "worker_exited"))
                for _ in range(2)]  # fmt: skip
        assert seen == ["config_reloaded"] * 2  # both workers; none died of it


async def _next_of(stream: asyncio.StreamReader, events: tuple[str, ...]) -> str:
    while True:
        line = await stream.readline()
        assert line, f"the process exited before logging any of {events}"
        if line.startswith(b"{") and (event := json.loads(line).get("event")) in events:
            return str(event)


async def test_a_process_started_while_sighup_is_held_starts_with_it_blocked() -> None:
    with hangups.held():
        child = await asyncio.create_subprocess_exec("sleep", "30")
    try:
        assert _blocks(child.pid)
        assert not _blocks(os.getpid())  # the block ends with the block
    finally:
        child.kill()
        await child.wait()


# Sends SIGHUP to a pid as fast as it can; says "go" once the first one is sent.
_STORM = """
import os, signal, sys
pid = int(sys.argv[1])
os.kill(pid, signal.SIGHUP)
print("go", flush=True)
try:
    while True:
        os.kill(pid, signal.SIGHUP)
except ProcessLookupError:
    pass
"""


def test_a_serve_that_fails_in_process_leaves_sighup_as_it_was(
    tmp_path: Path, capsys: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An in-process `cli.main(["serve", ...])` that returned early (a bad config) left
    SIGHUP blocked in the test process, and `hangups` holding it: later subprocesses started
    with it blocked, and later in-process apps set it ignored at their stop."""
    monkeypatch.setattr(hangups, "_held", False)  # (restored after the test)
    before = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    bad = tmp_path / "gateway.toml"
    bad.write_text("[server]\nport = 'eighty'\n")
    try:
        assert cli.main(["serve", "--config", str(bad)]) == 2
        capsys.readouterr()
        after = signal.pthread_sigmask(signal.SIG_BLOCK, [])
        assert (signal.SIGHUP in after, hangups._held) == (signal.SIGHUP in before, False)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)


async def test_a_stream_of_sighups_through_a_stop_neither_ends_nor_holds_it(
    tmp_path: Path,
) -> None:
    """A reload loop sends SIGHUP after SIGHUP while the server (on uvloop, the default)
    stops. The stop removed the loop's handler, which put SIGHUP's default action back for a
    moment before it was ignored, and a thread started while serving (libuv's) took one then:
    the process ended (-SIGHUP), every time here. (On asyncio's own loop a stream that does
    not end can starve the stop as long as it lasts, as docs/operations.md says: there, one
    that ends is the test below.)"""
    db = tmp_path / "keys.db"
    config = tmp_path / "gateway.toml"
    config.write_text(f'[server]\ndatabase = "{db}"\n')  # uvloop: the default
    proc = await start_serve(config, free_port(), stdout=subprocess.DEVNULL)
    storm = None
    try:
        async with asyncio.timeout(NEVER_HANG):
            assert proc.stderr is not None
            assert b"listening" in await proc.stderr.readline()
            drain = asyncio.create_task(proc.stderr.read())  # (not left to fill its pipe)
            storm = await asyncio.create_subprocess_exec(
                sys.executable, "-c", _STORM, str(proc.pid), stdout=subprocess.PIPE
            )
            assert storm.stdout is not None
            assert await storm.stdout.readline() == b"go\n"
            started = asyncio.get_running_loop().time()
            proc.send_signal(signal.SIGTERM)
            status = await proc.wait()
            await drain
        assert status == 0, f"exit status {status}"
        assert asyncio.get_running_loop().time() - started < 10  # (the grace period: 10 s)
    finally:
        if storm is not None and storm.returncode is None:
            storm.kill()
            await storm.wait()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_sighup_while_gateway_serve_imports_waits(tmp_path: Path) -> None:
    """`gateway serve` held SIGHUP from `_serve` on, after ~0.1 s of imports: a
    `kill -HUP $MAINPID` right after a start (systemd's `ExecReload` with `Type=simple`)
    landed there and ended the server. Now the `gateway` package holds it as it is imported,
    before the rest of the command's imports."""
    db = tmp_path / "keys.db"
    config = tmp_path / "gateway.toml"
    config.write_text(f'[server]\ndatabase = "{db}"\n')
    proc = await start_serve(config, free_port(), stdout=subprocess.PIPE)

    def importing_gateway() -> bool:  # gateway.cli's imports are under way (msgspec loaded)
        return "msgspec" in Path(f"/proc/{proc.pid}/maps").read_text()

    try:
        async with asyncio.timeout(NEVER_HANG):
            await _until(importing_gateway)
            assert _blocks(proc.pid)
            proc.send_signal(signal.SIGHUP)
            assert proc.stderr is not None
            line = await proc.stderr.readline()
            assert b"listening" in line, f"the server died: exit {await proc.wait()}"
            assert proc.stdout is not None
            await _log_event(proc.stdout, "config_reloaded")
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            await proc.wait()


# Sends `n` SIGHUPs to a pid, then one SIGTERM, then `n` more SIGHUPs (the SIGTERM comes in
# the middle of the stream, as an operator's stop would), then exits.
_FLOOD = """
import os, signal, sys
pid, n = int(sys.argv[1]), int(sys.argv[2])
def hups():
    for _ in range(n):
        os.kill(pid, signal.SIGHUP)
hups()
os.kill(pid, signal.SIGTERM)
hups()
"""


async def test_the_workers_parent_stops_on_a_sigterm_sent_in_a_stream_of_sighups(
    tmp_path: Path, redis_url: str
) -> None:
    """The `--workers N` parent runs asyncio's own loop (whatever `uvloop` says), whose
    handler learns of a signal by a byte on its wakeup socket. A stream of SIGHUPs filled
    it, the SIGTERM's byte was dropped, and the parent served on after the stream ended
    (found by an attack on the SIGHUP fix)."""
    config = tmp_path / "gateway.toml"
    config.write_text(f'[server]\ndatabase = "{tmp_path / "keys.db"}"\nredis_url = "{redis_url}"\n')
    async with _two_workers(config, free_port()) as proc:
        assert await _stopped_by_a_flood(proc) == 0


async def test_a_server_on_asyncio_stops_on_a_sigterm_sent_in_a_stream_of_sighups(
    tmp_path: Path,
) -> None:
    """The same on `gateway serve` with `uvloop = false`: asyncio's loop."""
    config = tmp_path / "gateway.toml"
    config.write_text(f'[server]\ndatabase = "{tmp_path / "keys.db"}"\nuvloop = false\n')
    proc = await start_serve(config, free_port(), stdout=subprocess.DEVNULL)
    try:
        assert await _stopped_by_a_flood(proc) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def _stopped_by_a_flood(proc: asyncio.subprocess.Process) -> int:
    """Once `proc` listens, send it `_FLOOD` (200,000 SIGHUPs, a SIGTERM, 200,000 more): its
    exit status once the flood is over."""
    assert proc.stderr is not None
    async with asyncio.timeout(60):
        assert b"listening" in await proc.stderr.readline()
    drain = asyncio.create_task(proc.stderr.read())  # (not left to fill its pipe)
    flood = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _FLOOD, str(proc.pid), "200000"
    )
    await flood.wait()  # the stream is over, the SIGTERM was sent in its middle
    async with asyncio.timeout(NEVER_HANG):
        status = await proc.wait()
        await drain
    return status
