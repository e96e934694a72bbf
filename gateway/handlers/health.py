"""`GET /healthz` (the process answers) and `GET /readyz` (usage can be written, config loaded).

`/readyz` answers within a second whatever the database does: its ping is bounded, and a
usage writer whose last write failed (rows held in memory, waiting for the database) makes
the gateway not ready, so a load balancer can send traffic elsewhere. So does a stored-id
writer whose last write failed: the ids it holds are unknown to the other processes on the
database, which would relay them for any key (docs/keys.md). So does a Redis outage
when shared limits refuse without it (`redis_failure = "refuse"`); `limits` says which
limits apply, and `limits_fallbacks` how many requests met an outage.
"""

from __future__ import annotations

import asyncio

from aiohttp import web

from gateway.limits_redis import SharedGate
from gateway.schemas.codec import encode
from gateway.state import GATE_KEY, REFUSALS_KEY, STORE_KEY, STORED_SHARE_KEY, USAGE_KEY

__all__ = ["healthz", "readyz"]

_OK = b'{"status":"ok"}'
# The ping's bound: a database stuck behind another process's lock is not ready.
_PING_SECONDS = 0.5


async def healthz(request: web.Request) -> web.Response:
    return web.Response(body=_OK, content_type="application/json")


async def readyz(request: web.Request) -> web.Response:
    app = request.app
    database = "ok"
    try:
        async with asyncio.timeout(_PING_SECONDS):
            await app[STORE_KEY].ping()
    except TimeoutError:
        database = "busy"
    except Exception:
        database = "unreachable"
    recorder = app[USAGE_KEY]
    failing = recorder.failing or app[REFUSALS_KEY].failing
    share = app[STORED_SHARE_KEY]
    gate = app[GATE_KEY]
    limits = "memory"
    if isinstance(gate, SharedGate):
        limits = "redis" if gate.up else f"redis down: {gate.failure}"
    ready = (
        database == "ok" and not failing and not share.failing and limits != "redis down: refuse"
    )
    body = {
        "status": "ready" if ready else "unavailable",
        "database": database,
        "usage": "failing" if failing else "ok",
        "usage_pending": recorder.pending,
        "usage_dropped": recorder.dropped,
        "stored_ids": "failing" if share.failing else "ok",
        "stored_ids_pending": share.pending,
        "limits": limits,
        "limits_fallbacks": gate.fallbacks if isinstance(gate, SharedGate) else 0,
    }
    return web.Response(
        status=200 if ready else 503, body=encode(body), content_type="application/json"
    )
