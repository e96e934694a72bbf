"""The dashboard stays fast with a year of usage: ~500k rows, its pages read through indexes."""

from __future__ import annotations

import random
import time
from collections import Counter

from aiohttp.pytest_plugin import AiohttpClient

from gateway.dashboard import queries
from gateway.migrations import pragma
from gateway.records import UsageRecord
from gateway.store import open_store
from tests.conftest import MakeSettings, start_gateway
from tests.test_dashboard import ADMIN, sign_in

ROWS = 500_000
YEAR = 365 * 86400
SPREAD = YEAR - 86400  # rows lie within the 365 whole days the year view shows
# Generous: on a loaded two-core machine each page takes a fraction of this (the year's
# overview reads the daily rollup, not 500k rows).
BOUND = 3.0


def _rows(keys: list[str], now: float) -> list[UsageRecord]:
    """In time order, as the gateway writes them. Drawn a column at a time with `choices`
    (half a million rows: `randrange` and `choice` per field took seconds)."""
    rng = random.Random(14)
    models = [f"model-{i}" for i in range(8)]
    times = sorted(now - rng.random() * SPREAD for _ in range(ROWS))
    prompts = rng.choices(range(10, 2000), k=ROWS)
    completions = rng.choices(range(1, 800), k=ROWS)
    row_keys = rng.choices(keys, k=ROWS)
    row_models = rng.choices(models, k=ROWS)
    failed = [rng.random() <= 0.02 for _ in range(ROWS)]
    latencies = [rng.uniform(50, 3000) for _ in range(ROWS)]
    return [
        UsageRecord(
            ts=ts,
            request_id=f"req_{i}",
            key_id=key_id,
            model=model,
            provider="demo",
            upstream_model="demo",
            endpoint="/v1/chat/completions",
            stream=False,
            status=502 if fail else 200,
            prompt_tokens=prompt,
            completion_tokens=completion,
            total_tokens=prompt + completion,
            cost_usd=(prompt + completion) * 1e-6,
            latency_ms=latency,
        )
        for i, (ts, prompt, completion, key_id, model, fail, latency) in enumerate(
            zip(times, prompts, completions, row_keys, row_models, failed, latencies, strict=True)
        )
    ]


async def fill(path: str, now: float) -> list[str]:
    """A year of usage rows for 50 keys and 8 models (and some refusals); the key ids."""
    rng = random.Random(15)
    async with open_store(path) as store:
        await pragma(store.db, "cache_size = -262144")  # 256 MiB, for the fill's speed
        keys = [(await store.create_key(name=f"key {i}"))[0].id for i in range(50)]
        await store.insert_usage(_rows(keys, now))  # one transaction, as one big batch
        refusals = Counter(
            (int((now - rng.random() * SPREAD) // 60), rng.choice(keys), 429) for _ in range(5000)
        )
        await store.add_refusals(refusals)
        until = (now // 86400 + 1) * 86400
        series = await queries.series(store, until - YEAR, until, 86400)
        assert sum(series.requests) == ROWS + refusals.total()
        plan = await store.db.execute_fetchall(
            "EXPLAIN QUERY PLAN SELECT COUNT(*) FROM usage WHERE ts >= 0 AND ts < 1"
        )
        assert "COVERING INDEX" in " ".join(str(r) for r in plan)
    return keys


async def test_pages_with_a_year_of_rows(
    aiohttp_client: AiohttpClient, make_settings: MakeSettings
) -> None:
    settings = make_settings(admin_key=ADMIN)
    keys = await fill(settings.server.database, time.time())
    gw = await start_gateway(aiohttp_client, settings)
    await sign_in(gw)
    for period in ("365d", "30d", "7d", "24h"):
        for path in ("/dashboard", f"/dashboard/keys/{keys[0]}"):
            started = time.perf_counter()
            async with gw.get(f"{path}?period={period}") as resp:
                assert resp.status == 200
                await resp.read()
            took = time.perf_counter() - started
            assert took < BOUND, f"{path}?period={period} took {took:.2f} s"
    started = time.perf_counter()
    async with gw.get("/dashboard/keys") as resp:
        assert resp.status == 200
        assert "key 49" in await resp.text()
    assert time.perf_counter() - started < BOUND
