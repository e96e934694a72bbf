"""structlog set-up: one JSON object per line on stdout, encoded with msgspec.

Called once from the CLI, never at import, so tests can use `structlog.testing.capture_logs()`.
aiohttp's own stdlib loggers go through the same renderer so every line has one shape.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import MutableMapping
from typing import Any

import msgspec
import structlog
import structlog.tracebacks

__all__ = ["configure_logging"]

# Not the shared codec.ENCODER: log events may hold any object (an exception, a path), which
# this one writes as its str() instead of failing.
_ENCODER = msgspec.json.Encoder(enc_hook=str)


def _serialize(obj: Any, **_: Any) -> bytes:
    # JSONRenderer passes `default=`, which msgspec does not take; enc_hook does its job.
    return _ENCODER.encode(obj)


class _UTCTimestamp:
    """ISO-8601 UTC timestamps with milliseconds, formatting the date part once per second."""

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""

    def __call__(
        self, _: Any, __: str, event: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second = second
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        event["timestamp"] = f"{self._prefix}.{int((now - second) * 1000):03d}Z"
        return event


def configure_logging(level: str = "info", *, cache: bool = True) -> None:
    """Route structlog and stdlib logging to JSON lines on stdout at `level`.

    Args:
        level: the lowest level written.
        cache: bind loggers once, on first use (fast; tests that reconfigure pass False).
    """
    numeric = logging.getLevelNamesMapping()[level.upper()]
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        _UTCTimestamp(),
    ]
    structlog.configure(
        processors=[
            *shared,
            # Tracebacks as data, but never with frame locals: they hold prompts and keys.
            structlog.processors.ExceptionRenderer(
                structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
            ),
            structlog.processors.JSONRenderer(serializer=_serialize),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.BytesLoggerFactory(sys.stdout.buffer),
        cache_logger_on_first_use=cache,
    )
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.JSONRenderer(serializer=lambda o, **_: _serialize(o).decode()),
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(max(numeric, logging.INFO))
    # aiohttp.access would duplicate our canonical request line.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
