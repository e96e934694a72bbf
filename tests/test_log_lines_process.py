"""`gateway serve` as a real process: request lines written once per loop turn are all there,
once each and whole, by the time it exits; a log reader that goes away does not take the
server down."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from pathlib import Path
from typing import Any

from aiohttp import ClientSession

from tests.conftest import cli_key, free_port, start_serve

HELLO = {"model": "demo", "messages": [{"role": "user", "content": "hi"}]}


async def _serve(tmp_path: Path, capsys: Any, stdout: int) -> tuple[Any, str, int]:
    port = free_port()
    db = tmp_path / "keys.db"
    config = tmp_path / "gateway.toml"
    config.write_text(f'[server]\ndatabase = "{db}"\n')
    secret = await cli_key(db, capsys)
    proc = await start_serve(config, port, stdout=stdout)
    assert proc.stderr is not None
    assert b"listening" in await proc.stderr.readline()
    return proc, secret, port


async def load(port: int, secret: str, count: int) -> list[int]:
    """`count` chat requests, 50 at a time over keep-alive connections; their statuses."""
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    headers = {"Authorization": f"Bearer {secret}"}
    statuses: list[int] = []
    async with ClientSession() as session:

        async def one() -> None:
            async with session.post(url, json=HELLO, headers=headers) as resp:
                await resp.read()
                statuses.append(resp.status)

        for start in range(0, count, 50):
            await asyncio.gather(*(one() for _ in range(min(50, count - start))))
    return statuses


async def test_every_request_line_is_written_once_and_whole_by_exit(
    tmp_path: Path, capsys: Any
) -> None:
    log = tmp_path / "out.log"
    with log.open("wb") as out:
        proc, secret, port = await _serve(tmp_path, capsys, out.fileno())
    try:
        async with asyncio.timeout(120):
            statuses = await load(port, secret, 1000)
            proc.send_signal(signal.SIGTERM)  # the last turn's lines are still buffered
            assert await proc.wait() == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert statuses == [200] * 1000
    events = [json.loads(line) for line in log.read_bytes().splitlines()]  # each one whole
    requests = [e for e in events if e["event"] == "request"]
    assert len(requests) == 1000
    assert len({e["request_id"] for e in requests}) == 1000  # none twice
    names = [e["event"] for e in events]
    assert names.index("serving") < names.index("request")  # in order with the other lines


async def test_a_log_reader_that_goes_away_does_not_stop_the_server(
    tmp_path: Path, capsys: Any
) -> None:
    read, write = os.pipe()
    try:
        proc, secret, port = await _serve(tmp_path, capsys, write)
    finally:
        os.close(write)
    os.close(read)  # the log reader is gone: every write to stdout is a broken pipe now
    try:
        async with asyncio.timeout(120):
            assert await load(port, secret, 500) == [200] * 500
            proc.send_signal(signal.SIGTERM)
            assert await proc.wait() == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
