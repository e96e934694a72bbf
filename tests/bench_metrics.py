"""What the metrics cost a request, two ways.

    .venv/bin/python -m tests.bench_metrics                 # about half a minute
    .venv/bin/python -m tests.bench_metrics --instructions  # under valgrind: about a minute

1. `Metrics.observe()` timed in a loop, per request shape: it is all the request path pays
   for the metrics (the gauges are read when scraped).
2. A/B in one process: the same demo-model requests through two gateways, metrics on and off,
   in alternating rounds, as CPU time per request (client and server: both sides pay the
   same client share, so the difference is the server's).

`--instructions` instead counts the machine instructions of one `observe()` per request shape
under callgrind (`valgrind` must be installed): the same on every run, where the timings move
with whatever else the machine does. Each shape is counted over `CALLS` calls after a warm-up,
less the same loop calling a method that does nothing.

docs/performance.md has the figures.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestClient, TestServer

from gateway.app import create_app
from gateway.metrics import Metrics
from gateway.settings import (
    DemoConfig,
    MetricsSettings,
    ModelConfig,
    ServerSettings,
    Settings,
    Target,
)
from gateway.state import KEYS_KEY, STORE_KEY
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


def observe_costs() -> None:
    metrics = Metrics(MetricsSettings())
    print(f"{'Metrics.observe()':<22} {'us per request':>15}")
    for name, trace in SHAPES.items():
        endpoint = trace.endpoint
        status = 429 if trace.refused else 200

        def once(t: RequestTrace = trace, e: str = endpoint, s: int = status) -> None:
            metrics.observe(t, e, s, 0.01)

        us = time_per_call(once)
        print(f"{name:<22} {us:>15.2f}")


BODY = {"model": "demo", "messages": [{"role": "user", "content": "hello there"}]}
STREAM = {**BODY, "stream": True}


async def _gateway(db: Path, metrics: bool) -> tuple[TestClient[Any, Any], str]:
    settings = Settings(
        server=ServerSettings(database=str(db), log_level="error"),
        metrics=MetricsSettings(enabled=metrics),
        providers=(DemoConfig(name="demo"),),
        models=(ModelConfig(name="demo", targets=(Target(provider="demo", model="demo"),)),),
    )
    app = create_app(settings)
    client: TestClient[Any, Any] = TestClient(TestServer(app))
    await client.start_server()
    record, secret = await app[STORE_KEY].create_key(name="bench")
    app[KEYS_KEY].put(record)
    return client, secret


async def _round(client: TestClient[Any, Any], key: str, body: Any, n: int) -> float:
    headers = {"Authorization": f"Bearer {key}"}
    start = time.process_time()
    for _ in range(n):
        async with client.post("/v1/chat/completions", json=body, headers=headers) as resp:
            await resp.read()
    return time.process_time() - start


async def ab(rounds: int = 6, per_round: int = 500) -> None:
    import structlog

    structlog.configure(logger_factory=structlog.ReturnLoggerFactory())  # no log I/O
    with tempfile.TemporaryDirectory() as tmp:
        on = await _gateway(Path(tmp) / "on.db", True)
        off = await _gateway(Path(tmp) / "off.db", False)
        try:
            print(f"\n{'in-process A/B':<22} {'on us/req':>10} {'off us/req':>11} {'diff':>8}")
            for name, body in (("json", BODY), ("stream", STREAM)):
                cpu = {True: 0.0, False: 0.0}
                for i in range(rounds):  # on, off, off, on, ...: drift hits both alike
                    for side in (True, False) if i % 2 == 0 else (False, True):
                        client, key = on if side else off
                        await _round(client, key, body, 50)  # warm
                        cpu[side] += await _round(client, key, body, per_round)
                us = {side: t / (rounds * per_round) * 1e6 for side, t in cpu.items()}
                diff = us[True] - us[False]
                print(f"{name:<22} {us[True]:>10.1f} {us[False]:>11.1f} {diff:>+8.1f}")
        finally:
            await on[0].close()
            await off[0].close()


CALLS = 20_000


class _Nothing:
    def observe(self, *args: object) -> None:
        return None


def _count_under_callgrind() -> None:
    """Run by `instructions()` inside valgrind: one callgrind dump per shape."""
    metrics = Metrics(MetricsSettings())
    pid = str(os.getpid())

    tool = shutil.which("callgrind_control") or "callgrind_control"

    def control(*args: str) -> None:
        subprocess.run([tool, *args, pid], stdout=subprocess.DEVNULL, check=True)  # noqa: S603 - valgrind's own tool

    shapes = [("nothing", SHAPES["health check"]), *SHAPES.items()]
    for i, (name, trace) in enumerate(shapes):
        observe = _Nothing().observe if name == "nothing" else metrics.observe
        status = 429 if trace.refused else 200
        for _ in range(100):
            observe(trace, trace.endpoint, status, 0.01)
        control("--zero")
        control("--instr=on")
        for _ in range(CALLS):
            observe(trace, trace.endpoint, status, 0.01)
        control("--instr=off")
        control(f"--dump=shape{i}")


def instructions() -> None:
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        raise SystemExit("--instructions needs valgrind (apt-get install valgrind)")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "callgrind.out"
        subprocess.run(  # noqa: S603 - valgrind running our own interpreter and module
            [valgrind, "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}",
             sys.executable, "-m", "tests.bench_metrics", "--under-callgrind"],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        counts = []
        for dump in sorted(Path(tmp).glob("callgrind.out.*"), key=lambda p: int(p.suffix[1:])):
            totals = next(
                line for line in dump.read_text().splitlines() if line.startswith("totals:")
            )
            counts.append(int(totals.split()[1]) / CALLS)
    print(f"{'Metrics.observe()':<22} {'instructions per request':>25}")
    for name, count in zip(SHAPES, counts[1:], strict=True):
        print(f"{name:<22} {count - counts[0]:>25,.0f}")


def main() -> None:
    if "--under-callgrind" in sys.argv:
        _count_under_callgrind()
    elif "--instructions" in sys.argv:
        instructions()
    else:
        observe_costs()
        asyncio.run(ab())


if __name__ == "__main__":
    main()
