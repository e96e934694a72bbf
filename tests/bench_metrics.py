"""What the metrics cost a request: `Metrics.observe()` timed in a loop, per request shape.

    .venv/bin/python -m tests.bench_metrics            # about five seconds

`observe()` is all the request path pays for the metrics (the gauges are read when scraped),
so its time per call is the metrics' share of a request's CPU; docs/performance.md has the
figures and an end-to-end A/B with `make bench`.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from aiohttp import web

from gateway.metrics import Metrics
from gateway.settings import MetricsSettings
from gateway.trace import RequestTrace

CHAT = "/v1/chat/completions"
ROUNDS = 200_000


def _trace(**fields: object) -> RequestTrace:
    trace = RequestTrace(request_id="req_1", started=0.0, ts=0.0, endpoint=CHAT)
    for name, value in fields.items():
        setattr(trace, name, value)
    return trace


def _attempt(provider: str, account: int, status: int) -> dict[str, object]:
    return {"provider": provider, "account": account, "model": "up", "status": status, "ms": 1.0}


SHAPES: dict[str, RequestTrace] = {
    "json, one attempt": _trace(
        metered=True,
        key_id="key_0",
        model_id="m",
        provider="up",
        prompt_tokens=20,
        completion_tokens=30,
        cost_usd=0.0001,
        attempts=[_attempt("up", 0, 200)],
    ),
    "stream, one attempt": _trace(
        metered=True,
        key_id="key_0",
        model_id="m",
        provider="up",
        stream=True,
        ttft_ms=12.5,
        prompt_tokens=20,
        completion_tokens=30,
        cost_usd=0.0001,
        attempts=[_attempt("up", 0, 200)],
    ),
    "json, a failover": _trace(
        metered=True,
        key_id="key_0",
        model_id="m",
        provider="up",
        prompt_tokens=20,
        completion_tokens=30,
        cost_usd=0.0001,
        attempts=[_attempt("up", 0, 500), _attempt("up", 1, 200)],
    ),
    "refused (rate limit)": _trace(metered=True, key_id="key_0", refused="requests_per_minute"),
    "health check": _trace(endpoint="/healthz"),
}


def time_per_call(call: Callable[[], None], rounds: int = ROUNDS) -> float:
    """Microseconds per call, best of three runs."""
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(rounds):
            call()
        best = min(best, time.perf_counter() - start)
    return best / rounds * 1e6


def main() -> None:
    metrics = Metrics(web.Application(), MetricsSettings())
    print(f"{'request':<22} {'us per request':>15}")
    for name, trace in SHAPES.items():
        endpoint = trace.endpoint
        status = 429 if trace.refused else 200
        us = time_per_call(lambda t=trace, e=endpoint, s=status: metrics.observe(t, e, s, 0.01))
        print(f"{name:<22} {us:>15.2f}")


if __name__ == "__main__":
    main()
