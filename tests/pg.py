"""A throw-away PostgreSQL server for tests: initdb in a temp dir, a free port, no system service.

The binaries come from the distribution's packages (`.ci/run` installs `postgresql`). initdb
refuses to run as root, so under root the server runs as the `postgres` user (or `nobody`).
Without the binaries, the tests that need the server skip, saying why.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import free_port

__all__ = ["PgServer", "find_pg_bin"]

_START_TRIES = 5


def find_pg_bin() -> Path | None:
    """The directory holding initdb and pg_ctl: on PATH, else Debian's newest version."""
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return Path(os.path.realpath(found)).parent
    versions = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: (
            int(Path(p).parent.parent.name) if Path(p).parent.parent.name.isdigit() else 0
        ),
    )
    return Path(versions[-1]).parent if versions else None


def _run_as() -> str | None:
    """The user to run the server as: None (ourselves) unless we are root."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            pwd.getpwnam(name)
        except KeyError:
            continue
        return name
    return None


class PgServer:
    """One PostgreSQL server in a temporary directory, listening on 127.0.0.1:`port`."""

    def __init__(self, bin_dir: Path) -> None:
        self.bin = bin_dir
        self.user = _run_as()
        self.dir = Path(tempfile.mkdtemp(prefix="kiosk-pg-"))
        self.data = self.dir / "data"
        self.port = free_port()
        if self.user is not None:
            entry = pwd.getpwnam(self.user)
            os.chown(self.dir, entry.pw_uid, entry.pw_gid)
        self._command("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres",
                      "-E", "UTF8", "--locale=C", "--no-sync")  # fmt: skip

    @property
    def admin_url(self) -> str:
        return self.url("postgres")

    def url(self, database: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def _command(self, tool: str, *args: str) -> None:
        argv = [str(self.bin / tool), *args]
        if self.user is not None:
            argv = ["runuser", "-u", self.user, "--", *argv]
        subprocess.run(argv, check=True, capture_output=True, cwd=self.dir, timeout=120)  # noqa: S603 - PostgreSQL's own tools

    def start(self) -> None:
        """Start it; on a port another process took between `free_port` and the bind (tests
        run in parallel), again on another."""
        for attempt in range(_START_TRIES):
            (self.dir / "log").unlink(missing_ok=True)  # (what this try says, alone)
            options = (
                f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off"
                " -c synchronous_commit=off -c full_page_writes=off -c max_connections=200"
            )
            try:
                self._command("pg_ctl", "-D", str(self.data), "-o", options, "-l",
                              str(self.dir / "log"), "-w", "-t", "60", "start")  # fmt: skip
                return
            except subprocess.CalledProcessError:
                log = self.dir / "log"
                taken = log.exists() and "Address already in use" in log.read_text(
                    "utf-8", "replace"
                )
                if not taken or attempt == _START_TRIES - 1:
                    raise
                self.port = free_port()

    def stop(self, mode: str = "fast") -> None:
        self._command("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")

    def _processes(self) -> list[int]:
        """The postmaster and its children (backends, writers), read from /proc."""
        try:
            postmaster = int((self.data / "postmaster.pid").read_text().split()[0])
        except FileNotFoundError:  # (not running: never started, or stopped)
            return []
        found = [postmaster]
        for stat in Path("/proc").glob("[0-9]*/stat"):
            with contextlib.suppress(OSError, ValueError, IndexError):
                # The fields after the command name (which may hold spaces) start at ")".
                if int(stat.read_text().rpartition(")")[2].split()[1]) == postmaster:
                    found.append(int(stat.parent.name))
        return found

    def pause(self) -> None:
        """Freeze the server (SIGSTOP): connections stay open and nothing answers."""
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal(signal.SIGCONT)

    def _signal(self, sig: int) -> None:
        for pid in self._processes():
            # A backend may end between the look in /proc and the signal (a fresh clone's CI
            # run met it once, at the session's end).
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    def destroy(self) -> None:
        """Stop the server if it runs (a failed test may have left it stopped or frozen) and
        delete it."""
        self.resume()
        with contextlib.suppress(subprocess.CalledProcessError):
            self.stop("immediate")
        shutil.rmtree(self.dir, ignore_errors=True)


@contextlib.contextmanager
def own_server() -> Iterator[PgServer]:
    """A started PostgreSQL server, destroyed after; the test skips (saying why) where none is
    installed."""
    bin_dir = find_pg_bin()
    if bin_dir is None:
        pytest.skip("PostgreSQL is not installed (no initdb/pg_ctl; `apt-get install postgresql`)")
    server = PgServer(bin_dir)
    try:
        server.start()
        yield server
    finally:
        server.destroy()
