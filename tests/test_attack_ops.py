"""Attacks on the gateway's lifecycle and storage from outside, on a real `gateway serve`
process: answers finished while it stops, a second server started on the same port.

Each test starts the process on a free port with a database of its own, as an operator
would, and ends it by signal; what they assert is what docs/operations.md promises."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
from pathlib import Path
from typing import Any

from aiohttp import ClientSession, web

from gateway import cli
from tests.conftest import cli_key, free_port, start_serve
from tests.test_lifecycle import refused

HELLO = {"model": "up/x", "messages": [{"role": "user", "content": "hi"}]}
ANSWER = {
    "id": "c", "object": "chat.completion", "created": 1, "model": "x",
    "choices": [{"index": 0, "finish_reason": "stop",
                 "message": {"role": "assistant", "content": "hello"}}],
    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
}  # fmt: skip


class Upstream:
    """A fake OpenAI upstream whose answers wait until `release` is set; `arrived` is set
    once a request reached it."""

    def __init__(self) -> None:
        self.arrived, self.release = asyncio.Event(), asyncio.Event()
        self.runner: web.AppRunner | None = None

    async def _chat(self, request: web.Request) -> web.Response:
        self.arrived.set()
        await self.release.wait()
        return web.json_response(ANSWER)

    async def start(self) -> int:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", 0).start()
        port: int = self.runner.addresses[0][1]
        return port

    async def close(self) -> None:
        self.release.set()
        if self.runner is not None:
            await self.runner.cleanup()


def write_config(tmp_path: Path, up_port: int, server: str = "") -> Path:
    config = tmp_path / "gateway.toml"
    config.write_text(
        f'[server]\ndatabase = "{tmp_path / "keys.db"}"\n{server}\n'
        f'[[providers]]\nname = "up"\ntype = "openai"\nbase_url = "http://127.0.0.1:{up_port}/v1"\n'
    )
    return config


async def listening(proc: asyncio.subprocess.Process) -> None:
    assert proc.stderr is not None
    line = await proc.stderr.readline()
    assert b"listening" in line, line


async def ended(*procs: asyncio.subprocess.Process) -> None:
    for proc in procs:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def raw_request(port: int, secret: str) -> bytes:
    body = json.dumps(HELLO).encode()
    return (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Authorization: Bearer {secret}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


async def read_response(reader: asyncio.StreamReader) -> tuple[str, dict[str, str], bytes]:
    """One HTTP/1.1 response with a Content-Length: (status line, headers, body)."""
    head = (await reader.readuntil(b"\r\n\r\n")).decode()
    status, *lines = head.strip().split("\r\n")
    headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines)}
    body = await reader.readexactly(int(headers["content-length"]))
    return status, headers, body


async def test_an_answer_finished_during_the_stop_says_connection_close(
    tmp_path: Path, capsys: Any
) -> None:
    """A request in flight when SIGTERM comes is answered, but its keep-alive connection is
    closed right after: the answer must say so (`Connection: close`, RFC 9112 9.6). Without
    it a client reuses the connection for its next request, which the server never reads
    (a request pipelined behind it the same), and the client gets a disconnect instead of
    an answer for a request it cannot know was not taken."""
    up = Upstream()
    config = write_config(tmp_path, await up.start(), "shutdown_grace_seconds = 10\n")
    secret = await cli_key(tmp_path / "keys.db", capsys)
    port = free_port()
    proc = await start_serve(config, port, stdout=subprocess.DEVNULL)
    try:
        async with asyncio.timeout(60):
            await listening(proc)
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            # The second request is pipelined behind the first: accepted before the stop.
            writer.write(raw_request(port, secret) * 2)
            await up.arrived.wait()
            proc.send_signal(signal.SIGTERM)
            await refused(port)  # the stop began while the request was in flight
            up.release.set()
            status, headers, _ = await read_response(reader)
            assert status.startswith("HTTP/1.1 200"), status
            assert headers.get("connection", "").lower() == "close", headers
            assert await reader.read() == b""  # and the connection is closed indeed
            writer.close()
            assert await proc.wait() == 0
    finally:
        await ended(proc)
        await up.close()


async def test_a_second_server_that_cannot_bind_leaves_the_first_ones_pid_file(
    tmp_path: Path, capsys: Any
) -> None:
    """`gateway serve` started twice on one port and database (a supervisor restarting a
    server it thinks dead, an operator's second terminal): the second cannot bind and exits
    1. The pid file must still name the running server, or `gateway reload` finds none."""
    config = write_config(tmp_path, free_port())
    port = free_port()
    first = await start_serve(config, port, stdout=subprocess.DEVNULL)
    second = None
    try:
        async with asyncio.timeout(60):
            await listening(first)
            second = await start_serve(config, port, stdout=subprocess.DEVNULL)
            assert await second.wait() == 1
            assert second.stderr is not None
            assert b"cannot listen" in await second.stderr.read()
            pid_file = tmp_path / "keys.db.pid"
            assert pid_file.exists(), "the pid file of the running server is gone"
            assert pid_file.read_text().strip() == str(first.pid)
            argv = ["reload", "--db", str(tmp_path / "keys.db")]
            assert await asyncio.to_thread(cli.main, argv) == 0
            assert f"pid {first.pid}" in capsys.readouterr().out
            first.send_signal(signal.SIGTERM)
            assert await first.wait() == 0
    finally:
        await ended(first, *([second] if second else []))
    assert not (tmp_path / "keys.db.pid").exists()


async def test_usage_rows_are_not_written_into_a_deleted_database(
    tmp_path: Path, capsys: Any
) -> None:
    """The database file deleted under the running server (a cleanup script, `rm` in the
    wrong directory): its connection still writes into the unlinked file, which vanishes
    with the process. Rows written there are lost; the server must say so (the rows held,
    `usage_rows_lost`, exit 3) rather than stop with 0 as if they were stored."""
    up = Upstream()
    up.release.set()
    held = "usage_flush_seconds = 3600\nusage_batch_size = 1000\n"  # written only at the stop
    config = write_config(tmp_path, await up.start(), held)
    db = tmp_path / "keys.db"
    secret = await cli_key(db, capsys)
    port = free_port()
    proc = await start_serve(config, port, stdout=subprocess.PIPE)
    try:
        async with asyncio.timeout(60):
            await listening(proc)
            db.unlink()
            headers = {"Authorization": f"Bearer {secret}"}
            url = f"http://127.0.0.1:{port}/v1/chat/completions"
            async with ClientSession() as session:
                for _ in range(3):
                    async with session.post(url, json=HELLO, headers=headers) as resp:
                        assert resp.status == 200
            proc.send_signal(signal.SIGTERM)
            assert await proc.wait() == 3
            assert proc.stderr is not None and proc.stdout is not None
            err = await proc.stderr.read()
            assert b"gateway: 3 usage rows could not be written to the database" in err, err
            lines = [json.loads(x) for x in (await proc.stdout.read()).splitlines()]
            lost = next(x for x in lines if x["event"] == "usage_rows_lost")
            assert "deleted or replaced" in json.dumps(lost["exception"]), lost
    finally:
        await ended(proc)
        await up.close()
