"""The admin API: manage keys and read usage with `Authorization: Bearer <server.admin_key>`.

Without an admin key in the config the API is off (every route answers 404, as if it did not
exist). The admin key is compared in constant time. No answer ever holds a key's secret, except
the one that creates it; changes reach the running key cache at once.
"""

from __future__ import annotations

import hmac
from datetime import UTC, datetime
from typing import Annotated, Any

import msgspec
from aiohttp import web
from msgspec import UNSET, UnsetType

from gateway.errors import AuthenticationFailed, InvalidRequest, NotFound
from gateway.intake import read_body
from gateway.records import EDITABLE_FIELDS, KEY_FIELDS, VIEW_NAMES, KeyRecord, key_view
from gateway.schemas.codec import decode_body, encode
from gateway.state import GATE_KEY, KEYS_KEY, REFUSALS_KEY, SNAPSHOT_KEY, STORE_KEY, USAGE_KEY
from gateway.timeparse import parse_expires, parse_since

__all__ = ["create_key", "get_key", "list_keys", "revoke_key", "update_key", "usage"]

Name = Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
Metadata = Annotated[
    dict[Annotated[str, msgspec.Meta(max_length=64)], Annotated[str, msgspec.Meta(max_length=512)]],
    msgspec.Meta(max_length=16),
]

# Where the API takes more, or less, than the record's own type: bounds on what people type,
# and an expiry also as "30d" or an ISO-8601 time (besides unix seconds).
_API_TYPES: dict[str, Any] = {
    "name": Name,
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


def _require_admin(request: web.Request) -> None:
    admin_key = request[SNAPSHOT_KEY].settings.server.admin_key
    if admin_key is None:
        raise NotFound(f"Unknown route: {request.method} {request.path}", code="not_found")
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    presented = token.strip().encode("utf-8", "surrogateescape")
    if scheme.lower() != "bearer" or not hmac.compare_digest(presented, admin_key.encode()):
        raise AuthenticationFailed("The admin API needs 'Authorization: Bearer <admin key>'.")


def _json(obj: Any, status: int = 200) -> web.Response:
    return web.Response(body=encode(obj), status=status, content_type="application/json")


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
    await request.app[GATE_KEY].sync([enforced], request.app[USAGE_KEY].flush)
    request.app[KEYS_KEY].put(key)
    return await _view(request, key)


async def _view(request: web.Request, key: KeyRecord) -> dict[str, Any]:
    view = key_view(key)
    view["object"] = "api_key"
    spend = await request.app[GATE_KEY].spending(request.app[KEYS_KEY].with_groups(key))
    if spend is not None:
        view["spend"] = {"period_start": spend.start, "tokens": spend.tokens, "usd": spend.usd}
    return view


async def create_key(request: web.Request) -> web.Response:
    """`POST /admin/keys`: the new key, with its secret in `key` (the only time it is shown)."""
    _require_admin(request)
    fields = msgspec.structs.asdict(decode_body(await read_body(request), KeyCreate))
    request[SNAPSHOT_KEY].settings.require_group(fields["group_name"])
    fields["expires_at"] = _expires(fields["expires_at"])
    record, secret = await request.app[STORE_KEY].create_key(**fields)
    view = await _publish(request, record)
    return _json({**view, "key": secret}, status=201)


async def list_keys(request: web.Request) -> web.Response:
    """`GET /admin/keys`: every key, revoked and expired ones included."""
    _require_admin(request)
    keys = await request.app[STORE_KEY].list_keys()
    return _json({"object": "list", "data": [await _view(request, k) for k in keys]})


async def get_key(request: web.Request) -> web.Response:
    _require_admin(request)
    key = await request.app[STORE_KEY].require_key(request.match_info["key_id"])
    return _json(await _view(request, key))


async def update_key(request: web.Request) -> web.Response:
    """`PATCH /admin/keys/{id}`: change what the body names; `null` clears."""
    _require_admin(request)
    body = msgspec.structs.asdict(decode_body(await read_body(request), KeyUpdate))
    changes = {f: value for f, value in body.items() if value is not UNSET}
    if "group_name" in changes:
        request[SNAPSHOT_KEY].settings.require_group(changes["group_name"])
    if "expires_at" in changes:
        changes["expires_at"] = _expires(changes["expires_at"])
    if not changes:
        raise InvalidRequest("The body names no field to change.")
    key = await request.app[STORE_KEY].update_key(request.match_info["key_id"], **changes)
    return _json(await _publish(request, key))


async def revoke_key(request: web.Request) -> web.Response:
    """`DELETE /admin/keys/{id}`: revoke for good (the record stays for the usage history)."""
    _require_admin(request)
    key = await request.app[STORE_KEY].revoke_key(request.match_info["key_id"])
    return _json(await _publish(request, key))


async def usage(request: web.Request) -> web.Response:
    """`GET /admin/usage?since=7d&until=...&key=...&by=key|model|day`."""
    _require_admin(request)
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
