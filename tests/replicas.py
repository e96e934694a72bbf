"""Real `gateway serve` processes for the scaling tests: replicas on free ports sharing one
SQLite file and one Redis, talking to an in-process fake upstream."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import asyncpg
from aiohttp import ClientSession, ClientTimeout, TCPConnector

from gateway.database import opened_database
from tests.conftest import NEVER_HANG, free_port

__all__ = [
    "Replica",
    "both_workers_serve",
    "create_key",
    "prefixes",
    "replicas",
    "usage_rows",
    "usage_rows_pg",
    "write_config",
]


def write_config(
    directory: Path, upstream: str, redis_url: str, database: str | None = None, **server: Any
) -> Path:
    """A config for every replica: the shared database (a SQLite file in `directory` unless
    given: a path or a `postgresql://` URL) and Redis, the fake upstream as `m`."""
    lines = [
        "[server]",
        f'database = "{database or directory / "keys.db"}"',
        f'redis_url = "{redis_url}"',
        "keys_refresh_seconds = 0.2",
        "usage_flush_seconds = 0.1",
        "shutdown_grace_seconds = 5",
        'log_level = "warning"',
        *(f"{name} = {value!r}".replace("'", '"') for name, value in server.items()),
        "",
        "[[providers]]",
        'name = "up"',
        'type = "openai"',
        f'base_url = "{upstream}"',
        "",
        "[[models]]",
        'name = "m"',
        'targets = [{ provider = "up", model = "gpt-4o-mini" }]',
    ]
    path = directory / "gateway.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


class Replica:
    """One `gateway serve` process (or the parent of `--workers N`)."""

    def __init__(self, config: Path, *extra: str) -> None:
        self.config = config
        self.extra = extra
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: asyncio.subprocess.Process | None = None
        self.log = b""  # what it wrote (logs) after its "listening" line

    async def start(self) -> Replica:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway", "serve", "--config", str(self.config),
            "--port", str(self.port), *self.extra,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            start_new_session=True,  # its own group: kill() reaches workers too
        )  # fmt: skip
        assert self.proc.stdout is not None
        said = b""  # (why it exited, if it does)
        async with asyncio.timeout(NEVER_HANG):
            while True:
                line = await self.proc.stdout.readline()
                said += line
                assert line, f"the gateway exited: {await self.proc.wait()}: {said[-2000:]!r}"
                if b"listening" in line:
                    break
        # The rest of its output (logs) is drained so it can never block on a full pipe.
        self._drain = asyncio.create_task(self._read_rest())
        return self

    async def _read_rest(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        while chunk := await self.proc.stdout.read(65536):
            self.log += chunk

    async def stop(self) -> int:
        """SIGTERM; its exit status once it has finished its work."""
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(NEVER_HANG):
            code = await self.proc.wait()
            await self._drain
        return code

    def kill(self) -> None:
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)


@contextlib.asynccontextmanager
async def replicas(config: Path, count: int, *extra: str) -> AsyncIterator[list[Replica]]:
    """`count` replicas, started at once (each is a Python process importing the gateway:
    one after another they took a second each); all killed at the end."""
    started = [Replica(config, *extra) for _ in range(count)]
    try:
        async with asyncio.TaskGroup() as group:
            for replica in started:
                group.create_task(replica.start())
        yield started
    finally:
        for replica in started:
            replica.kill()
            if replica.proc is not None:
                await replica.proc.wait()


async def create_key(database: Path | str, **fields: Any) -> str:
    async with opened_database(str(database)) as store:
        _, secret = await store.create_key(name="replicas", **fields)
    return secret


async def wait_known(session: ClientSession, urls: Sequence[str], secret: str) -> None:
    """Until every replica's key cache has the key (a look at /v1/models costs no limit)."""
    headers = {"Authorization": f"Bearer {secret}"}
    async with asyncio.timeout(NEVER_HANG):
        for url in urls:
            while True:
                async with session.get(f"{url}/v1/models", headers=headers) as resp:
                    if resp.status == 200:
                        break
                await asyncio.sleep(0.05)


async def usage_rows_pg(url: str) -> list[tuple[int, int, str]]:
    """(status, total_tokens, request_id) of every usage row in a PostgreSQL database."""
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch("SELECT status, total_tokens, request_id FROM usage")
    finally:
        await conn.close()
    return [(r[0], r[1], r[2]) for r in rows]


def usage_rows(database: Path) -> list[tuple[int, int]]:
    """(status, total_tokens) of every usage row."""
    with contextlib.closing(sqlite3.connect(database)) as conn:
        return list(conn.execute("SELECT status, total_tokens FROM usage"))


async def prefixes(url: str, count: int) -> set[str]:
    """The processes (request-id prefixes) that answered `count` fresh connections."""

    # Every request on a new connection, so the kernel hands each to whichever worker accepts.
    async def one(session: ClientSession) -> str:
        async with session.get(f"{url}/healthz") as resp:
            assert resp.status == 200
            return resp.headers["X-Request-ID"][:20]

    connector = TCPConnector(force_close=True)
    timeout = ClientTimeout(total=NEVER_HANG)
    async with ClientSession(connector=connector, timeout=timeout) as session:
        return set(await asyncio.gather(*(one(session) for _ in range(count))))


async def both_workers_serve(url: str) -> None:
    """Until both workers of `gateway serve --workers 2` answer on `url`: the parent is ready
    when one is, and a worker still starting takes no connection (requests sent before then
    all reach the other)."""
    async with asyncio.timeout(NEVER_HANG):
        while True:
            if len(await prefixes(url, 20)) == 2:
                return
            await asyncio.sleep(0.05)
