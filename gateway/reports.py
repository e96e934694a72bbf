"""Usage reports: per key, model or day, the requests, errors, tokens, cost and latency
percentiles of a time range, read from the usage table (SQLite has no percentile function)."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Sequence
from functools import reduce
from operator import add, attrgetter
from typing import Any, Literal

import aiosqlite

from gateway.records import UsageRecord, UsageSummaryRow

__all__ = ["ROLL_UP", "roll_up", "summarize", "summarize_key"]

# `by` -> the SQL expression naming a row's group. Rows without a key or model (failed auth,
# unknown model) group under "-"; days are UTC.
_GROUP_EXPR = {
    "key": "COALESCE(key_id, '-')",
    "model": "COALESCE(model, '-')",
    "day": "strftime('%Y-%m-%d', ts, 'unixepoch')",
}
# The same for the refusal counts (gateway.refusals), which have no model: their rows join
# the reports as requests and errors with no tokens.
_REFUSAL_GROUP_EXPR = {
    "key": "key_id",
    "model": "'-'",
    "day": "strftime('%Y-%m-%d', minute * 60, 'unixepoch')",
}


# Adds a batch's (day, key, model) figures to the daily rollup (migration step 5), which the
# dashboard reads for whole days; rows without a key or model roll up under ''.
ROLL_UP = (
    "INSERT INTO usage_daily (day, key_id, model, requests, errors, tokens, cost_usd)"
    " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (day, key_id, model) DO UPDATE SET"
    " requests = requests + excluded.requests, errors = errors + excluded.errors,"
    " tokens = tokens + excluded.tokens, cost_usd = cost_usd + excluded.cost_usd"
)


def roll_up(rows: Iterable[UsageRecord]) -> list[tuple[Any, ...]]:
    """A batch of usage rows as `ROLL_UP` parameters: one per UTC day, key and model."""
    # Rows are grouped first, then each group summed by C loops (map, sum, reduce): a row
    # costs a look-up and an append, not four additions in Python.
    groups: dict[tuple[int, str, str], list[UsageRecord]] = {}
    for r in rows:
        group = (int(r.ts // 86400), r.key_id or "", r.model or "")
        members = groups.get(group)
        if members is None:
            groups[group] = [r]
        else:
            members.append(r)
    return [
        (
            *g,
            len(members),
            sum(map(_IS_ERROR, map(_STATUS, members))),
            # Tokens past SQLite's 64-bit integers (a hostile upstream's counts) go as a
            # float, as TOTAL() sums them, rather than failing the batch.
            _int64_or_float(sum(map(_TOKENS, members))),
            # Added in row order, one at a time (as `sum` of floats does only up to 3.11).
            reduce(add, map(_COST, members), 0.0),
        )
        for g, members in groups.items()
    ]


_STATUS = attrgetter("status")
_IS_ERROR = (400).__le__  # 400 <= status
_TOKENS = attrgetter("total_tokens")
_COST = attrgetter("cost_usd")


def _int64_or_float(n: float) -> Any:
    return int(n) if n < 2**63 else float(n)


def _where(
    ts: str, *, since: float | None, until: float | None, key_id: str | None
) -> tuple[str, list[Any]]:
    conditions: list[str] = []
    params: list[Any] = []
    for clause, value in ((f"{ts} >= ?", since), (f"{ts} < ?", until), ("key_id = ?", key_id)):
        if value is not None:
            conditions.append(clause)
            params.append(value)
    return (f"WHERE {' AND '.join(conditions)}" if conditions else ""), params


def _percentile(ordered: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default) of sorted values."""
    pos = (len(ordered) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def _p50_p95(ordered: Sequence[float]) -> tuple[float, float]:
    return _percentile(ordered, 0.5), _percentile(ordered, 0.95)


async def _percentiles(
    db: aiosqlite.Connection, group: str, where: str, params: list[Any]
) -> dict[str, tuple[float, float]]:
    """p50 and p95 of the latencies of each group. Percentiles need every latency of a group,
    and SQLite has no percentile function: streamed sorted, one group in memory at a time."""
    percentiles: dict[str, tuple[float, float]] = {}
    sql = f"SELECT {group} AS grp, latency_ms FROM usage {where} ORDER BY grp, latency_ms"  # noqa: S608
    group_of, values = "", list[float]()
    async with db.execute(sql, params) as cur:
        while batch := await cur.fetchmany(4096):
            for grp, latency in batch:
                if grp != group_of and values:
                    percentiles[group_of], values = _p50_p95(values), []
                group_of = grp
                values.append(latency)
    if values:
        percentiles[group_of] = _p50_p95(values)
    return percentiles


async def _latencies_of_one_key(
    db: aiosqlite.Connection, group: str, where: str, params: list[Any]
) -> dict[str, list[float]]:
    """The latencies of one key's rows by group, each sorted: fetched as they lie and sorted
    here, every group at once (SQLite's sort took twice as long: 0.6 s of 1.1 s for 500k
    rows; a key's groups together hold no more than its by-key report does)."""
    groups: dict[str, list[float]] = {}
    sql = f"SELECT {group} AS grp, latency_ms FROM usage {where}"  # noqa: S608
    async with db.execute(sql, params) as cur:
        while batch := await cur.fetchmany(4096):
            for grp, latency in batch:
                values = groups.get(grp)
                if values is None:
                    values = groups[grp] = []
                values.append(latency)
    for values in groups.values():
        values.sort()
    return groups


async def summarize(
    db: aiosqlite.Connection,
    *,
    since: float | None = None,
    until: float | None = None,
    key_id: str | None = None,
    by: Literal["key", "model", "day"] = "key",
) -> list[UsageSummaryRow]:
    """Requests, errors (status >= 400), tokens, cost and latency percentiles per group.

    Args:
        since: unix time, inclusive. until: unix time, exclusive.
        by: group by key id, model id, or UTC day (`YYYY-MM-DD`).
    """
    totals = await _totals(db, by, since=since, until=until, key_id=key_id)
    where, params = _where("ts", since=since, until=until, key_id=key_id)
    group = _GROUP_EXPR[by]
    if key_id is not None:
        latencies = await _latencies_of_one_key(db, group, where, params)
        percentiles = {grp: _p50_p95(values) for grp, values in latencies.items()}
    else:
        percentiles = await _percentiles(db, group, where, params)
    names: dict[str, str] = {}
    if by == "key" and totals:
        async with db.execute("SELECT id, name FROM keys") as cur:
            names = {key: name for key, name in await cur.fetchall()}
    return [UsageSummaryRow.of(row, percentiles.get(row[0], (None, None)), names) for row in totals]


async def summarize_key(
    db: aiosqlite.Connection, key_id: str, *, since: float, until: float
) -> tuple[list[UsageSummaryRow], UsageSummaryRow | None]:
    """A key's report by model, and its whole (None without a request): the dashboard's key
    page, from one read of the key's rows (two reports read them twice)."""
    totals = await _totals(db, "model", since=since, until=until, key_id=key_id)
    if not totals:
        return [], None
    where, params = _where("ts", since=since, until=until, key_id=key_id)
    latencies = await _latencies_of_one_key(db, _GROUP_EXPR["model"], where, params)
    rows = [
        UsageSummaryRow.of(
            row, _p50_p95(latencies[row[0]]) if row[0] in latencies else (None, None), {}
        )
        for row in totals
    ]
    everything = sorted(itertools.chain.from_iterable(latencies.values()))  # (sorted runs)
    async with db.execute("SELECT name FROM keys WHERE id = ?", (key_id,)) as cur:
        named = await cur.fetchone()
    percentiles = _p50_p95(everything) if everything else (None, None)
    return rows, UsageSummaryRow.whole(rows, key_id, named[0] if named else None, percentiles)


async def _totals(
    db: aiosqlite.Connection,
    by: Literal["key", "model", "day"],
    *,
    since: float | None,
    until: float | None,
    key_id: str | None,
) -> list[Any]:
    """Each group's (group, requests, errors, prompt, completion, total tokens, cost), in
    group order; refused requests count as requests and errors."""
    where, params = _where("ts", since=since, until=until, key_id=key_id)
    refusals_where, refusals_params = _where("minute * 60", since=since, until=until, key_id=key_id)
    totals_sql = (
        f"SELECT grp, TOTAL(n), TOTAL(errors), TOTAL(prompt), TOTAL(completion), TOTAL(total),"  # noqa: S608
        f" TOTAL(cost) FROM ("
        f"SELECT {_GROUP_EXPR[by]} AS grp, 1 AS n, status >= 400 AS errors,"
        f" prompt_tokens AS prompt, completion_tokens AS completion, total_tokens AS total,"
        f" cost_usd AS cost"
        f" FROM usage {where} UNION ALL"
        f" SELECT {_REFUSAL_GROUP_EXPR[by]}, count, count, 0, 0, 0, 0.0 FROM refusals"
        f" {refusals_where}) GROUP BY grp ORDER BY grp"
    )
    async with db.execute(totals_sql, [*params, *refusals_params]) as cur:
        return list(await cur.fetchall())
