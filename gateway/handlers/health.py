"""`GET /healthz` (the process answers) and `GET /readyz` (database reachable, config loaded)."""

from __future__ import annotations

from aiohttp import web

from gateway.state import STORE_KEY

__all__ = ["healthz", "readyz"]

_OK = b'{"status":"ok"}'


async def healthz(request: web.Request) -> web.Response:
    return web.Response(body=_OK, content_type="application/json")


async def readyz(request: web.Request) -> web.Response:
    try:
        await request.app[STORE_KEY].ping()
    except Exception:
        return web.Response(
            status=503,
            body=b'{"status":"unavailable","database":"unreachable"}',
            content_type="application/json",
        )
    return web.Response(body=b'{"status":"ready","database":"ok"}', content_type="application/json")
