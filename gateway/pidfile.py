"""The pid file of a running `gateway serve`, so that `gateway reload` can find the server.

It lives next to the database, as `<database>.pid`: every command already knows where the
database is (`--db`, or `server.database` of the config), and a database has one server.
For a URL (PostgreSQL's, shared by replicas, each on its own box; or one refused) it is
`gateway-<hash>.pid` in the working directory, the hash taken of the URL, so no password
appears in a file name.
`gateway serve` writes it once it listens on its port and removes it when it stops.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from gateway.dburl import is_url, redact

if TYPE_CHECKING:  # the reload command signals a server without loading the HTTP stack
    from aiohttp import web

__all__ = ["NoServer", "keep_pid_file", "pid_file", "pid_path", "signal_reload"]


class NoServer(Exception):
    """No running server could be signalled; the message says why, in one sentence."""


def pid_path(database: str) -> Path:
    if is_url(database):
        return Path(f"gateway-{hashlib.sha256(database.encode()).hexdigest()[:16]}.pid")
    return Path(f"{database}.pid")


def keep_pid_file(app: web.Application, database: str) -> Callable[[], None]:
    """The function that writes the pid file, to call once the server listens (a server
    that cannot bind its port must not take the file from the one that holds the port);
    the file is removed when `app` stops, if it is still this process's (a later server on
    the same database may own it by then)."""
    path = pid_path(database)

    def write() -> None:
        try:
            path.write_text(f"{os.getpid()}\n", encoding="ascii")
        except OSError as exc:  # serving matters more: `kill -HUP <pid>` still reloads
            print(
                f"gateway: cannot write {path} ({exc.strerror}); `gateway reload` will not "
                "find this server",
                file=sys.stderr,
            )

    async def remove(_: web.Application) -> None:
        with contextlib.suppress(OSError, ValueError):
            if int(path.read_text(encoding="ascii")) == os.getpid():
                path.unlink()

    app.on_cleanup.append(remove)
    return write


@contextlib.contextmanager
def pid_file(database: str) -> Iterator[None]:
    """The pid file of a process that serves no app itself (the parent of `--workers`)."""
    path = pid_path(database)
    with contextlib.suppress(OSError):
        path.write_text(f"{os.getpid()}\n", encoding="ascii")
    try:
        yield
    finally:
        with contextlib.suppress(OSError, ValueError):
            if int(path.read_text(encoding="ascii")) == os.getpid():
                path.unlink()


def _is_gateway(pid: int) -> bool:
    """Whether `pid` is a running gateway (a stale file may name a reused pid, and SIGHUP
    ends most programs)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        raise NoServer(f"process {pid} belongs to another user; cannot signal it") from None
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:  # no /proc here: the pid is all there is to go by
        return True
    return b"gateway" in cmdline


def signal_reload(database: str) -> int:
    """Send SIGHUP to the server of `database`, which re-reads its config; its pid.

    Raises:
        NoServer: no pid file, an unreadable one, or no gateway runs under its pid.
    """
    path = pid_path(database)
    try:
        text = path.read_text(encoding="ascii")
    except FileNotFoundError:
        raise NoServer(f"no running server found for {redact(database)} (no {path})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise NoServer(f"cannot read {path}: {exc}") from None
    try:
        pid = int(text.strip())
    except ValueError:
        raise NoServer(f"{path} does not hold a process id") from None
    if pid <= 0 or not _is_gateway(pid):
        raise NoServer(f"no gateway runs as process {pid} (a stale {path})")
    os.kill(pid, signal.SIGHUP)
    return pid
