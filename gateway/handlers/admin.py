"""The admin API: manage keys and read usage with `Authorization: Bearer <server.admin_key>`.

Without an admin key in the config the API is off (every route answers 404, as if it did not
exist). The admin key is compared in constant time, and an address that sends too many wrong
ones is locked out for a while (`gateway.brake`). No answer ever holds a key's secret, except
the one that creates it; changes reach the running key cache at once.
"""

from __future__ import annotations

import hmac
from typing import Any

import structlog
from aiohttp import web

from gateway import keyops
from gateway.errors import AuthenticationFailed, InvalidRequest, NotFound, RateLimited
from gateway.intake import read_body
from gateway.providers._pool import UpstreamStats
from gateway.schemas.codec import decode_body, encode
from gateway.state import ADMIN_BRAKE_KEY, REFUSALS_KEY, SNAPSHOT_KEY, STORE_KEY, USAGE_KEY
from gateway.timeparse import parse_since

__all__ = [
    "admin_key_matches",
    "create_key",
    "get_key",
    "list_keys",
    "require_admin",
    "revoke_key",
    "stats",
    "update_key",
    "usage",
]

log = structlog.get_logger(__name__)


def admin_key_matches(presented: str, admin_key: str) -> bool:
    """Constant-time comparison of what a caller presents with the admin key."""
    return hmac.compare_digest(presented.encode("utf-8", "surrogateescape"), admin_key.encode())


def require_admin(request: web.Request) -> None:
    admin_key = request[SNAPSHOT_KEY].settings.server.admin_key
    if admin_key is None:
        raise NotFound(f"Unknown route: {request.method} {request.path}", code="not_found")
    brake = request.app[ADMIN_BRAKE_KEY]
    address = request.remote or ""
    wait = brake.locked_for(address)
    if wait > 0:
        raise RateLimited(
            "Too many wrong admin keys from this address; try again later.",
            code="admin_key_attempts",
            retry_after=wait,
        )
    presented = request.headers.get("Authorization")
    scheme, _, token = (presented or "").partition(" ")
    if scheme.lower() != "bearer" or not admin_key_matches(token.strip(), admin_key):
        if presented is not None and brake.failed(address):
            log.warning("admin_key_lockout", remote=address, seconds=brake.lockout)
            if brake.full:  # from now on, addresses it does not hold are refused too
                log.warning("admin_brake_full", addresses=len(brake))
        raise AuthenticationFailed("The admin API needs 'Authorization: Bearer <admin key>'.")
    brake.passed(address)


def _json(obj: Any, status: int = 200) -> web.Response:
    return web.Response(body=encode(obj), status=status, content_type="application/json")


async def create_key(request: web.Request) -> web.Response:
    """`POST /admin/keys`: the new key, with its secret in `key` (the only time it is shown)."""
    require_admin(request)
    body = decode_body(await read_body(request), keyops.KeyCreate)
    view, secret = await keyops.create(request, body)
    return _json({**view, "key": secret}, status=201)


async def list_keys(request: web.Request) -> web.Response:
    """`GET /admin/keys`: every key, revoked and expired ones included."""
    require_admin(request)
    keys = await request.app[STORE_KEY].list_keys()
    return _json({"object": "list", "data": await keyops.views(request, keys)})


async def get_key(request: web.Request) -> web.Response:
    require_admin(request)
    key = await request.app[STORE_KEY].require_key(request.match_info["key_id"])
    return _json(await keyops.view(request, key))


async def update_key(request: web.Request) -> web.Response:
    """`PATCH /admin/keys/{id}`: change what the body names; `null` clears."""
    require_admin(request)
    body = decode_body(await read_body(request), keyops.KeyUpdate)
    return _json(await keyops.update(request, request.match_info["key_id"], body))


async def revoke_key(request: web.Request) -> web.Response:
    """`DELETE /admin/keys/{id}`: revoke for good (the record stays for the usage history)."""
    require_admin(request)
    return _json(await keyops.revoke(request, request.match_info["key_id"]))


async def usage(request: web.Request) -> web.Response:
    """`GET /admin/usage?since=7d&until=...&key=...&by=key|model|day`."""
    require_admin(request)
    query = request.query
    by = query.get("by", "key")
    if by not in ("key", "model", "day"):
        raise InvalidRequest("'by' must be key, model or day.", param="by")
    bounds: dict[str, float | None] = {}
    for name in ("since", "until"):
        text = query.get(name)
        try:
            bounds[name] = parse_since(text) if text else None
        except ValueError as exc:
            raise InvalidRequest(f"Invalid '{name}': {exc}", param=name) from None
    # Requests that just ended are part of the report.
    await request.app[USAGE_KEY].flush()
    await request.app[REFUSALS_KEY].flush()
    store = request.app[STORE_KEY]
    key_id = query.get("key")
    if key_id is not None:
        await store.require_key(key_id)
    rows = await store.usage_summary(
        since=bounds["since"],
        until=bounds["until"],
        key_id=key_id,
        by=by,  # type: ignore[arg-type]  # checked above
    )
    return _json({"object": "list", "by": by, "data": rows})


async def stats(request: web.Request) -> web.Response:
    """`GET /admin/stats`: each upstream provider's connection and stream-timeout counters
    (`UpstreamStats`), since it was built (a reload that changes a provider starts anew)."""
    require_admin(request)
    providers = request[SNAPSHOT_KEY].providers
    upstreams = {
        name: found
        for name, provider in providers.items()
        if isinstance(found := getattr(provider, "stats", None), UpstreamStats)
    }
    return _json({"object": "stats", "providers": upstreams})
