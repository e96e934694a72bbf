"""SIGHUP in a `gateway serve` process: held back until the reload handler is in place, and
ignored once the server stops.

SIGHUP's default action ends a process. A server reloads on it (`gateway.reload`), but only
while its event loop runs: one that came during the start (`systemctl reload` right after a
start, or `gateway reload` forwarded to a worker of `--workers N` still starting) killed the
process, and one that came during a stop (when the queued usage rows are written, and the pid
file is still there for `gateway reload` to find) killed it too, losing those rows.

So a `gateway serve` process blocks SIGHUP as soon as the package is imported (`hold`, from
`gateway/__init__.py`; again in `cli._serve`, for a serve run in-process): every thread and
worker process it starts inherits the block, and a SIGHUP sent meanwhile waits. Once the
reload handler is in place (`take`) it is unblocked, and one that waited is delivered then: a
reload asked during the start is made, not lost. When the server stops (`stop_taking`),
SIGHUP is ignored until the process exits. SIGHUP's disposition never goes back to the default
in between: the handler is a plain `signal.signal` handler that hands the signal to the loop,
not the loop's own (`add_signal_handler`), which every removal, and the loop's close, set
back to the default, when a thread started meanwhile (uvloop's, the executor's) may take it.

The stop signals live here too. SIGTERM and SIGINT are also taken from the flag Python keeps
for each signal (`stop_on`), so a stream of SIGHUPs that fills the loop's wakeup socket does
not lose them. Once the stop is done they are ignored until exit (`stopped`), so a second
Ctrl-C does not turn the exit status into a death by signal.
"""

from __future__ import annotations

import contextlib
import signal
import sys
from collections.abc import Callable, Iterator
from types import FrameType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import asyncio

__all__ = [
    "held",
    "hold",
    "holding",
    "serving_from_argv",
    "stop_on",
    "stop_taking",
    "stopped",
    "take",
]

_HUP = getattr(signal, "SIGHUP", None)  # (none on Windows)
_BLOCKS = _HUP is not None and hasattr(signal, "pthread_sigmask")
_held = False  # whether this process holds SIGHUP for a server


def serving_from_argv() -> bool:
    """Whether this process runs `gateway serve` (its command line: `gateway serve ...` or
    `python -m gateway serve ...`; the command comes first, its options after it)."""
    return len(sys.argv) > 1 and sys.argv[1] == "serve"


def hold() -> None:
    """Block SIGHUP in this thread and whatever it starts from now on."""
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


@contextlib.contextmanager
def holding() -> Iterator[None]:
    """`hold` for the block's length (`cli._serve`). After it, the mask is what it was: in a
    server process, blocked already (and SIGHUP ignored once the server ran); in a test that
    runs the command in-process, as before."""
    global _held
    was_held = _held
    with held():
        _held = _BLOCKS
        try:
            yield
        finally:
            _held = was_held


def take(loop: asyncio.AbstractEventLoop, handler: Callable[..., object], *args: object) -> None:
    """Run `handler(*args)` on `loop` on each SIGHUP, then let SIGHUP in (one that waited is
    delivered now). Called on the main thread, as `signal.signal` must be."""
    if _HUP is None:
        return

    due = False  # a call is on its way to the loop: more SIGHUPs until it runs are one

    def run() -> None:
        nonlocal due
        due = False
        handler(*args)

    def on_hup(signum: int, frame: FrameType | None) -> None:
        # A signal handler runs between two bytecodes of the main thread: whatever it raised
        # would be raised there. A loop that closed takes no more (the process is stopping).
        nonlocal due
        if due:
            return
        due = True
        try:
            loop.call_soon_threadsafe(run)
        except Exception:
            due = False

    signal.signal(_HUP, on_hup)
    if _held:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {_HUP})


def stop_taking() -> None:
    """No more reloads: in a server process SIGHUP is ignored until it exits (elsewhere, a
    test's in-process app, it gets its default action back)."""
    if _HUP is not None:
        signal.signal(_HUP, signal.SIG_IGN if _held else signal.SIG_DFL)


def stop_on(loop: asyncio.AbstractEventLoop, sig: int, stop: Callable[[], object]) -> None:
    """`stop()` on `loop` when `sig` (SIGTERM, SIGINT) comes, even in a stream of SIGHUPs.

    The loop's own handler learns of a signal by a byte on its wakeup socket, and that byte
    is dropped when the socket is full: a stream of SIGHUPs filled it, and the `--workers`
    parent (always asyncio's loop) never learnt of the SIGTERM in its middle. A handler of
    ours runs on the flag CPython keeps for each signal, byte or not; the loop's handler
    stays too (its byte wakes a loop asleep in `select` at once)."""
    loop.add_signal_handler(sig, stop)

    def on_signal(signum: int, frame: FrameType | None) -> None:
        with contextlib.suppress(Exception):  # (a closed loop: the process is stopping)
            loop.call_soon_threadsafe(stop)

    signal.signal(sig, on_signal)


_STOPS = (signal.SIGINT, signal.SIGTERM)
# What CPython writes (as an "unraisable" error, with a traceback) for a signal that came
# between its check of pending signals and its change of the handler, when it finds the
# handler set to ignore it by the time it looks.
_RACED = frozenset(f"Signal {int(sig)} ignored due to race condition" for sig in _STOPS)


def stopped(loop: asyncio.AbstractEventLoop) -> None:
    """The stop is done (what was in flight finished, the usage rows written): SIGINT and
    SIGTERM are ignored until the process exits. The loop's close would set them back to their
    defaults, and a second Ctrl-C or a repeated SIGTERM then ended the process by signal
    (-2, -15) instead of its exit status (0, or 3 for lost usage rows). Ignored first, so
    only the moment inside `remove_signal_handler` has the default.

    A stop signal that lands inside one of these changes is ignored too, quietly: CPython
    reports one that came between its look for pending signals and the new handler as a
    traceback on stderr ("Signal 2 ignored due to race condition", `_quiet_raced_stops`), and
    a Ctrl-C in the moment Python's own SIGINT handler is back raises KeyboardInterrupt."""
    sys.unraisablehook = _quiet_raced_stops(sys.unraisablehook)
    for sig in _STOPS:
        signal.signal(sig, signal.SIG_IGN)
        with contextlib.suppress(KeyboardInterrupt):
            loop.remove_signal_handler(sig)
        while True:
            try:
                signal.signal(sig, signal.SIG_IGN)
                break
            except KeyboardInterrupt:  # (one that came in the moment above: ignored, as meant)
                continue


def _quiet_raced_stops(
    previous: Callable[[sys.UnraisableHookArgs], object],
) -> Callable[[sys.UnraisableHookArgs], object]:
    """`previous`, but silent on CPython's report of a stop signal ignored in a race (`_RACED`)
    once the stop signals are ignored: it was ignored, as every later one is."""

    def hook(unraisable: sys.UnraisableHookArgs) -> None:
        exc = unraisable.exc_value
        if isinstance(exc, OSError) and str(exc) in _RACED:
            return
        previous(unraisable)

    return hook
