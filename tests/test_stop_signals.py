"""A second Ctrl-C, or a SIGTERM repeated, while `gateway serve` stops: the process still
exits with its own status (0 here), not killed by the signal. The loop's close set SIGINT and
SIGTERM back to their defaults, so one that came after it ended the process (-2, -15), and
for a single server could hide exit status 3 (usage rows lost). Found by an attack on the
stop path (2026-12-06); `gateway.hangups.stopped`."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import free_port, start_serve
from tests.test_reload_signals import _two_workers

# Sends a signal to a pid every 2 ms until the pid is gone.
_REPEAT = """
import os, sys, time
pid, sig = int(sys.argv[1]), int(sys.argv[2])
try:
    while True:
        os.kill(pid, sig)
        time.sleep(0.002)
except ProcessLookupError:
    pass
"""


async def _stopped_by_repeats(proc: asyncio.subprocess.Process, sig: int) -> tuple[int, bytes]:
    """Once `proc` listens, send it `sig` every 2 ms until it exits: its status and stderr."""
    assert proc.stderr is not None
    async with asyncio.timeout(60):
        assert b"listening" in await proc.stderr.readline()
        repeat = await asyncio.create_subprocess_exec(
            sys.executable, "-c", _REPEAT, str(proc.pid), str(int(sig))
        )
        err = await proc.stderr.read()
        status = await proc.wait()
        await repeat.wait()
    return status, err


@pytest.mark.parametrize("uvloop", [True, False])
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
async def test_a_stop_signal_repeated_until_the_server_exits_leaves_its_status(
    tmp_path: Path, uvloop: bool, sig: int
) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text(
        f'[server]\ndatabase = "{tmp_path / "keys.db"}"\nuvloop = {str(uvloop).lower()}\n'
    )
    proc = await start_serve(config, free_port(), stdout=subprocess.DEVNULL)
    try:
        status, err = await _stopped_by_repeats(proc, sig)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert b"Traceback" not in err, err.decode()[-2000:]
    assert status == 0, (status, err.decode()[-2000:])  # (its stderr: once seen failing)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
async def test_a_stop_signal_repeated_until_the_workers_parent_exits_leaves_its_status(
    tmp_path: Path, redis_url: str, sig: int
) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text(f'[server]\ndatabase = "{tmp_path / "keys.db"}"\nredis_url = "{redis_url}"\n')
    async with _two_workers(config, free_port()) as proc:
        status, err = await _stopped_by_repeats(proc, sig)
    assert b"Traceback" not in err, err.decode()[-2000:]
    assert status == 0, (status, err.decode()[-2000:])


# After `hangups.stopped`, CPython's report of a stop signal that landed between its look for
# pending signals and the change to "ignored" (as it came once in 50-odd runs of the test
# above, a traceback on stderr) says nothing; any other unraisable error is still reported.
_RACED_REPORTS = """
import asyncio, signal, sys
from gateway import hangups

loop = asyncio.new_event_loop()
for sig in (signal.SIGINT, signal.SIGTERM):
    loop.add_signal_handler(sig, lambda: None)
hangups.stopped(loop)
assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN


class Raises:  # its `__del__` error is "unraisable": reported through sys.unraisablehook
    def __init__(self, message):
        self.message = message

    def __del__(self):
        raise OSError(self.message)


for message in (
    "Signal 2 ignored due to race condition",
    "Signal 15 ignored due to race condition",
    "Signal 10 ignored due to race condition",
    "something else",
):
    Raises(message)
loop.close()
"""


def test_a_stop_signal_ignored_in_a_race_is_not_reported_once_stopped() -> None:
    done = subprocess.run(  # noqa: S603 - our own interpreter and script
        [sys.executable, "-c", _RACED_REPORTS], capture_output=True, timeout=60, check=False
    )
    err = done.stderr.decode()
    assert done.returncode == 0, err
    assert "Signal 2 " not in err and "Signal 15 " not in err
    assert "Signal 10 ignored due to race condition" in err  # not a stop signal: reported
    assert "something else" in err
