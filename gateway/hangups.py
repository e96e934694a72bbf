"""SIGHUP in a `gateway serve` process: held back until the reload handler is in place, and
ignored once the server stops.

SIGHUP's default action ends a process. A server reloads on it (`gateway.reload`), but only
while its event loop runs: one that came during the start (`systemctl reload` right after a
start, or `gateway reload` forwarded to a worker of `--workers N` still starting) killed the
process, and one that came during a stop (when the queued usage rows are written, and the pid
file is still there for `gateway reload` to find) killed it too, losing those rows.

So `gateway serve` blocks SIGHUP first thing (`hold`): every thread and worker process it
starts inherits the block, and a SIGHUP sent meanwhile waits. Once the loop's handler is in
place (`take`) it is unblocked, and one that waited is delivered then: a reload asked during
the start is made, not lost. When the server stops (`stop_taking`), SIGHUP is ignored until
the process exits. A process that never called `hold` (a test's in-process app) keeps the
loop's plain add-and-remove.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Callable, Iterator

__all__ = ["held", "hold", "stop_taking", "take"]

_HUP = getattr(signal, "SIGHUP", None)  # (none on Windows)
_BLOCKS = _HUP is not None and hasattr(signal, "pthread_sigmask")
_held = False  # whether this process is a server that called `hold`


def hold() -> None:
    """Block SIGHUP in this thread and whatever it starts from now on (a `gateway serve`
    process, before anything else)."""
    global _held
    if _BLOCKS:
        assert _HUP is not None
        signal.pthread_sigmask(signal.SIG_BLOCK, {_HUP})
        _held = True


@contextlib.contextmanager
def held() -> Iterator[None]:
    """SIGHUP blocked for the block's length (a worker process started meanwhile inherits
    the block); one that came meanwhile is delivered after it."""
    if not _BLOCKS:
        yield
        return
    assert _HUP is not None
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {_HUP})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def take(loop: asyncio.AbstractEventLoop, handler: Callable[..., object], *args: object) -> bool:
    """Install `handler(*args)` for SIGHUP on `loop`, then let SIGHUP in (one that waited is
    delivered now). False where there is no SIGHUP."""
    if _HUP is None:
        return False
    loop.add_signal_handler(_HUP, handler, *args)
    if _held:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {_HUP})
    return True


def stop_taking(loop: asyncio.AbstractEventLoop) -> None:
    """Remove the loop's SIGHUP handler; in a server process, SIGHUP is then ignored until it
    exits. (Removing the handler puts the default action back, until the next call: SIGHUP is
    blocked in this thread first, so only a thread started while it was let in could take one
    in that moment.)"""
    if _HUP is None:
        return
    if not _held:
        loop.remove_signal_handler(_HUP)
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, {_HUP})
    loop.remove_signal_handler(_HUP)
    signal.signal(_HUP, signal.SIG_IGN)
