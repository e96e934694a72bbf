"""The cost of the Redis-shared limits alone, without HTTP: part of `tests/bench_scaling.py`.

A limited request's admit, hold, settle and leave, through the in-memory gate and through the
Redis-shared one (a real redis-server), one at a time and 32 at once, in this process. Its CPU
per request is the least noisy figure of what sharing limits costs.
"""

from __future__ import annotations

import asyncio
import resource
import time

from redis.asyncio import Redis

from gateway.admission import Gate
from gateway.database import opened_database
from gateway.limits_redis import SharedGate
from gateway.records import KeyRecord
from tests.bench import KEY_LIMITS

__all__ = ["gate_cost"]


async def _limited_request(gate: Gate, key: KeyRecord) -> None:
    ticket = await gate.admit(key)
    assert ticket is not None
    await gate.hold(ticket, (100, 0.001), (200, 0.002))
    gate.settle(ticket, 150, 0.0015)
    gate.leave(ticket)


async def _gate_cell(
    gate: Gate, key: KeyRecord, concurrency: int, requests: int
) -> dict[str, float]:
    latencies: list[float] = []

    async def worker(n: int) -> None:
        for _ in range(n):
            start = time.perf_counter()
            await _limited_request(gate, key)
            latencies.append(time.perf_counter() - start)

    await worker(200)  # warm up
    latencies.clear()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    await asyncio.gather(*(worker(requests // concurrency) for _ in range(concurrency)))
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = after.ru_utime + after.ru_stime - usage.ru_utime - usage.ru_stime
    latencies.sort()
    return {
        "cpu_us": round(cpu / len(latencies) * 1e6, 1),
        "p50_ms": round(latencies[len(latencies) // 2] * 1000, 3),
    }


async def gate_cost(database: str, redis_url: str, requests: int) -> dict[str, dict[str, float]]:
    """CPU per request (µs) and p50 (ms) of the limits alone, in memory and in Redis."""
    figures: dict[str, dict[str, float]] = {}
    async with opened_database(database) as store:
        key, _ = await store.create_key(name="gate", **KEY_LIMITS)
        shared = SharedGate(store, Redis.from_url(redis_url, socket_timeout=5.0))
        try:
            for name, gate in (("memory", Gate(store)), ("redis", shared)):
                await gate.sync([key])
                for concurrency in (1, 32):
                    cell = await _gate_cell(gate, key, concurrency, requests)
                    figures[f"{name} c={concurrency}"] = cell
        finally:
            await shared.close()
    return figures
