"""`GET /metrics`: the Prometheus text format (`gateway.metrics`).

It needs the admin key as a Bearer token, like the admin API (and like it, is a 404 when no
admin key is configured), unless `[metrics] public = true`; `enabled = false` turns it off.
"""

from __future__ import annotations

from aiohttp import web

from gateway.errors import NotFound
from gateway.handlers.admin import require_admin
from gateway.metrics import CONTENT_TYPE, render
from gateway.state import METRICS_KEY, SNAPSHOT_KEY

__all__ = ["metrics"]


async def metrics(request: web.Request) -> web.Response:
    found = request.app.get(METRICS_KEY)
    if found is None:
        raise NotFound(f"Unknown route: {request.method} {request.path}", code="not_found")
    if not request[SNAPSHOT_KEY].settings.metrics.public:
        require_admin(request)
    return web.Response(body=await render(found), headers={"Content-Type": CONTENT_TYPE})
