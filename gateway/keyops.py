"""Creating, changing and revoking keys as the admin API and the dashboard both do it.

One place for what a change means beyond the store: the checks of `gateway.keybody` (the
body's types and bounds, finite numbers, expiry in any accepted form, the config group's
existence), and publishing the changed key to the running key cache (its spending loaded
first) so it applies at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgspec
from aiohttp import web

from gateway.keybody import MAX_ALLOWED_MODELS, KeyCreate, KeyUpdate, checked
from gateway.records import KeyRecord, key_view
from gateway.state import GATE_KEY, KEYS_KEY, SNAPSHOT_KEY, STORE_KEY, USAGE_KEY

__all__ = ["MAX_ALLOWED_MODELS", "KeyCreate", "KeyUpdate", "create", "revoke", "update", "view"]


async def _publish(request: web.Request, key: KeyRecord) -> dict[str, Any]:
    """Put a changed key into the running cache (its spending loaded first); its view."""
    enforced = request.app[KEYS_KEY].with_groups(key)
    await request.app[GATE_KEY].sync([enforced], request.app[USAGE_KEY])
    request.app[KEYS_KEY].put(key)
    return await view(request, key)


async def view(request: web.Request, key: KeyRecord) -> dict[str, Any]:
    """A key as the admin API shows it, with its spending in the current budget period."""
    return (await views(request, [key]))[0]


async def views(request: web.Request, keys: Sequence[KeyRecord]) -> list[dict[str, Any]]:
    """`view` of each key, their spending read together (one Redis round trip, shared)."""
    cache = request.app[KEYS_KEY]
    spends = await request.app[GATE_KEY].spendings([cache.with_groups(key) for key in keys])
    shown = []
    for key, spend in zip(keys, spends, strict=True):
        one = key_view(key)
        one["object"] = "api_key"
        if spend is not None:
            one["spend"] = {"period_start": spend.start, "tokens": spend.tokens, "usd": spend.usd}
        shown.append(one)
    return shown


async def create(request: web.Request, body: msgspec.Struct) -> tuple[dict[str, Any], str]:
    """Create the key a `KeyCreate` describes: its view and its secret (shown this once)."""
    fields = checked(body, request[SNAPSHOT_KEY].settings)
    record, secret = await request.app[STORE_KEY].create_key(**fields)
    return await _publish(request, record), secret


async def update(request: web.Request, key_id: str, body: msgspec.Struct) -> dict[str, Any]:
    """Change what a `KeyUpdate` names (`None` clears); the changed key's view.

    Raises:
        InvalidRequest: the body names nothing, or a value is refused.
        NotFound: no such key.
    """
    changes = checked(body, request[SNAPSHOT_KEY].settings)
    key = await request.app[STORE_KEY].update_key(key_id, **changes)
    return await _publish(request, key)


async def revoke(request: web.Request, key_id: str) -> dict[str, Any]:
    """Revoke for good (the record stays for the usage history); the key's view."""
    key = await request.app[STORE_KEY].revoke_key(key_id)
    return await _publish(request, key)
