"""structlog set-up: one JSON object per line on stdout, encoded with msgspec.

Called once from the CLI, never at import, so tests can use `structlog.testing.capture_logs()`.
aiohttp's own stdlib loggers go through the same renderer so every line has one shape.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import msgspec
import structlog

__all__ = ["configure_logging", "get_logger"]

_ENCODER = msgspec.json.Encoder()


def _serialize(obj: Any, **_: Any) -> bytes:
    # JSONRenderer passes `default=`, which msgspec does not take; unknown objects become str.
    return msgspec.json.encode(obj, enc_hook=str)


def configure_logging(level: str = "info") -> None:
    """Route structlog and stdlib logging to JSON lines on stdout at `level`."""
    numeric = logging.getLevelNamesMapping()[level.upper()]
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[
            *shared,
            structlog.processors.dict_tracebacks,
            structlog.processors.JSONRenderer(serializer=_serialize),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.BytesLoggerFactory(sys.stdout.buffer),
        cache_logger_on_first_use=True,
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


def get_logger(name: str) -> Any:
    return structlog.get_logger(name)
