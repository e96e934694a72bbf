"""What the dashboard reads: the usage and refusals tables, the same rows `gateway usage` and the
admin API report from, grouped by hour or day and by key or model.

Hours are read from the usage rows through a covering index, whole days from the daily
rollup the database keeps beside them (both migration step 5), so a year of rows is a few
thousand rollup rows, never a scan of the table. Refused requests (gateway.refusals) count
as requests and errors, as in the usage reports. Each query is written for SQLite and for
PostgreSQL where they differ (PostgreSQL rounds a cast to an integer, and types parameters).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from gateway.database import Database

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


_DAY = 86400


async def _rows(db: Database, sqlite: str, postgres: str, params: Sequence[Any]) -> list[Any]:
    return await db.fetch(postgres if db.dialect == "postgres" else sqlite, params)


# One query for both sources: the usage rows per `step` (3600: hours), or the daily rollup
# (`usage_daily`, migration step 5) per day; refused requests join as requests and errors.
# Parameters: 1 step (an integer: whole buckets), 2 since, 3 until.
_SERIES = {
    "sqlite": (
        "SELECT b, TOTAL(n), TOTAL(e), TOTAL(t), TOTAL(c) FROM ({rows}"
        " UNION ALL"
        " SELECT CAST(minute * 60 / ?1 AS INTEGER), TOTAL(count), TOTAL(count), 0, 0"
        " FROM refusals WHERE minute >= ?2 / 60 AND minute * 60 < ?3"
        " GROUP BY 1) GROUP BY b"
    ),
    "postgres": (
        "SELECT b, SUM(n)::float8, SUM(e)::float8, SUM(t)::float8, SUM(c)::float8 FROM ({rows}"
        " UNION ALL"
        " SELECT floor(minute * 60 / $1::float8)::bigint, SUM(count), SUM(count), 0, 0"
        " FROM refusals WHERE minute >= $2::float8 / 60 AND minute * 60 < $3::float8"
        " GROUP BY 1) AS rows GROUP BY b"
    ),
}
_HOURLY_ROWS = {
    "sqlite": (
        "SELECT CAST(ts / ?1 AS INTEGER) AS b, COUNT(*) AS n, TOTAL(status >= 400) AS e,"
        " TOTAL(total_tokens) AS t, TOTAL(cost_usd) AS c"
        " FROM usage WHERE ts >= ?2 AND ts < ?3 GROUP BY b"
    ),
    "postgres": (
        "SELECT floor(ts / $1::float8)::bigint AS b, COUNT(*) AS n,"
        " SUM((status >= 400)::int) AS e, SUM(total_tokens) AS t, SUM(cost_usd) AS c"
        " FROM usage WHERE ts >= $2::float8 AND ts < $3::float8 GROUP BY b"
    ),
}
_DAILY_ROWS = {
    "sqlite": (
        "SELECT day AS b, SUM(requests) AS n, SUM(errors) AS e, TOTAL(tokens) AS t,"
        " TOTAL(cost_usd) AS c FROM usage_daily"
        " WHERE day >= ?2 / 86400 AND day < ?3 / 86400 GROUP BY day"
    ),
    "postgres": (
        "SELECT day AS b, SUM(requests) AS n, SUM(errors) AS e, SUM(tokens) AS t,"
        " SUM(cost_usd) AS c FROM usage_daily"
        " WHERE day >= $2::float8 / 86400 AND day < $3::float8 / 86400 GROUP BY day"
    ),
}


def _whole_days(since: float, until: float) -> bool:
    return since % _DAY == 0 and until % _DAY == 0


async def series(db: Database, since: float, until: float, step: int) -> Bucketed:
    """Requests, errors, tokens and spend per `step` seconds (3600 or 86400: UTC hours or days)
    from `since` to `until` (whole steps); every bucket is there, empty ones as zeros."""
    source = _DAILY_ROWS if step == _DAY and _whole_days(since, until) else _HOURLY_ROWS
    dialect = "postgres" if db.dialect == "postgres" else "sqlite"
    sql = _SERIES[dialect].format(rows=source[dialect])
    rows = await db.fetch(sql, (step, float(since), float(until)))
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


# The sources of `top`: whole days from the daily rollup, else the usage rows. {c}: the column.
_TOP_DAILY = (
    "SELECT {c}, SUM(requests), {sum}(tokens), {sum}(cost_usd) FROM usage_daily"
    " WHERE day >= {p1} AND day < {p2} AND {c} != ''"
)
_TOP_ROWS = (
    "SELECT {c}, COUNT(*), {sum}(total_tokens), {sum}(cost_usd) FROM usage"
    " WHERE ts >= {p1} AND ts < {p2} AND {c} IS NOT NULL"
)
_TOP_ORDER = " GROUP BY {c} ORDER BY 4 DESC, 2 DESC, {c}{collate} LIMIT {p3}"
# SQLite's spelling, and PostgreSQL's (no TOTAL; typed placeholders; ids ordered bytewise).
_TOP_DIALECT = {
    "sqlite": {"sum": "TOTAL", "p1": "?", "p2": "?", "p3": "?", "collate": ""},
    "postgres": {
        "sum": "SUM",
        "p1": "$1::float8",
        "p2": "$2::float8",
        "p3": "$3",
        "collate": ' COLLATE "C"',
    },
}


async def top(
    db: Database, column: str, since: float, until: float, limit: int = 10
) -> list[tuple[str, int, int, float]]:
    """The keys or models (`column`) that spent most in the range: id, requests, tokens, USD.
    Whole days are read from the daily rollup."""
    if column not in ("key_id", "model"):
        raise ValueError(column)
    if _whole_days(since, until):
        template, params = _TOP_DAILY, (since // _DAY, until // _DAY)
    else:
        template, params = _TOP_ROWS, (since, until)
    spelling = _TOP_DIALECT["postgres" if db.dialect == "postgres" else "sqlite"]
    sql = (template + _TOP_ORDER).format(c=column, **spelling)
    rows = await db.fetch(sql, (float(params[0]), float(params[1]), limit))
    return [(str(g), int(n), int(t), float(c)) for g, n, t, c in rows]


# A key's tokens per bucket and model, its `limit` models with the most tokens in the range
# by name and the rest as one NULL group: whatever model ids its clients send, the chart has
# a bounded number of series. Parameters: 1 step, 2 key, 3 since, 4 until, 5 limit.
_KEY_SERIES = {
    "sqlite": (
        "WITH top AS (SELECT COALESCE(model, '-') AS m FROM usage"
        " WHERE key_id = ?2 AND ts >= ?3 AND ts < ?4"
        " GROUP BY m ORDER BY TOTAL(total_tokens) DESC, m LIMIT ?5)"
        " SELECT CAST(ts / ?1 AS INTEGER) AS b, CASE WHEN COALESCE(model, '-') IN"
        " (SELECT m FROM top) THEN COALESCE(model, '-') END AS grp, TOTAL(total_tokens)"
        " FROM usage WHERE key_id = ?2 AND ts >= ?3 AND ts < ?4 GROUP BY b, grp"
    ),
    "postgres": (
        "WITH top AS (SELECT COALESCE(model, '-') AS m FROM usage"
        " WHERE key_id = $2 AND ts >= $3::float8 AND ts < $4::float8"
        " GROUP BY m ORDER BY SUM(total_tokens)::float8 DESC,"
        " COALESCE(model, '-') COLLATE \"C\" LIMIT $5)"
        " SELECT floor(ts / $1::float8)::bigint AS b, CASE WHEN COALESCE(model, '-') IN"
        " (SELECT m FROM top) THEN COALESCE(model, '-') END AS grp,"
        " SUM(total_tokens)::float8 FROM usage"
        " WHERE key_id = $2 AND ts >= $3::float8 AND ts < $4::float8 GROUP BY b, grp"
    ),
}


async def key_series(
    db: Database, key_id: str, since: float, until: float, step: int, limit: int = 7
) -> tuple[list[int], dict[str | None, list[int]]]:
    """A key's tokens per bucket and model: bucket starts, and the tokens of its `limit`
    models with the most (most first), then of all its other models together (key None)."""
    rows = await _rows(
        db,
        _KEY_SERIES["sqlite"],
        _KEY_SERIES["postgres"],
        (float(step), key_id, float(since), float(until), limit),
    )
    first, last = int(since // step), int((until - 1) // step)
    starts = [b * step for b in range(first, last + 1)]
    found: dict[str | None, list[int]] = {}
    for b, model, tokens in rows:
        found.setdefault(model, [0] * len(starts))[int(b) - first] = int(tokens)
    ordered = sorted((m for m in found if m is not None), key=lambda m: (-sum(found[m]), m))
    by_model: dict[str | None, list[int]] = {m: found[m] for m in ordered}
    if None in found:
        by_model[None] = found[None]
    return starts, by_model


async def refusals_of(db: Database, key_id: str, limit: int = 50) -> list[tuple[int, int, int]]:
    """A key's latest refused requests: (minute start, status, how many), newest first."""
    return [
        (int(minute) * 60, int(status), int(count))
        for minute, status, count in await _rows(
            db,
            "SELECT minute, status, count FROM refusals WHERE key_id = ?"
            " ORDER BY minute DESC, status LIMIT ?",
            "SELECT minute, status, count FROM refusals WHERE key_id = $1"
            " ORDER BY minute DESC, status LIMIT $2",
            (key_id, limit),
        )
    ]


async def last_used(db: Database, key_ids: Sequence[str]) -> dict[str, float]:
    """When each key last made a request (keys that never did are left out)."""
    found: dict[str, float] = {}
    for key_id in key_ids:  # one index lookup each (MAX over usage_key_ts)
        rows = await _rows(
            db,
            "SELECT MAX(ts) FROM usage WHERE key_id = ?",
            "SELECT MAX(ts) FROM usage WHERE key_id = $1",
            (key_id,),
        )
        if rows and rows[0][0] is not None:
            found[key_id] = float(rows[0][0])
    return found


async def provider_errors(db: Database, since: float) -> dict[str, tuple[int, float]]:
    """Per provider, failed requests since `since` (status 429 or 5xx) and the latest one's time."""
    rows = await _rows(
        db,
        "SELECT provider, COUNT(*), MAX(ts) FROM usage WHERE ts >= ?"
        " AND provider IS NOT NULL AND (status = 429 OR status >= 500) GROUP BY provider",
        "SELECT provider, COUNT(*), MAX(ts) FROM usage WHERE ts >= $1::float8"
        " AND provider IS NOT NULL AND (status = 429 OR status >= 500) GROUP BY provider",
        (float(since),),
    )
    return {str(p): (int(n), float(t)) for p, n, t in rows}
