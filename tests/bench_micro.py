"""What a request's accounting costs: its usage row (made, queued, written) and its log line.

    .venv/bin/python -m tests.bench_micro            # part of `make bench`
    .venv/bin/python -m tests.bench_micro --rows 20000

CPU time of this process (the SQLite thread included) per request, the best of a few rounds,
each part measured alone with the gateway's own code: `request_context`'s finish step (usage
row + log line, logging configured as `gateway serve` does, to /dev/null), the recorder's
write of those rows into a real SQLite file (WAL, batches of `usage_batch_size`), and the log
line alone.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import inspect
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

__all__ = ["main", "measure"]

ROUNDS = 5


@contextlib.contextmanager
def _stdout_to_devnull() -> Iterator[None]:
    """fd 1 to /dev/null (the log lines are written, as in production, then discarded)."""
    sys.stdout.flush()
    saved = os.dup(1)
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(null)
        os.close(saved)


def _best(fn: Callable[[], None], n: int) -> float:
    """Best CPU µs per call of `fn` over ROUNDS rounds of `n` calls."""
    best = float("inf")
    for _ in range(ROUNDS):
        start = time.process_time()
        for _ in range(n):
            fn()
        best = min(best, (time.process_time() - start) / n * 1e6)
    return best


class _Request(dict[Any, Any]):
    """What `_finish` reads of a request: its app, method and path."""

    method = "POST"
    path = "/v1/chat/completions"

    def __init__(self, app: Any) -> None:
        super().__init__()
        self.app = app


def _trace() -> Any:
    from gateway.trace import RequestTrace

    trace = RequestTrace(
        request_id="req_0123456789abcdef000000000001",
        started=time.perf_counter(),
        ts=time.time(),
        endpoint="/v1/chat/completions",
        metered=True,
        key_id="key_0123456789ab",
        model_id="bench",
        provider="up",
        upstream_model="gpt-4o-mini",
        stream=True,
        prompt_tokens=12,
        completion_tokens=60,
        ttft_ms=1.234,
        cost_usd=0.000123,
    )
    trace.attempts.append(
        {"provider": "up", "account": 0, "model": "gpt-4o-mini", "status": 200, "ms": 3.2}
    )
    return trace


async def _usage_write(rows: int, batch: int) -> float:
    """CPU µs per row to write `rows` usage rows through the recorder into SQLite."""
    from gateway.records import UsageRecord
    from gateway.store import Store
    from gateway.usage import UsageRecorder

    best = float("inf")
    with tempfile.TemporaryDirectory() as tmp:
        store = await Store.open(str(Path(tmp) / "bench.db"))
        try:
            recorder = UsageRecorder(store, flush_seconds=3600, batch_size=batch)
            template = _trace()
            for _ in range(ROUNDS):
                records = [
                    UsageRecord(
                        ts=time.time(),
                        request_id=f"req_{i:028x}",
                        key_id=template.key_id,
                        model=template.model_id,
                        provider=template.provider,
                        upstream_model=template.upstream_model,
                        endpoint=template.endpoint,
                        stream=True,
                        status=200,
                        prompt_tokens=12,
                        completion_tokens=60,
                        total_tokens=72,
                        cost_usd=0.000123,
                        latency_ms=100.5,
                        ttft_ms=1.2,
                    )
                    for i in range(rows)
                ]
                start = time.process_time()
                for i in range(0, rows, batch):
                    for record in records[i : i + batch]:
                        recorder.record(record)
                    await recorder.flush()
                best = min(best, (time.process_time() - start) / rows * 1e6)
        finally:
            await store.close()
    return best


def measure(rows: int = 10_000, batch: int = 500) -> dict[str, float]:
    """CPU µs per request of each part of its accounting (see the module docstring)."""
    import structlog

    from gateway import middleware
    from gateway.logs import configure_logging

    try:
        from gateway.logs import info_line
    except ImportError:  # before it existed (for before/after figures)

        def info_line(logger: Any, event: str, fields: dict[str, Any]) -> None:
            logger.info(event, **fields)

    from gateway.state import REFUSALS_KEY, USAGE_KEY

    class _Queue:
        def record(self, record: Any) -> None: ...

        def count(self, *args: Any) -> None: ...

    request = _Request({USAGE_KEY: _Queue(), REFUSALS_KEY: _Queue()})
    trace = _trace()
    log = structlog.get_logger("gateway.request")
    figures: dict[str, float] = {}
    with _stdout_to_devnull():
        configure_logging("info")
        finish: Any = middleware._finish
        params = len(inspect.signature(finish).parameters)
        route = "/v1/chat/completions"
        if params == 6:  # (request, app, route, trace, status, loop): no loop runs here
            figures["finish_us"] = _best(
                lambda: finish(request, request.app, route, trace, 200, None), rows
            )
        elif params == 5:  # (request, app, route, trace, status), before 2026-12-03 night
            figures["finish_us"] = _best(
                lambda: finish(request, request.app, route, trace, 200), rows
            )
        else:  # (request, trace, status), before the evening of 2026-12-03
            figures["finish_us"] = _best(lambda: finish(request, trace, 200), rows)
        figures["log_line_us"] = _best(
            lambda: info_line(log, "request", {"method": "POST", "path": "/v1/chat/completions"}),
            rows,
        )
        structlog.reset_defaults()
    figures["usage_write_us"] = asyncio.run(_usage_write(rows, batch))
    return figures


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--batch", type=int, default=500)
    args = parser.parse_args(argv)
    figures = measure(args.rows, args.batch)
    print(f"Accounting per request (CPU µs, best of {ROUNDS} rounds)")
    print(f"  finish (usage row queued + log line)  {figures['finish_us']:8.1f}")
    print(f"  of which a bare log line              {figures['log_line_us']:8.1f}")
    print(f"  usage row written to SQLite           {figures['usage_write_us']:8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
