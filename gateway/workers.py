"""`gateway serve --workers N`: N processes serving one port, for more than one core.

The parent binds the listening socket and starts N workers that inherit it, rather than each
worker binding the port with SO_REUSEPORT: a bind error is reported once, before any worker
starts; `--port 0` works; and every connection waits in the one socket's queue until some
worker accepts it, so a worker that dies or restarts drops none of them (with SO_REUSEPORT the
kernel fills one queue per socket, and the connections queued for a dead worker are reset).

The parent serves nothing itself. It forwards SIGTERM and SIGINT to every worker (each
finishes its requests within `shutdown_grace_seconds`, then exits) and exits once they all
have; SIGHUP is forwarded too, so each re-reads the config (held until every worker serves,
and each worker starts with it blocked, so none dies of one that came early:
`gateway.hangups`). The parent says it listens once
every worker serves; a worker that exits before that (a config or database problem every
worker would meet) stops them all, and the parent exits 1. Later, a worker that dies is
started again a second later while the others serve. Workers stop on their own when the
parent dies (they watch a pipe only it holds open). The pid file names the parent, so
`gateway reload` reaches every worker.

More than one worker needs `[server] redis_url`: each worker would otherwise count limits and
budgets of its own, and a budget would be spent once per worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import structlog

from gateway import hangups
from gateway.settings import ServerSettings

if TYPE_CHECKING:  # `gateway keys ...` imports this module without the HTTP stack
    from aiohttp import web

__all__ = ["needs_redis", "supervise"]

log = structlog.get_logger(__name__)

_RESTART_DELAY = 1.0  # a worker that keeps crashing is restarted once a second, not in a loop


def needs_redis(server: ServerSettings, workers: int) -> str | None:
    """Why `workers` processes cannot run on these settings, in one line (or None)."""
    if workers > 1 and server.redis_url is None:
        return (
            f"--workers {workers} needs [server] redis_url: without it each worker would keep "
            "its own rate limits and budgets"
        )
    return None


def listen(host: str, port: int) -> socket.socket:
    """The listening socket the workers share (inherited across exec)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.create_server((host, port), family=family, backlog=1024)
    sock.set_inheritable(True)
    return sock


def supervise(
    sock: socket.socket, argv: Sequence[str], workers: int, announce: Callable[[], None]
) -> int:
    """Run `workers` copies of `gateway <argv> --worker-fd <fd>` on `sock` until a signal
    stops them; the exit status (0: every worker stopped cleanly)."""
    # Workers inherit the read end of a pipe whose write end only this process holds: when it
    # dies, even by SIGKILL, they read EOF and stop (see `watch_parent`).
    # And the write end of one more, where each writes a byte once it serves.
    watch, alive = os.pipe()
    ready, serving = os.pipe()
    fds = f"{sock.fileno()},{watch},{serving}"
    command = [sys.executable, "-m", "gateway", *argv, "--worker-fd", fds]
    try:
        return asyncio.run(_supervise(sock, command, workers, announce, (watch, serving), ready))
    finally:
        for fd in (watch, alive, ready, serving):
            os.close(fd)


async def _supervise(
    sock: socket.socket,
    command: list[str],
    workers: int,
    announce: Callable[[], None],
    passed: tuple[int, int],
    ready: int,
) -> int:
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    procs: dict[int, asyncio.subprocess.Process] = {}

    def forward(sig: int) -> None:
        for proc in procs.values():
            if proc.returncode is None:
                proc.send_signal(sig)

    for sig in (signal.SIGTERM, signal.SIGINT):
        hangups.stop_on(loop, sig, stopping.set)

    async def start(index: int) -> None:
        # A worker starts with SIGHUP blocked, as this process has it: one forwarded before
        # the worker can reload waits for it instead of ending it (gateway.hangups).
        with hangups.held():
            procs[index] = await asyncio.create_subprocess_exec(
                *command, pass_fds=(sock.fileno(), *passed)
            )
        log.info("worker_started", worker=index, pid=procs[index].pid)

    for index in range(workers):
        await start(index)
    stop = asyncio.create_task(stopping.wait())
    failed = not await _all_ready(ready, workers, stop, procs)
    if failed:
        stopping.set()
    else:
        # SIGHUP was held until every worker serves: one that came meanwhile is forwarded now.
        hangups.take(loop, forward, signal.SIGHUP)
        announce()
    while not stopping.is_set():
        waits = {asyncio.create_task(p.wait()): i for i, p in procs.items()}
        done, _ = await asyncio.wait([stop, *waits], return_when=asyncio.FIRST_COMPLETED)
        for task in waits:
            task.cancel()
        for task in done:
            if task is stop or stopping.is_set():
                continue
            index = waits[task]
            proc = procs[index]
            log.warning("worker_exited", worker=index, pid=proc.pid, status=proc.returncode)
            await asyncio.sleep(_RESTART_DELAY)  # a worker that crashes at once cannot spin
            if not stopping.is_set():
                await start(index)
    hangups.stop_taking()
    forward(signal.SIGTERM)
    codes = [await proc.wait() for proc in procs.values()]
    hangups.stopped(loop)
    sock.close()
    return 1 if failed or any(code not in (0, -signal.SIGTERM) for code in codes) else 0


async def _all_ready(
    ready: int, workers: int, stop: asyncio.Task[Any], procs: dict[int, Any]
) -> bool:
    """Wait until every worker serves (False: one exited first, or a signal came)."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    transport, _ = await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(os.dup(ready), "rb", 0)
    )
    try:
        count = asyncio.create_task(reader.readexactly(workers))
        exits = [asyncio.create_task(p.wait()) for p in procs.values()]
        await asyncio.wait([count, stop, *exits], return_when=asyncio.FIRST_COMPLETED)
        for task in (count, *exits):
            task.cancel()
        return count.done() and not count.cancelled() and count.exception() is None
    finally:
        transport.close()


def worker_fds(text: str) -> tuple[int, int, int]:
    """`--worker-fd SOCKET,WATCH,READY`: the listening socket and the parent's two pipes."""
    sock, watch, ready = (int(part) for part in text.split(","))
    return sock, watch, ready


def worker_ready(fd: int) -> None:
    """Tell the parent this worker serves."""
    with contextlib.suppress(OSError):
        os.write(fd, b"1")
        os.close(fd)


def worker_socket(fd: int) -> socket.socket:
    """The listening socket a worker inherited from its parent."""
    sock = socket.socket(fileno=fd)
    os.set_inheritable(fd, False)
    return sock


def watch_parent(app: web.Application, fd: int) -> None:
    """Once `app` runs, stop it (as SIGTERM does) when the parent's pipe closes: the parent
    died, and a worker must not serve on alone, out of its control."""
    os.set_inheritable(fd, False)

    def parent_gone() -> None:
        with contextlib.suppress(BlockingIOError):
            if os.read(fd, 1):
                return
        asyncio.get_running_loop().remove_reader(fd)
        log.warning("worker_parent_gone", pid=os.getpid())
        os.kill(os.getpid(), signal.SIGTERM)

    async def start(_: web.Application) -> None:
        os.set_blocking(fd, False)
        asyncio.get_running_loop().add_reader(fd, parent_gone)

    app.on_startup.append(start)
