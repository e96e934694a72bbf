"""Creating, changing and revoking keys as the admin API and the dashboard both do it.

One place for what a change means beyond the store: the body's types and bounds, expiry in
any accepted form, the config group's existence, and publishing the changed key to the running
key cache (its spending loaded first) so it applies at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Annotated, Any

import msgspec
from aiohttp import web
from msgspec import UNSET, UnsetType

from gateway.errors import InvalidRequest
from gateway.records import EDITABLE_FIELDS, KEY_FIELDS, VIEW_NAMES, KeyRecord, key_view
from gateway.state import GATE_KEY, KEYS_KEY, SNAPSHOT_KEY, STORE_KEY, USAGE_KEY
from gateway.timeparse import parse_expires

__all__ = ["MAX_ALLOWED_MODELS", "KeyCreate", "KeyUpdate", "create", "revoke", "update", "view"]

Name = Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
Metadata = Annotated[
    dict[Annotated[str, msgspec.Meta(max_length=64)], Annotated[str, msgspec.Meta(max_length=512)]],
    msgspec.Meta(max_length=16),
]
# An allow-list entry is a model id or a glob, at most as long as a model id a request may name
# (`pipeline.MAX_MODEL_ID`); a key's list is walked on each of its requests. Bounded, as
# everything people type here is.
MAX_ALLOWED_MODELS = 256
Models = Annotated[
    tuple[Annotated[str, msgspec.Meta(min_length=1, max_length=256)], ...],
    msgspec.Meta(max_length=MAX_ALLOWED_MODELS),
]

# Where the API takes more, or less, than the record's own type: bounds on what people type,
# and an expiry also as "30d" or an ISO-8601 time (besides unix seconds).
_API_TYPES: dict[str, Any] = {
    "name": Name,
    "models": Models,
    "expires_at": float | str | None,
    "notes": Annotated[str, msgspec.Meta(max_length=2000)],
    "metadata": Metadata,
}


def _body(name: str, *, update: bool) -> type[msgspec.Struct]:
    """The body of a key's creation or (`update`) change: every editable `KeyRecord` field.

    A change leaves out what stays as it is (UNSET); `null` clears a limit, budget, expiry or
    group. Attributes keep the record's names, so a decoded body maps onto the store's fields.
    """
    fields: list[tuple[str, Any, Any]] = []
    for f in KEY_FIELDS:
        if f.name not in EDITABLE_FIELDS:
            continue
        kind = _API_TYPES.get(f.name, f.type)
        rename = VIEW_NAMES.get(f.name, f.name)  # the name `key_view` shows it by
        if update:
            default = msgspec.field(default=UNSET, name=rename)
            kind = kind | UnsetType
        elif f.default_factory is not msgspec.NODEFAULT:
            default = msgspec.field(default_factory=f.default_factory, name=rename)
        else:
            default = msgspec.field(default=f.default, name=rename)
        fields.append((f.name, kind, default))
    return msgspec.defstruct(name, fields, forbid_unknown_fields=True, kw_only=True)


KeyCreate = _body("KeyCreate", update=False)
KeyUpdate = _body("KeyUpdate", update=True)


def _expires(value: float | str | None) -> float | None:
    if value is None:
        return None
    try:
        # Unix seconds get the same checks as "30d" or an ISO-8601 time.
        text = datetime.fromtimestamp(value, UTC).isoformat() if isinstance(value, float) else value
        return parse_expires(text)
    except (ValueError, OverflowError, OSError) as exc:
        raise InvalidRequest(f"Invalid 'expires_at': {exc}", param="expires_at") from None


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
    fields = msgspec.structs.asdict(body)
    request[SNAPSHOT_KEY].settings.require_group(fields["group_name"])
    fields["expires_at"] = _expires(fields["expires_at"])
    record, secret = await request.app[STORE_KEY].create_key(**fields)
    return await _publish(request, record), secret


async def update(request: web.Request, key_id: str, body: msgspec.Struct) -> dict[str, Any]:
    """Change what a `KeyUpdate` names (`None` clears); the changed key's view.

    Raises:
        InvalidRequest: the body names nothing, or a value is refused.
        NotFound: no such key.
    """
    changes = {f: v for f, v in msgspec.structs.asdict(body).items() if v is not UNSET}
    if "group_name" in changes:
        request[SNAPSHOT_KEY].settings.require_group(changes["group_name"])
    if "expires_at" in changes:
        changes["expires_at"] = _expires(changes["expires_at"])
    if not changes:
        raise InvalidRequest("The body names no field to change.")
    key = await request.app[STORE_KEY].update_key(key_id, **changes)
    return await _publish(request, key)


async def revoke(request: web.Request, key_id: str) -> dict[str, Any]:
    """Revoke for good (the record stays for the usage history); the key's view."""
    key = await request.app[STORE_KEY].revoke_key(key_id)
    return await _publish(request, key)
