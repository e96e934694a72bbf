"""What the dashboard reads: the usage and refusals tables, the same rows `gateway usage` and the
admin API report from, grouped by hour or day and by key or model.

Hours are read from the usage rows through a covering index, whole days from the daily
rollup SQLite keeps beside them (both migration step 5), so a year of rows is a few thousand
rollup rows, never a scan of the table. Refused requests (gateway.refusals) count
as requests and errors, as in the usage reports.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import aiosqlite

__all__ = ["Bucketed", "Totals", "key_series", "last_used", "provider_errors", "refusals_of"]
__all__ += ["series", "top"]


@dataclass(slots=True)
class Totals:
    requests: int = 0
    errors: int = 0
    tokens: int = 0
    cost_usd: float = 0.0


@dataclass(slots=True)
class Bucketed:
    """Time buckets (unix seconds of each start) and per-bucket figures, ready for a chart."""

    starts: list[int] = field(default_factory=list)
    requests: list[int] = field(default_factory=list)
    errors: list[int] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    cost_usd: list[float] = field(default_factory=list)

    @property
    def totals(self) -> Totals:
        return Totals(sum(self.requests), sum(self.errors), sum(self.tokens), sum(self.cost_usd))


async def _rows(
    db: aiosqlite.Connection, sql: str, params: Sequence[Any] | dict[str, Any]
) -> list[Any]:
    async with db.execute(sql, params) as cur:
        return list(await cur.fetchall())


_DAY = 86400

# One query for both sources: the usage rows per `step` (3600: hours), or the daily rollup
# (`usage_daily`, migration step 5) per day; refused requests join as requests and errors.
_SERIES = (
    "SELECT b, TOTAL(n), TOTAL(e), TOTAL(t), TOTAL(c) FROM ({rows}"
    " UNION ALL"
    " SELECT CAST(minute * 60 / :step AS INTEGER), TOTAL(count), TOTAL(count), 0, 0"
    " FROM refusals WHERE minute >= :since / 60 AND minute * 60 < :until"
    " GROUP BY 1) GROUP BY b"
)
_HOURLY_ROWS = (
    "SELECT CAST(ts / :step AS INTEGER) AS b, COUNT(*) AS n, TOTAL(status >= 400) AS e,"
    " TOTAL(total_tokens) AS t, TOTAL(cost_usd) AS c"
    " FROM usage WHERE ts >= :since AND ts < :until GROUP BY b"
)
_DAILY_ROWS = (
    "SELECT day AS b, SUM(requests) AS n, SUM(errors) AS e, SUM(tokens) AS t,"
    " TOTAL(cost_usd) AS c FROM usage_daily"
    " WHERE day >= :since / 86400 AND day < :until / 86400 GROUP BY day"
)


def _whole_days(since: float, until: float) -> bool:
    return since % _DAY == 0 and until % _DAY == 0


async def series(db: aiosqlite.Connection, since: float, until: float, step: int) -> Bucketed:
    """Requests, errors, tokens and spend per `step` seconds (3600 or 86400: UTC hours or days)
    from `since` to `until` (whole steps); every bucket is there, empty ones as zeros."""
    daily = step == _DAY and _whole_days(since, until)
    sql = _SERIES.format(rows=_DAILY_ROWS if daily else _HOURLY_ROWS)
    rows = await _rows(db, sql, {"step": step, "since": since, "until": until})
    found = {int(b): (int(n), int(e), int(t), float(c)) for b, n, e, t, c in rows}
    out = Bucketed()
    for b in range(int(since // step), int((until - 1) // step) + 1):
        n, e, t, c = found.get(b, (0, 0, 0, 0.0))
        out.starts.append(b * step)
        out.requests.append(n)
        out.errors.append(e)
        out.tokens.append(t)
        out.cost_usd.append(c)
    return out


async def top(
    db: aiosqlite.Connection, column: str, since: float, until: float, limit: int = 10
) -> list[tuple[str, int, int, float]]:
    """The keys or models (`column`) that spent most in the range: id, requests, tokens, USD.
    Whole days are read from the daily rollup."""
    if column not in ("key_id", "model"):
        raise ValueError(column)
    if _whole_days(since, until):
        sql = (
            f"SELECT {column}, SUM(requests), SUM(tokens), TOTAL(cost_usd) FROM usage_daily"  # noqa: S608
            f" WHERE day >= ? AND day < ? AND {column} != ''"
        )
        params: tuple[float, ...] = (since // _DAY, until // _DAY)
    else:
        sql = (
            f"SELECT {column}, COUNT(*), TOTAL(total_tokens), TOTAL(cost_usd) FROM usage"  # noqa: S608
            f" WHERE ts >= ? AND ts < ? AND {column} IS NOT NULL"
        )
        params = (since, until)
    sql += f" GROUP BY {column} ORDER BY 4 DESC, 2 DESC, 1 LIMIT ?"
    return [
        (str(g), int(n), int(t), float(c)) for g, n, t, c in await _rows(db, sql, (*params, limit))
    ]


async def key_series(
    db: aiosqlite.Connection, key_id: str, since: float, until: float, step: int
) -> tuple[list[int], dict[str, list[int]]]:
    """A key's tokens per bucket and model: bucket starts, and each model's tokens."""
    rows = await _rows(
        db,
        "SELECT CAST(ts / ? AS INTEGER) AS b, COALESCE(model, '-'), TOTAL(total_tokens)"
        " FROM usage WHERE key_id = ? AND ts >= ? AND ts < ? GROUP BY b, 2",
        (step, key_id, since, until),
    )
    first, last = int(since // step), int((until - 1) // step)
    starts = [b * step for b in range(first, last + 1)]
    by_model: dict[str, list[int]] = {}
    for b, model, tokens in rows:
        by_model.setdefault(model, [0] * len(starts))[int(b) - first] = int(tokens)
    return starts, by_model


async def refusals_of(
    db: aiosqlite.Connection, key_id: str, limit: int = 50
) -> list[tuple[int, int, int]]:
    """A key's latest refused requests: (minute start, status, how many), newest first."""
    return [
        (int(minute) * 60, int(status), int(count))
        for minute, status, count in await _rows(
            db,
            "SELECT minute, status, count FROM refusals WHERE key_id = ?"
            " ORDER BY minute DESC, status LIMIT ?",
            (key_id, limit),
        )
    ]


async def last_used(db: aiosqlite.Connection, key_ids: Sequence[str]) -> dict[str, float]:
    """When each key last made a request (keys that never did are left out)."""
    found: dict[str, float] = {}
    for key_id in key_ids:  # one index lookup each (MAX over usage_key_ts)
        rows = await _rows(db, "SELECT MAX(ts) FROM usage WHERE key_id = ?", (key_id,))
        if rows and rows[0][0] is not None:
            found[key_id] = float(rows[0][0])
    return found


async def provider_errors(db: aiosqlite.Connection, since: float) -> dict[str, tuple[int, float]]:
    """Per provider, failed requests since `since` (status 429 or 5xx) and the latest one's time."""
    rows = await _rows(
        db,
        "SELECT provider, COUNT(*), MAX(ts) FROM usage WHERE ts >= ? AND provider IS NOT NULL"
        " AND (status = 429 OR status >= 500) GROUP BY provider",
        (since,),
    )
    return {str(p): (int(n), float(t)) for p, n, t in rows}
