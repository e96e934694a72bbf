"""structlog set-up: one JSON object per line on stdout, encoded with msgspec.

Called once from the CLI, never at import, so tests can use `structlog.testing.capture_logs()`.
aiohttp's own stdlib loggers go through the same renderer so every line has one shape.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from collections.abc import MutableMapping
from typing import Any, BinaryIO, cast

import msgspec
import structlog
import structlog.tracebacks

__all__ = [
    "FailureStreak",
    "RequestLine",
    "configure_logging",
    "flush_lines",
    "info_line",
    "request_line",
]

# Not the shared codec.ENCODER: log events may hold any object (an exception, a path), which
# this one writes as its str() instead of failing.
_ENCODER = msgspec.json.Encoder(enc_hook=str)


def _serialize(obj: Any, **_: Any) -> bytes:
    # JSONRenderer passes `default=`, which msgspec does not take; enc_hook does its job.
    return _ENCODER.encode(obj)


# ".000Z" to ".999Z": a timestamp's end, looked up rather than formatted on every line (a
# format spec is parsed on each use: about 5,000 instructions a request).
_MILLIS = tuple(f".{ms:03d}Z" for ms in range(1000))


class _UTCTimestamp:
    """ISO-8601 UTC timestamps with milliseconds, formatting the date part once per second."""

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""

    def __call__(
        self, _: Any, __: str, event: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        event["timestamp"] = self.now()
        return event

    def now(self) -> str:
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second = second
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return self._prefix + _MILLIS[int((now - second) * 1000)]


class RequestLine(msgspec.Struct, kw_only=True):
    """The canonical line of a request (`middleware._finish`), field for field and in the
    order structlog writes it (tests check it). A Struct rather than a dict: encoded with
    its field names made once, without a dict built, copied and extended per request
    (about 20,000 instructions a request)."""

    event: str = "request"
    request_id: str
    key_id: str | None
    model: str | None
    provider: str | None
    upstream_model: str | None
    stream: bool
    status: int
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cost_usd: float
    latency_ms: float
    ttft_ms: float | None
    estimated: bool
    cache_read_tokens: int
    cache_write_tokens: int
    uid: str | None
    attempts: list[dict[str, object]] | msgspec.UnsetType = msgspec.UNSET  # when there were
    method: str
    path: str
    level: str = "info"
    timestamp: str = ""  # set as it is written


# While something retried at every poll keeps failing, how often the log says so again.
FAILURE_REPEAT_SECONDS = 60.0


class FailureStreak:
    """Failures in a row of something retried at every poll (each second, in each worker: the
    database down): the log says so at the first, then once every `FAILURE_REPEAT_SECONDS`,
    and once more when it works again, rather than at every poll."""

    __slots__ = ("_every", "_logged", "failures")

    def __init__(self) -> None:
        self._every = FAILURE_REPEAT_SECONDS
        self._logged = 0.0
        self.failures = 0

    def failed(self) -> bool:
        """Count a failure; whether to log this one (the first, then one each period)."""
        self.failures += 1
        now = time.monotonic()
        if self.failures == 1 or now - self._logged >= self._every:
            self._logged = now
            return True
        return False

    def ended(self) -> int:
        """It worked: how many failures in a row that ends (0: none)."""
        ended, self.failures = self.failures, 0
        return ended


_PIPE_BUF = 4096  # POSIX's least PIPE_BUF (Linux's is 4096)
_MAX_HELD = 1 << 20  # what waits for a stalled reader of a non-blocking stdout


class _Descriptor:
    """stdout's descriptor written in whole lines, with a buffer of our own: under `python -u`
    or PYTHONUNBUFFERED=1 (set in many container images) `sys.stdout.buffer` is the raw file,
    so every request's line was a write system call of its own (about 7 % of the gateway's CPU
    per request at concurrency 32 here) instead of one for the lines of a turn of the loop
    (`_Flushing`).

    Never a torn line: on a non-blocking stdout whose reader stalls, a write that the pipe
    cannot take (EAGAIN) or takes only in part keeps what is left, in order, for the next flush
    (a BufferedWriter keeps part of a line and drops the rest); past `_MAX_HELD` waiting, new
    lines are dropped whole. Each write is whole lines of at most PIPE_BUF bytes (a longer line
    alone), which POSIX writes to a pipe in one piece. The descriptor is never closed."""

    __slots__ = ("_fd", "_held")

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._held = bytearray()

    def write(self, data: bytes) -> None:
        if len(self._held) + len(data) <= _MAX_HELD:
            self._held += data

    def flush(self) -> None:
        held = self._held
        while held:
            size = len(held)
            if size > _PIPE_BUF:
                size = held.rfind(b"\n", 0, _PIPE_BUF) + 1 or held.find(b"\n") + 1 or size
            try:
                written = os.write(self._fd, held[:size])
            except BlockingIOError:
                return  # the reader stalled: kept for the next flush
            except OSError:
                held.clear()  # closed or broken (a log reader gone): lost, as documented
                raise
            del held[:written]


def _stdout() -> BinaryIO:
    """Where the lines go: stdout's descriptor (`_Descriptor`); a stdout with none (a test's
    capture) as it is; nowhere when the process started with no stdout (descriptor 1 closed)."""
    if sys.stdout is None:
        return open(os.devnull, "wb")  # (lives as long as the process)
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, ValueError, OSError):  # (io.UnsupportedOperation is an OSError)
        return sys.stdout.buffer
    sys.stdout.flush()  # what was printed before comes first
    return cast(BinaryIO, _Descriptor(fd))


class _Flushing:
    """Lines written to a buffered stream and flushed once per turn of the event loop: under
    load, the request lines of one turn share one write to the file or pipe instead of a
    write each. Outside a running loop (the CLI), each line is flushed at once, as
    structlog's BytesLogger does. Other log lines flush the same stream, so the order holds.

    One write holds at most PIPE_BUF bytes (4 KiB) of whole lines, which POSIX writes to a
    pipe in one piece: the processes of `gateway serve --workers N` share one stdout, and
    their lines must not interleave mid-line.

    Lossy: a closed or broken stdout (a log reader gone: EPIPE) loses the line; the request or
    the server start that wrote it goes on."""

    __slots__ = ("_held", "_pending", "_stream")

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream
        self._pending: asyncio.AbstractEventLoop | None = None  # where a flush is due
        self._held = 0  # bytes written since the last flush

    def __call__(self, data: bytes, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Write `data`; `loop`: the running loop, when the caller knows it (a request's line:
        asking for it costs a getpid system call on Python 3.11)."""
        if self._held and self._held + len(data) > _PIPE_BUF:
            self._flush()  # what is held first (a line over PIPE_BUF then goes alone)
        self._held += len(data)
        try:  # noqa: SIM105 - cheaper than contextlib.suppress, see above
            self._stream.write(data)
        except (ValueError, OSError):
            pass
        if loop is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                self.flush()
                return
        if self._pending is not loop:  # (a loop that closed before its flush ran: anew)
            self._pending = loop
            loop.call_soon(self.flush)

    def flush(self) -> None:
        """Write out what is buffered (also called when the server stops)."""
        self._pending = None
        self._flush()

    def _flush(self) -> None:
        self._held = 0
        try:  # noqa: SIM105 - cheaper than contextlib.suppress, see above
            self._stream.flush()
        except (ValueError, OSError):
            pass


class _Direct:
    """The request line's short way to stdout: what structlog's chain would write (event,
    context variables, fields, level, timestamp) as one msgspec encode and one write,
    without a processor call per step. Only installed by `configure_logging`."""

    __slots__ = ("_processors", "_stamp", "_write")

    def __init__(self, write: _Flushing, processors: list[Any]) -> None:
        self._stamp = _UTCTimestamp()
        self._write = write
        self._processors = processors

    def active(self) -> bool:
        """Whether structlog still runs the chain this stands in for (not, e.g., after
        `reset_defaults()` or inside `capture_logs()`)."""
        return structlog.get_config()["processors"] is self._processors

    def __call__(self, event: str, fields: dict[str, Any]) -> None:
        # The gateway binds only `request_id` and `key_id` to the context, and the request
        # line's fields carry both, first and in that order: merging the context (a walk of
        # every context variable) would change nothing in the line.
        line: dict[str, Any] = {"event": event}
        line.update(fields)
        line["level"] = "info"
        self._stamp(None, "", line)
        self._write(_ENCODER.encode(line) + b"\n")

    def request(self, line: RequestLine, loop: asyncio.AbstractEventLoop | None = None) -> None:
        line.timestamp = self._stamp.now()
        self._write(_ENCODER.encode(line) + b"\n", loop)

    def flush(self) -> None:
        self._write.flush()


class _Lines:
    """The file structlog's BytesLogger and the stdlib's handler write to: the request lines'
    `_Flushing`, so that every line goes through one buffer, in order, in writes of whole
    lines of at most PIPE_BUF (a line written at once takes what is held along, within that
    bound), and is lost rather than failing what wrote it when stdout is closed or broken (a
    log reader gone: EPIPE). Theirs are out at once: they flush after each line."""

    __slots__ = ("__weakref__", "_lines", "_text")  # (structlog keeps a lock per file, weakly)

    def __init__(self, lines: _Flushing, *, text: bool = False) -> None:
        self._lines = lines
        self._text = text  # the stdlib's handler writes str

    def write(self, data: Any) -> None:
        self._lines(data.encode() if self._text else data)

    def flush(self) -> None:
        self._lines.flush()


_direct: _Direct | None = None
_info = True  # info lines are written at the configured level


def info_line(logger: Any, event: str, fields: dict[str, Any]) -> None:
    """`logger.info(event, **fields)`, the short way once `configure_logging` has set logging
    up (the line of every request, where microseconds add up); through structlog otherwise (tests
    capture it there)."""
    if _direct is not None and _direct.active():
        if _info:
            _direct(event, fields)
    else:
        logger.info(event, **fields)


def request_line(
    logger: Any, line: RequestLine, loop: asyncio.AbstractEventLoop | None = None
) -> None:
    """`info_line` for a request's line: one encode of the Struct once `configure_logging`
    has set logging up; through structlog otherwise, as the same fields. `loop`: the running
    loop, if the caller has it (see `_Flushing`)."""
    if _direct is not None and _direct.active():
        if _info:
            _direct.request(line, loop)
        return
    fields = {
        name: value
        for name, value in msgspec.structs.asdict(line).items()
        if value is not msgspec.UNSET and name not in ("event", "level", "timestamp")
    }
    logger.info(line.event, **fields)


def flush_lines() -> None:
    """Write out request lines still buffered for this turn of the loop (at shutdown)."""
    if _direct is not None:
        _direct.flush()


def configure_logging(level: str = "info", *, cache: bool = True) -> None:
    """Route structlog and stdlib logging to JSON lines on stdout at `level`.

    Args:
        level: the lowest level written.
        cache: bind loggers once, on first use (fast; tests that reconfigure pass False).
    """
    numeric = logging.getLevelNamesMapping()[level.upper()]
    lines = _Flushing(_stdout())
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        _UTCTimestamp(),
    ]
    # Tracebacks as data, but never with frame locals: they hold prompts and keys.
    tracebacks = structlog.processors.ExceptionRenderer(
        structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
    )
    processors: list[structlog.types.Processor] = [
        *shared,
        tracebacks,
        structlog.processors.JSONRenderer(serializer=_serialize),
    ]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.BytesLoggerFactory(cast(BinaryIO, _Lines(lines))),
        cache_logger_on_first_use=cache,
    )
    handler = logging.StreamHandler(_Lines(lines, text=True))
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                # (a library's `exc_info`, asyncpg's say, was written as three reprs)
                tracebacks,
                structlog.processors.JSONRenderer(serializer=lambda o, **_: _serialize(o).decode()),
            ],
        )
    )
    global _direct, _info
    _direct = _Direct(lines, processors)
    _info = numeric <= logging.INFO
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(max(numeric, logging.INFO))
    # aiohttp.access would duplicate our canonical request line.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
