"""Usage reports on PostgreSQL: the same groups and numbers as `gateway.reports`, computed in
one query (PostgreSQL has `percentile_cont`, which interpolates as `gateway.reports` does)."""

from __future__ import annotations

from typing import Any, Literal

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from gateway.records import UsageSummaryRow

__all__ = ["Conn", "summarize"]

# A connection of its own or one borrowed from a pool.
Conn = asyncpg.Connection | PoolConnectionProxy

_DAY = "to_char(to_timestamp({}) AT TIME ZONE 'UTC', 'YYYY-MM-DD')"
_GROUP_EXPR = {
    "key": "COALESCE(key_id, '-')",
    "model": "COALESCE(model, '-')",
    "day": _DAY.format("ts"),
}
_REFUSAL_GROUP_EXPR = {"key": "key_id", "model": "'-'", "day": _DAY.format("minute * 60")}


def _where(
    ts: str, params: list[Any], *, since: float | None, until: float | None, key_id: str | None
) -> str:
    """Conditions on the rows; their values are appended to `params` ($n placeholders)."""
    conditions: list[str] = []
    # Times are doubles, also against `minute * 60` (whose type would make them integers).
    for clause, value, cast in (
        (f"{ts} >= ", since, "::float8"),
        (f"{ts} < ", until, "::float8"),
        ("key_id = ", key_id, ""),
    ):
        if value is not None:
            params.append(value)
            conditions.append(f"{clause}${len(params)}{cast}")
    return f"WHERE {' AND '.join(conditions)}" if conditions else ""


async def summarize(
    conn: Conn,
    *,
    since: float | None = None,
    until: float | None = None,
    key_id: str | None = None,
    by: Literal["key", "model", "day"] = "key",
) -> list[UsageSummaryRow]:
    """See `gateway.reports.summarize`; groups sort bytewise (as SQLite sorts them)."""
    params: list[Any] = []
    where = _where("ts", params, since=since, until=until, key_id=key_id)
    refusals_where = _where("minute * 60", params, since=since, until=until, key_id=key_id)
    sql = (
        # Sums as doubles, like SQLite's TOTAL(): a hostile upstream's huge token counts make
        # a big number, never an out-of-range error.
        "SELECT grp, SUM(n)::float8, SUM(errors)::float8, SUM(prompt)::float8,"  # noqa: S608
        " SUM(completion)::float8, SUM(total)::float8, SUM(cost)::float8,"
        " percentile_cont(0.5) WITHIN GROUP (ORDER BY latency),"
        " percentile_cont(0.95) WITHIN GROUP (ORDER BY latency) FROM ("
        f"SELECT {_GROUP_EXPR[by]} AS grp, 1 AS n, (status >= 400)::int AS errors,"
        " prompt_tokens AS prompt, completion_tokens AS completion, total_tokens AS total,"
        f" cost_usd AS cost, latency_ms AS latency FROM usage {where} UNION ALL"
        f" SELECT {_REFUSAL_GROUP_EXPR[by]}, count, count, 0, 0, 0, 0.0, NULL FROM refusals"
        f' {refusals_where}) AS rows GROUP BY grp ORDER BY grp COLLATE "C"'
    )
    rows = await conn.fetch(sql, *params)
    names: dict[str, str] = {}
    if by == "key" and rows:
        names = {key: name for key, name in await conn.fetch("SELECT id, name FROM keys")}
    return [UsageSummaryRow.of(row[:7], (row[7], row[8]), names) for row in rows]
