"""`gateway serve --workers N`: N processes serving one port, for more than one core.

The parent binds the listening socket and starts N workers that inherit it, rather than each
worker binding the port with SO_REUSEPORT: a bind error is reported once, before any worker
starts; `--port 0` works; and every connection waits in the one socket's queue until some
worker accepts it, so a worker that dies or restarts drops none of them (with SO_REUSEPORT the
kernel fills one queue per socket, and the connections queued for a dead worker are reset).

The parent serves nothing itself. It forwards SIGTERM and SIGINT to every worker (each
finishes its requests within `shutdown_grace_seconds`, then exits) and exits once they all
have; SIGHUP is forwarded too, so each re-reads the config. A worker that dies while the
others serve is started again; one that dies within its first seconds (a config or database
problem every worker would meet) stops them all instead, and the parent exits 1. The pid file
names the parent, so `gateway reload` reaches every worker.

More than one worker needs `[server] redis_url`: each worker would otherwise count limits and
budgets of its own, and a budget would be spent once per worker.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Sequence

import structlog

from gateway.settings import ServerSettings

__all__ = ["needs_redis", "supervise"]

log = structlog.get_logger(__name__)

# A worker that exits sooner than this after its start failed to start; restarting it would
# only fail again.
START_SECONDS = 5.0
_RESTART_DELAY = 1.0


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
    command = [sys.executable, "-m", "gateway", *argv, "--worker-fd", str(sock.fileno())]
    return asyncio.run(_supervise(sock, command, workers, announce))


async def _supervise(
    sock: socket.socket, command: list[str], workers: int, announce: Callable[[], None]
) -> int:
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    procs: dict[int, asyncio.subprocess.Process] = {}
    started: dict[int, float] = {}

    def forward(sig: int) -> None:
        for proc in procs.values():
            if proc.returncode is None:
                proc.send_signal(sig)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    loop.add_signal_handler(signal.SIGHUP, forward, signal.SIGHUP)

    async def start(index: int) -> None:
        procs[index] = await asyncio.create_subprocess_exec(*command, pass_fds=(sock.fileno(),))
        started[index] = time.monotonic()
        log.info("worker_started", worker=index, pid=procs[index].pid)

    for index in range(workers):
        await start(index)
    announce()
    failed = False
    stop = asyncio.create_task(stopping.wait())
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
            if time.monotonic() - started[index] < START_SECONDS:
                failed = True
                stopping.set()
                break
            await asyncio.sleep(_RESTART_DELAY)  # a worker that crashes at once cannot spin
            if not stopping.is_set():
                await start(index)
    forward(signal.SIGTERM)
    codes = [await proc.wait() for proc in procs.values()]
    sock.close()
    return 1 if failed or any(code not in (0, -signal.SIGTERM) for code in codes) else 0


def worker_socket(fd: int) -> socket.socket:
    """The listening socket a worker inherited from its parent."""
    sock = socket.socket(fileno=fd)
    os.set_inheritable(fd, False)
    return sock
