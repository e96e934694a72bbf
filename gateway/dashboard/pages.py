"""The Overview and Upstreams pages, and the static files."""

from __future__ import annotations

import time
from typing import Any

from aiohttp import web

from gateway.dashboard import queries
from gateway.dashboard.guard import render, signed_in
from gateway.dashboard.render import static
from gateway.errors import NotFound
from gateway.state import REFUSALS_KEY, SNAPSHOT_KEY, STORE_KEY, USAGE_KEY

__all__ = ["PERIODS", "Period", "overview", "period_of", "static_file", "upstreams"]

HOUR, DAY = 3600, 86400
# What the period picker offers: its span and the chart's bucket.
PERIODS = {
    "24h": (DAY, HOUR),
    "7d": (7 * DAY, HOUR),
    "30d": (30 * DAY, DAY),
    "90d": (90 * DAY, DAY),
    "365d": (365 * DAY, DAY),
}
Period = tuple[str, float, float, int]  # name, since, until, bucket seconds


def period_of(request: web.Request, default: str = "7d") -> Period:
    """The chosen period (`?period=`), whole buckets up to and including the current one."""
    name = request.query.get("period", default)
    if name not in PERIODS:
        name = default
    span, step = PERIODS[name]
    until = (time.time() // step + 1) * step
    return name, until - span, until, step


async def fresh(request: web.Request) -> None:
    """Write the usage rows and refusal counts still queued, so a page shows every request
    that has ended (as `/admin/usage` does)."""
    await request.app[USAGE_KEY].flush()
    await request.app[REFUSALS_KEY].flush()


def chart(starts: list[int], series: dict[str, list[Any]]) -> dict[str, Any]:
    """What dashboard.js draws: x (unix seconds) and named series of the same length."""
    return {"x": starts, "series": [{"label": k, "values": v} for k, v in series.items()]}


@signed_in
async def overview(request: web.Request) -> web.StreamResponse:
    """`GET /dashboard`: today's and the period's figures, charts over time, top spenders."""
    await fresh(request)
    db = request.app[STORE_KEY]
    name, since, until, step = period_of(request)
    today_start = time.time() // DAY * DAY
    today = (await queries.series(db, today_start, today_start + DAY, DAY)).totals
    buckets = await queries.series(db, since, until, step)
    names = {k.id: k.name for k in await request.app[STORE_KEY].list_keys()}
    top_keys = [
        (key_id, names.get(key_id, key_id), n, t, c)
        for key_id, n, t, c in await queries.top(db, "key_id", since, until)
    ]
    charts = {
        "requests": chart(buckets.starts, {"requests": buckets.requests, "errors": buckets.errors}),
        "tokens": chart(buckets.starts, {"tokens": buckets.tokens}),
        "spend": chart(buckets.starts, {"USD": buckets.cost_usd}),
    }
    return render(
        request,
        "overview.html",
        nav="overview",
        period=name,
        periods=list(PERIODS),
        step="hour" if step == HOUR else "day",
        today=today,
        total=buckets.totals,
        charts=charts,
        top_keys=top_keys,
        top_models=await queries.top(db, "model", since, until),
    )


@signed_in
async def upstreams(request: web.Request) -> web.StreamResponse:
    """`GET /dashboard/upstreams`: every provider account's breaker, and recent failures."""
    await fresh(request)
    snapshot = request[SNAPSHOT_KEY]
    board = snapshot.router.breakers
    failed = await queries.provider_errors(request.app[STORE_KEY], time.time() - DAY)
    rows = []
    for cfg in snapshot.settings.providers:
        for index in range(max(1, len(cfg.api_keys))):
            account = (cfg.name, index)
            count, ago = board.recent_failures(account)
            rows.append(
                {
                    "provider": cfg.name,
                    "type": cfg.type,
                    "account": index + 1,
                    "accounts": max(1, len(cfg.api_keys)),
                    "state": board.state(account),
                    "retry_in": board.remaining(account),
                    "failures": count,
                    "last_failure_ago": ago,
                    "window": board.window,
                    "errors_24h": failed.get(cfg.name, (0, None))[0],
                    "last_error": failed.get(cfg.name, (0, None))[1],
                }
            )
    return render(request, "upstreams.html", nav="upstreams", rows=rows)


async def static_file(request: web.Request) -> web.StreamResponse:
    """`GET /dashboard/static/{name}`: the dashboard's script, styles and uPlot (no session
    needed: nothing in them is private; off, like every dashboard route, without the admin key)."""
    server = request[SNAPSHOT_KEY].settings.server
    response = static(request.match_info["name"]) if server.admin_key and server.dashboard else None
    if response is None:
        raise NotFound(f"Unknown route: {request.method} {request.path}", code="not_found")
    return response
