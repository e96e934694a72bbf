"""A key's shared limits in Redis, off the request path: names, spending, leases.

A key's Redis keys share the hash tag `{<key id>}` (see `limits_lua.py` for each one). The
spending of a budget period is seeded from the usage table when Redis does not have it (a new
period, a Redis restart); the admin API reads it, with what requests in flight hold, for any
number of keys in one pipeline. A replica renews the leases of its requests in flight, so
only a crashed replica's expire.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from redis.asyncio import Redis
from redis.commands.core import AsyncScript

from gateway.admission import Ticket
from gateway.budgets import Spend, period_start
from gateway.records import KeyRecord

__all__ = [
    "key_name",
    "key_names",
    "period_starts",
    "read_spending",
    "renew_leases",
    "seed_spending",
    "spent_name",
]

_PERIOD_SECONDS = {"day": 86400, "week": 7 * 86400, "month": 31 * 86400}


def key_name(key: KeyRecord, name: str) -> str:
    return f"tk:{{{key.id}}}:{name}"


def key_names(key: KeyRecord, *names: str) -> list[str]:
    return [key_name(key, name) for name in names]


def spent_name(key: KeyRecord, start: float) -> str:
    return key_name(key, f"spent:{int(start)}")


def period_starts(now: float) -> list[float]:
    """The start of every kind of period now (a key whose period changed: its old ones)."""
    return [period_start(p, now) for p in ("total", "day", "week", "month")]


async def read_spending(
    redis: Redis, read: AsyncScript, keys: Sequence[tuple[KeyRecord, float]]
) -> list[Spend | None]:
    """Each (key, period start)'s spending, or None where the period is not in Redis yet
    (`limits_lua.READ`: holds whose lease ended are purged first)."""
    if not keys:
        return []
    async with redis.pipeline(transaction=False) as pipe:
        for key, start in keys:
            names = key_names(key, "lease", "held", "lapsed")
            await read(keys=[spent_name(key, start), *names], client=pipe)  # queued
        replies = await pipe.execute()
    found: list[Spend | None] = []
    for (_, start), (tokens, usd, held_t, held_u) in zip(keys, replies, strict=True):
        found.append(
            None
            if tokens is None
            else Spend(
                start=start,
                tokens=int(tokens),
                usd=float(usd or 0),
                held_tokens=int(held_t or 0),
                held_usd=max(0.0, float(held_u or 0)),
            )
        )
    return found


async def seed_spending(
    seed: AsyncScript, key: KeyRecord, start: float, tokens: int, usd: float
) -> None:
    """Seed the key's spending of the period from `start` (read from the usage table), once:
    a replica that seeded it first wins. It expires a day after the period ends."""
    length = _PERIOD_SECONDS.get(key.budget_period or "total", 0)
    ttl = int(start + length - time.time()) + 86400 if length else 0
    await seed(keys=[spent_name(key, start)], args=[tokens, repr(usd), ttl])


async def renew_leases(
    redis: Redis, renew: AsyncScript, lease: float, leases: dict[str, Ticket]
) -> None:
    """Another `lease` seconds for each request in flight (`leases`: lease id -> ticket), in
    one pipeline."""
    by_key: dict[str, tuple[KeyRecord, list[str]]] = {}
    for name, ticket in leases.items():
        by_key.setdefault(ticket.key.id, (ticket.key, []))[1].append(name)
    async with redis.pipeline(transaction=False) as pipe:
        for key, names in by_key.values():
            await renew(
                keys=[key_name(key, "lease"), key_name(key, "held")],
                args=[lease, *names],
                client=pipe,
            )
        await pipe.execute()
